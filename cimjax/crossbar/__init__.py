"""Bit-sliced, tiled RRAM crossbar simulator: integer in, integer out (docs/architecture.md).

A layer's integer matrix ``w [n, m]`` (signed, narrow range, ``w_bits`` bits) becomes a
*physical matrix* of cell levels with the geometry of the cost model (:mod:`cimjax.cost`):

- **Weight bit slicing:** ``S = ceil(w_bits / cell_bits)`` slices, slice ``s`` holding bits
  ``[s*c, (s+1)*c)`` (LSB first, shift ``s*c``) of a non-negative code; the top slice of a
  ``w_bits`` that is not a multiple of ``c`` has fewer levels.
- **Mappings** (physical layout, column/row indices):

  * ``dc`` differential column, ``cols = 2*m*S``, ``rows = n``: column ``(j*S + s)*2 + p``
    holds slice ``s`` of ``max(w, 0)`` (``p = 0``) or of ``max(-w, 0)`` (``p = 1``); paired
    columns are adjacent. Each physical column is converted by the ADC on its own (as the cost
    model counts ADC conversions) and subtracted digitally.
  * ``dr`` differential row, ``cols = m*S``, ``rows = 2*n``: row ``2*i`` holds slices of
    ``max(w, 0)`` and is driven with the input digit, row ``2*i + 1`` holds slices of
    ``max(-w, 0)`` and is driven with the negated digit, so a column sums
    ``sum_i x_i * (w+ - w-)`` in the analog domain (a signed column sum).
  * ``of`` offset, ``cols = m*S + 1``, ``rows = n``: column ``j*S + s`` holds slice ``s`` of
    ``w + 2^(w_bits-1)`` (in ``[1, 2^w_bits - 1]``); the last column is the correction column
    with every cell at level 1, so it reads ``sum_i x_i``, and the output is
    ``sum_s 2^(s*c) col_{j,s} - 2^(w_bits-1) * col_corr``.

- **Tiling:** the physical matrix is cut into ``ceil(rows/N) x ceil(cols/M)`` tiles of ``N x M``
  (edge tiles zero-padded) exactly like the cost model counts them. The ADC converts the partial
  sum of every (row tile, physical column, input cycle). Because every physical column is
  converted separately, the column tiling does not change any partial sum; the simulator
  therefore tiles rows only (and, when the matrix has a single row tile, does not pad rows up to
  ``N``), which avoids multiplying by padding. :func:`tile_matrix` gives the full
  ``[tr, tc, N, M]`` tiles that the compiler stores.
- **Input bit slicing:** an ``a``-bit input is applied as ``C = ceil(a / dac_bits)`` digits of
  ``dac_bits`` bits, LSB first (cycle ``k`` has shift ``k*dac_bits``). Unsigned inputs (after
  ReLU/softmax) use plain digits. Signed inputs use one of two schemes (``input_scheme``):

  * ``"twos"`` (default; analog-cim-sim ``I_TC``): two's-complement digits in which the most
    significant digit is signed (its top bit weighs ``-2^(a-1)``). With a 1-bit DAC this is
    exactly "``a-1`` positive bit-planes plus one subtracted sign plane"; with wider DACs the
    top cycle drives a bipolar digit in ``[-2^(d-1), 2^(d-1)-1]``. ``C`` cycles, as the cost
    model counts.
  * ``"offset"`` (analog-cim-sim ``I_OFFS``): the input is shifted to ``x + 2^(a-1)`` (unsigned
    digits, non-negative column sums) and ``2^(a-1) * sum_i w_ij`` is subtracted digitally
    (the column sums of the integer weights are computed when the weights are written).

- **ADC** (:func:`adc_convert`): ideal (``adc_bits=None``: every partial sum is rounded to the
  nearest integer, which is exact in the noise-free case), or ``adc_bits`` bits over the range
  ``[lo, hi]`` of the (tile, column, cycle) partial sum. The full-scale ("max") range is the
  largest column sum the array can produce: ``N`` rows (``ceil(N/2)`` pairs for ``dr``) at the
  column's maximum level times the DAC's digit range of that cycle; a calibrated range scales it
  by ``adc_frac`` in ``(0, 1]``. A one-sided range uses ``2^b - 1`` uniform steps (``dc``/``of``
  columns; the sign cycle of a two's-complement input with a 1-bit DAC is one-sided negative);
  a two-sided one (``dr``, or the bipolar top cycle of a two's-complement input with
  ``dac_bits > 1``) uses ``2^b - 2`` steps over ``[-F, F]`` so that 0 is a level (analog-cim-sim
  ``SYM_RANGE_ADC``). Values are clipped, quantized and rounded to an integer, then shifted and
  added digitally in int32. Unlike analog-cim-sim, the two columns of a ``dc`` pair are
  converted separately (as :mod:`cimjax.cost` counts ADC conversions) and subtracted digitally.

**Traced bits, static shapes.** ``w_bits`` and ``a_bits`` are data (traced scalars; ``vmap``
over policies works). Slices and cycles are allocated for static maxima (``max_w_bits`` and
``max_a_bits``, default 8) and the unused ones are masked (their shift coefficients are zero and
their cell levels are zero), so one compiled kernel serves every bit pair. When the bits are
known statically (a compiled program, a fixed policy), pass them as the maxima: the allocation is
then exact and nothing is wasted. The numerics are identical either way.

Exactness: digits times levels are summed over at most ``N`` rows in float32 (``< 2^24``), and
the recombination runs in int32, so with an ideal ADC and no noise :func:`crossbar_mvm` equals
the integer matmul exactly (tested against a NumPy int64 oracle).

Modules: :mod:`~cimjax.crossbar.layout` (configuration, layout), :mod:`~cimjax.crossbar.levels`
(weights to cell levels, column recombination), :mod:`~cimjax.crossbar.digits` (input bit
slicing), :mod:`~cimjax.crossbar.adc`, :mod:`~cimjax.crossbar.tiles`,
:mod:`~cimjax.crossbar.simulate` (the kernel), :mod:`~cimjax.crossbar.hook` (the forward-pass
hook) and :mod:`~cimjax.crossbar.requant` (digital requantisation). Every public name is
re-exported here.
"""

from cimjax.crossbar.adc import adc_bounds, adc_convert, adc_step
from cimjax.crossbar.digits import cycle_coeffs, digit_bounds, input_digits
from cimjax.crossbar.hook import (
  MvmHook,
  layer_adc_frac,
  layer_keys,
  layer_read_keys,
  make_mvm_hook,
  static_noise,
  straight_through,
  with_ideal_grad,
)
from cimjax.crossbar.layout import (
  DEFAULT_BLOCK_ELEMS,
  DEFAULT_MAX_BITS,
  HIGHEST,
  INPUT_SCHEMES,
  MAPPINGS,
  Layout,
  XbarConfig,
  make_layout,
  num_cycles,
  num_slices,
)
from cimjax.crossbar.levels import column_coeffs, column_level_max, combine_columns, slice_levels
from cimjax.crossbar.requant import fixed_point_multiplier, requantize, requantize_fixed
from cimjax.crossbar.simulate import adc_utilisation, crossbar_mvm, int_matmul, simulate_levels
from cimjax.crossbar.tiles import tile_matrix, tile_mvm, untile_matrix
from cimjax.noise import NoiseConfig

__all__ = [
  "DEFAULT_BLOCK_ELEMS",
  "DEFAULT_MAX_BITS",
  "HIGHEST",
  "INPUT_SCHEMES",
  "Layout",
  "MAPPINGS",
  "MvmHook",
  "NoiseConfig",
  "XbarConfig",
  "adc_bounds",
  "adc_convert",
  "adc_step",
  "adc_utilisation",
  "column_coeffs",
  "column_level_max",
  "combine_columns",
  "crossbar_mvm",
  "cycle_coeffs",
  "digit_bounds",
  "fixed_point_multiplier",
  "input_digits",
  "int_matmul",
  "layer_adc_frac",
  "layer_keys",
  "layer_read_keys",
  "make_layout",
  "make_mvm_hook",
  "num_cycles",
  "num_slices",
  "requantize",
  "requantize_fixed",
  "simulate_levels",
  "slice_levels",
  "static_noise",
  "straight_through",
  "tile_matrix",
  "tile_mvm",
  "untile_matrix",
  "with_ideal_grad",
]
