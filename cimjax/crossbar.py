"""Bit-sliced, tiled RRAM crossbar kernels: integer in, integer out (DESIGN.md sections 1 and 3).

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import noise as noise_lib
from cimjax.noise import NoiseConfig

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

MAPPINGS: tuple[str, ...] = ("of", "dc", "dr")
INPUT_SCHEMES: tuple[str, ...] = ("twos", "offset")
DEFAULT_MAX_BITS = 8
# Partial sums computed at once before the simulator processes tokens in blocks (lax.map).
DEFAULT_BLOCK_ELEMS = 1 << 23


# --------------------------------------------------------------------------------------------
# Static configuration and layout
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XbarConfig:
  """Static crossbar parameters the simulator needs (hashable: a ``jit`` static argument).

  Attributes:
    rows: N, crossbar rows (input dim).
    cols: M, crossbar columns.
    cell_bits: bits per cell, 1..4 (slice width).
    dac_bits: input bits per cycle, >= 1.
    mapping: ``"of"``, ``"dc"`` or ``"dr"``.
    adc_bits: ADC resolution in bits, or None for an ideal ADC.
    input_scheme: signed-input scheme, ``"twos"`` or ``"offset"`` (module docstring).
  """

  rows: int = 256
  cols: int = 256
  cell_bits: int = 4
  dac_bits: int = 1
  mapping: str = "dc"
  adc_bits: int | None = None
  input_scheme: str = "twos"

  def __post_init__(self):
    for f in ("rows", "cols", "cell_bits", "dac_bits"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"XbarConfig.{f} = {v!r}; allowed: an integer >= 1")
    if self.mapping not in MAPPINGS:
      raise ValueError(f"XbarConfig.mapping = {self.mapping!r}; allowed: {', '.join(MAPPINGS)}")
    if self.input_scheme not in INPUT_SCHEMES:
      raise ValueError(
        f"XbarConfig.input_scheme = {self.input_scheme!r}; allowed: {', '.join(INPUT_SCHEMES)}"
      )
    if self.adc_bits is not None and (
      not isinstance(self.adc_bits, (int, np.integer))
      or isinstance(self.adc_bits, bool)
      or not 1 <= self.adc_bits <= 32
    ):
      raise ValueError(f"XbarConfig.adc_bits = {self.adc_bits!r}; allowed: None or 1..32")

  @classmethod
  def from_hw(cls, hw: Any, **overrides: Any) -> "XbarConfig":
    """The simulator configuration of a :class:`cimjax.hw.HardwareTarget`.

    Args:
      hw: a hardware target (anything with ``rows, cols, cell_bits, dac_bits, mapping,
        adc_bits``).
      **overrides: fields to replace, e.g. ``adc_bits=6`` or ``input_scheme="offset"``.
    """
    kw = {
      f: getattr(hw, f) for f in ("rows", "cols", "cell_bits", "dac_bits", "mapping", "adc_bits")
    }
    kw.update(overrides)
    return cls(**kw)

  def replace(self, **changes: Any) -> "XbarConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static physical layout of one ``n x m`` matrix on a crossbar.

  Attributes:
    cfg: the crossbar configuration.
    n: input dim (logical rows).
    m: output dim (logical columns).
    signed_input: whether the streamed input is signed.
    slices: allocated weight slices ``ceil(max_w_bits / cell_bits)``.
    cycles: allocated input cycles ``ceil(max_a_bits / dac_bits)``.
  """

  cfg: XbarConfig
  n: int
  m: int
  signed_input: bool
  slices: int
  cycles: int

  @property
  def rows_p(self) -> int:
    """Physical rows of the matrix (``2n`` for ``dr``)."""
    return 2 * self.n if self.cfg.mapping == "dr" else self.n

  @property
  def cols_p(self) -> int:
    """Physical columns (``2mS`` for ``dc``, ``mS + 1`` for ``of``, ``mS`` for ``dr``)."""
    c = self.m * self.slices
    if self.cfg.mapping == "dc":
      return 2 * c
    if self.cfg.mapping == "of":
      return c + 1
    return c

  @property
  def row_tiles(self) -> int:
    """``ceil(rows_p / N)``."""
    return -(-self.rows_p // self.cfg.rows)

  @property
  def col_tiles(self) -> int:
    """``ceil(cols_p / M)``."""
    return -(-self.cols_p // self.cfg.cols)

  @property
  def tile_rows(self) -> int:
    """Rows per row tile in the simulator: ``N``, or ``rows_p`` when one tile holds them all."""
    return self.cfg.rows if self.row_tiles > 1 else self.rows_p


def make_layout(
  cfg: XbarConfig,
  n: int,
  m: int,
  *,
  signed_input: bool,
  max_w_bits: int = DEFAULT_MAX_BITS,
  max_a_bits: int = DEFAULT_MAX_BITS,
) -> Layout:
  """The static layout of an ``n x m`` matrix, with slices and cycles for the given maxima."""
  return Layout(
    cfg=cfg,
    n=int(n),
    m=int(m),
    signed_input=bool(signed_input),
    slices=num_slices(int(max_w_bits), cfg.cell_bits),
    cycles=num_cycles(int(max_a_bits), cfg.dac_bits),
  )


def num_slices(w_bits: Any, cell_bits: int) -> Any:
  """``ceil(w_bits / cell_bits)`` for Python ints or (traced) integer arrays."""
  return (w_bits + cell_bits - 1) // cell_bits


def num_cycles(a_bits: Any, dac_bits: int) -> Any:
  """``ceil(a_bits / dac_bits)`` for Python ints or (traced) integer arrays."""
  return (a_bits + dac_bits - 1) // dac_bits


def _i32(v: Any) -> Array:
  return jnp.asarray(v).astype(jnp.int32)


def _to_int(x: Array) -> Array:
  return jnp.round(x).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Weights -> cell levels
# --------------------------------------------------------------------------------------------


def slice_levels(w: Array, w_bits: Any, layout: Layout, xp: Any = jnp) -> Array:
  """Maps signed integer weights onto the physical matrix of cell levels.

  Args:
    w: ``[..., n, m]`` integer-valued weights in ``[-(2^(w_bits-1)-1), 2^(w_bits-1)-1]``.
    w_bits: weight bits (int or traced integer scalar), ``<= max_w_bits`` of ``layout``.
    layout: static layout (mapping, slices allocated).
    xp: ``jax.numpy`` (traceable, float32 result) or ``numpy`` (host-side, for the compiler;
      uint8 result).

  Returns:
    ``[..., rows_p, cols_p]`` cell levels in ``[0, 2^cell_bits - 1]``.
  """
  c, s_alloc = layout.cfg.cell_bits, layout.slices
  lead = w.shape[:-2]
  n, m = w.shape[-2:]
  idt = np.int64 if xp is np else jnp.int32
  wi = xp.rint(w).astype(idt)
  shifts = c * xp.arange(s_alloc, dtype=idt)
  mask = (1 << c) - 1

  def slc(v):  # [..., n, m] -> [..., n, m, S]
    return xp.bitwise_and(xp.right_shift(v[..., None], shifts), mask)

  mapping = layout.cfg.mapping
  if mapping == "of":
    u = wi + xp.left_shift(1, xp.asarray(w_bits).astype(idt) - 1)
    lv = slc(u).reshape(*lead, n, m * s_alloc)
    lv = xp.concatenate([lv, xp.ones((*lead, n, 1), lv.dtype)], axis=-1)
  else:
    pos = slc(xp.maximum(wi, 0))
    neg = slc(xp.maximum(-wi, 0))
    if mapping == "dc":
      lv = xp.stack([pos, neg], axis=-1).reshape(*lead, n, m * s_alloc * 2)
    else:  # dr: rows (i, sign) interleaved
      lv = xp.stack([pos, neg], axis=-3).reshape(*lead, 2 * n, m * s_alloc)
  return lv.astype(np.uint8) if xp is np else lv.astype(jnp.float32)


def _slice_level_max(w_bits: Any, layout: Layout) -> Array:
  c = layout.cfg.cell_bits
  s = jnp.arange(layout.slices, dtype=jnp.int32)
  bits_s = jnp.clip(_i32(w_bits) - c * s, 0, c)
  return jnp.left_shift(1, bits_s) - 1  # [S] int32


def column_level_max(w_bits: Any, layout: Layout) -> Array:
  """``[cols_p]`` float32: the largest level each physical column can hold at ``w_bits``."""
  lm = _slice_level_max(w_bits, layout)
  m, s_alloc = layout.m, layout.slices
  if layout.cfg.mapping == "dc":
    out = jnp.broadcast_to(lm[None, :, None], (m, s_alloc, 2)).reshape(-1)
  elif layout.cfg.mapping == "dr":
    out = jnp.broadcast_to(lm[None, :], (m, s_alloc)).reshape(-1)
  else:
    out = jnp.concatenate(
      [jnp.broadcast_to(lm[None, :], (m, s_alloc)).reshape(-1), jnp.ones((1,), jnp.int32)]
    )
  return out.astype(jnp.float32)


def column_coeffs(w_bits: Any, layout: Layout) -> Array:
  """``[cols_p]`` int32 digital weight of each physical column (slice shift, sign, offset).

  Unused slices (``s >= ceil(w_bits / cell_bits)``) get 0.
  """
  c = layout.cfg.cell_bits
  m, s_alloc = layout.m, layout.slices
  s = jnp.arange(s_alloc, dtype=jnp.int32)
  used = s < num_slices(_i32(w_bits), c)
  cs = jnp.where(used, jnp.left_shift(1, c * s), 0)  # [S]
  mapping = layout.cfg.mapping
  if mapping == "dc":
    sign = jnp.array([1, -1], jnp.int32)
    return (cs[None, :, None] * sign[None, None, :] * jnp.ones((m, 1, 1), jnp.int32)).reshape(-1)
  main = jnp.broadcast_to(cs[None, :], (m, s_alloc)).reshape(-1)
  if mapping == "dr":
    return main
  corr = -jnp.left_shift(1, _i32(w_bits) - 1)
  return jnp.concatenate([main, corr[None]])


def combine_columns(acc_cols: Array, w_bits: Any, layout: Layout) -> Array:
  """Shift-and-add of the physical columns into the ``m`` outputs.

  Args:
    acc_cols: ``[..., cols_p]`` int32 column results (already summed over tiles and cycles).
    w_bits: weight bits.
    layout: static layout.

  Returns:
    ``[..., m]`` int32.
  """
  coef = column_coeffs(w_bits, layout)
  m, s_alloc = layout.m, layout.slices
  lead = acc_cols.shape[:-1]
  if layout.cfg.mapping == "dc":
    return (acc_cols * coef).reshape(*lead, m, 2 * s_alloc).sum(-1)
  if layout.cfg.mapping == "dr":
    return (acc_cols * coef).reshape(*lead, m, s_alloc).sum(-1)
  ms = m * s_alloc
  main = (acc_cols[..., :ms] * coef[:ms]).reshape(*lead, m, s_alloc).sum(-1)
  return main + acc_cols[..., ms:] * coef[ms]


# --------------------------------------------------------------------------------------------
# Inputs -> digits (input bit slicing)
# --------------------------------------------------------------------------------------------


def input_digits(x: Array, a_bits: Any, layout: Layout) -> Array:
  """Input bit slicing: the DAC digit of every physical row in every cycle.

  Args:
    x: ``[..., n]`` integer-valued inputs: ``[0, 2^a - 1]`` if unsigned, ``[-2^(a-1),
      2^(a-1) - 1]`` if signed.
    a_bits: activation bits (int or traced scalar), ``<= max_a_bits`` of ``layout``.
    layout: static layout (signedness, scheme, cycles allocated, mapping).

  Returns:
    ``[..., C, rows_p]`` float32 digits (cycle ``k`` has shift ``k * dac_bits``). For ``dr``
    the odd rows carry the negated digit.
  """
  cfg = layout.cfg
  d = cfg.dac_bits
  ab = _i32(a_bits)
  xi = _to_int(x)
  if not layout.signed_input:
    u = xi
  elif cfg.input_scheme == "offset":
    u = xi + jnp.left_shift(1, ab - 1)
  else:
    u = jnp.where(xi < 0, xi + jnp.left_shift(1, ab), xi)
  k = jnp.arange(layout.cycles, dtype=jnp.int32)
  dig = jnp.bitwise_and(jnp.right_shift(u[..., None, :], (d * k)[:, None]), (1 << d) - 1)
  if layout.signed_input and cfg.input_scheme == "twos":
    c_used = num_cycles(ab, d)
    r = ab - d * (c_used - 1)  # bits in the top digit
    sign = jnp.bitwise_and(jnp.right_shift(u, ab - 1), 1)
    top = (k == c_used - 1)[:, None]
    dig = dig - jnp.where(top, jnp.left_shift(sign, r)[..., None, :], 0)
  if cfg.mapping == "dr":
    dig = jnp.stack([dig, -dig], axis=-1).reshape(*dig.shape[:-1], 2 * layout.n)
  return dig.astype(jnp.float32)


def digit_bounds(a_bits: Any, layout: Layout) -> tuple[Array, Array]:
  """The DAC's digit range per cycle (what the ADC range is built from).

  Returns:
    ``(lo [C], hi [C])`` float32: ``[0, 2^d - 1]`` for unsigned digits; ``[-2^(d-1),
    2^(d-1) - 1]`` for the signed top cycle of a two's-complement input.
  """
  d = layout.cfg.dac_bits
  k = jnp.arange(layout.cycles, dtype=jnp.int32)
  full = float((1 << d) - 1)
  lo = jnp.zeros((layout.cycles,), jnp.float32)
  hi = jnp.full((layout.cycles,), full, jnp.float32)
  if layout.signed_input and layout.cfg.input_scheme == "twos":
    top = k == num_cycles(_i32(a_bits), d) - 1
    lo = jnp.where(top, -float(1 << (d - 1)), lo)
    hi = jnp.where(top, float((1 << (d - 1)) - 1), hi)
  return lo, hi


def cycle_coeffs(a_bits: Any, layout: Layout) -> Array:
  """``[C]`` int32 digital weight ``2^(k*dac_bits)`` of each cycle; 0 for unused cycles."""
  d = layout.cfg.dac_bits
  k = jnp.arange(layout.cycles, dtype=jnp.int32)
  return jnp.where(k < num_cycles(_i32(a_bits), d), jnp.left_shift(1, d * k), 0)


# --------------------------------------------------------------------------------------------
# ADC
# --------------------------------------------------------------------------------------------


def adc_bounds(
  w_bits: Any, a_bits: Any, layout: Layout, adc_frac: Any = 1.0
) -> tuple[Array, Array]:
  """Input range of the ADC for every (cycle, physical column).

  Full scale: ``N`` rows (``ceil(N/2)`` row pairs for ``dr``) at the column's maximum level
  times the cycle's digit range, scaled by ``adc_frac`` (1 = "max" mode, < 1 = calibrated).

  Returns:
    ``(lo, hi)``, each ``[C, cols_p]`` float32.
  """
  lmax = column_level_max(w_bits, layout)[None, :]
  dlo, dhi = digit_bounds(a_bits, layout)
  dlo, dhi = dlo[:, None], dhi[:, None]
  rows = layout.cfg.rows
  if layout.cfg.mapping == "dr":
    amp = jnp.maximum(-dlo, dhi)
    hi = ((rows + 1) // 2) * lmax * amp
    lo = -hi
  else:
    lo, hi = rows * lmax * dlo, rows * lmax * dhi
  frac = jnp.asarray(adc_frac, jnp.float32)
  return lo * frac, hi * frac


def adc_convert(v: Array, lo: Array, hi: Array, adc_bits: int) -> Array:
  """Clips, quantizes and reads out analog partial sums (integer result).

  A one-sided range (``lo >= 0`` or ``hi <= 0``) has ``2^b - 1`` uniform steps over
  ``[lo, hi]``; a two-sided one has ``2^b - 2`` steps over ``[-F, F]``, ``F = max(-lo, hi)``
  (0 is a level). The quantized value is rescaled to column-sum units and rounded to an integer
  (the digital read-out). A zero range (an unused column) reads 0.

  Args:
    v: partial sums, any shape broadcastable with ``lo``/``hi``.
    lo, hi: range bounds (traced allowed).
    adc_bits: static resolution in bits.

  Returns:
    Integer-valued float32 of ``v``'s shape.
  """
  nl = float(2**adc_bits)
  two = (lo < 0) & (hi > 0)
  span = jnp.where(two, jnp.maximum(-lo, hi), hi - lo)
  nsteps = jnp.where(two, max(nl - 2.0, 1.0), nl - 1.0)
  step = jnp.where(two, 2.0 * span, span) / nsteps
  base = jnp.where(two, -span, lo)
  top = jnp.where(two, span, hi)
  safe = jnp.where(step > 0, step, 1.0)
  q = jnp.round((jnp.clip(v, base, top) - base) / safe) * safe + base
  return jnp.round(q)


def adc_step(w_bits: Any, a_bits: Any, layout: Layout, adc_bits: int, adc_frac: Any = 1.0) -> Array:
  """``[C, cols_p]`` ADC step in column-sum units (for reports and error bounds)."""
  lo, hi = adc_bounds(w_bits, a_bits, layout, adc_frac)
  nl = float(2**adc_bits)
  two = (lo < 0) & (hi > 0)
  return jnp.where(two, 2.0 * jnp.maximum(-lo, hi) / max(nl - 2.0, 1.0), (hi - lo) / (nl - 1.0))


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


def tile_matrix(levels: Array, rows: int, cols: int) -> Array:
  """Cuts physical matrices into zero-padded crossbar tiles.

  Args:
    levels: ``[..., rows_p, cols_p]``.
    rows, cols: N and M.

  Returns:
    ``[..., tr, tc, N, M]`` with ``tr = ceil(rows_p / N)``, ``tc = ceil(cols_p / M)``.
  """
  xp = np if isinstance(levels, np.ndarray) else jnp
  *lead, rp, cp = levels.shape
  tr, tc = -(-rp // rows), -(-cp // cols)
  pad = [(0, 0)] * len(lead) + [(0, tr * rows - rp), (0, tc * cols - cp)]
  t = xp.pad(levels, pad).reshape(*lead, tr, rows, tc, cols)
  return xp.moveaxis(t, -3, -2)


def untile_matrix(tiles: Array, rows_p: int, cols_p: int) -> Array:
  """Inverse of :func:`tile_matrix`: ``[..., tr, tc, N, M] -> [..., rows_p, cols_p]``."""
  xp = np if isinstance(tiles, np.ndarray) else jnp
  *lead, tr, tc, n, m = tiles.shape
  full = xp.moveaxis(tiles, -3, -2).reshape(*lead, tr * n, tc * m)
  return full[..., :rows_p, :cols_p]


def tile_mvm(digits: Array, tile: Array) -> Array:
  """One tile, one cycle batch: the analog column sums ``digits @ tile``.

  Vmappable over tiles (``jax.vmap(tile_mvm)``), which is what :func:`simulate_levels` does in
  one batched contraction.

  Args:
    digits: ``[U, N]`` DAC digits driven on the tile's rows (U = tokens x cycles).
    tile: ``[N, M]`` cell levels (or conductances).

  Returns:
    ``[U, M]`` column sums in column-sum units.
  """
  return jnp.matmul(digits, tile, precision=HIGHEST)


def _row_tiles(a: Array, layout: Layout, axis: int) -> Array:
  """Pads ``axis`` (of length rows_p) to ``row_tiles * tile_rows`` and splits it in two."""
  axis = axis % a.ndim
  tr, ne = layout.row_tiles, layout.tile_rows
  pad = tr * ne - layout.rows_p
  if pad:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    a = jnp.pad(a, widths)
  return a.reshape(*a.shape[:axis], tr, ne, *a.shape[axis + 1 :])


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("layout", "noise", "block_elems"))
def simulate_levels(
  x: Array,
  levels: Array,
  w_bits: Any,
  a_bits: Any,
  layout: Layout,
  *,
  w_colsum: Array | None = None,
  adc_frac: Any = 1.0,
  noise: NoiseConfig | None = None,
  prog_key: Array | None = None,
  read_key: Array | None = None,
  block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> Array:
  """Runs ``R`` matrices, already programmed as cell levels, on ``T`` input vectors each.

  Args:
    x: ``[R, T, n]`` integer-valued inputs.
    levels: ``[R, rows_p, cols_p]`` cell levels (:func:`slice_levels`, or a compiled program's
      tiles through :func:`untile_matrix`).
    w_bits, a_bits: bits (traced scalars allowed).
    layout: static layout.
    w_colsum: ``[R, m]`` column sums of the integer weights; required for signed inputs with
      the ``"offset"`` scheme.
    adc_frac: ADC range as a fraction of full scale (scalar, traced allowed).
    noise: static non-idealities (a hashable :class:`NoiseConfig` of Python floats; zero
      magnitudes are skipped at trace time), or None for none.
    prog_key: PRNG key of the programming (variation, stuck-at); required with ``noise``.
    read_key: PRNG key of the reads (read noise); required with ``noise``.
    block_elems: static; tokens are processed in blocks of about this many partial sums.

  Returns:
    ``[R, T, m]`` float32, integer-valued.
  """
  r, t, n = x.shape
  if n != layout.n or levels.shape[-2:] != (layout.rows_p, layout.cols_p):
    raise ValueError(
      f"simulate_levels: x {x.shape} / levels {levels.shape} do not match the "
      f"layout (n={layout.n}, rows_p={layout.rows_p}, cols_p={layout.cols_p})"
    )
  cfg = layout.cfg
  offset = layout.signed_input and cfg.input_scheme == "offset"
  if offset and w_colsum is None:
    raise ValueError("simulate_levels: the offset input scheme needs w_colsum")
  if noise is not None:
    if prog_key is None or read_key is None:
      raise ValueError("simulate_levels: noise needs prog_key and read_key")
    levels = noise_lib.program_levels(levels, column_level_max(w_bits, layout), noise, prog_key)
    # Materialise the programmed conductances once (otherwise XLA may fuse the random draws
    # into the contraction and recompute them for every block of tokens).
    levels = jax.lax.optimization_barrier(levels)
  lv = _row_tiles(levels.astype(jnp.float32), layout, axis=-2)  # [R, tr, ne, cols]
  tr, ne, cols, cyc_n = layout.row_tiles, layout.tile_rows, layout.cols_p, layout.cycles
  cyc = cycle_coeffs(a_bits, layout)  # [C]
  if cfg.adc_bits is not None:
    lo, hi = adc_bounds(w_bits, a_bits, layout, adc_frac)  # [C, cols]

  def block(xb: Array, bkey: Array | None) -> Array:
    tb = xb.shape[1]
    dig = input_digits(xb, a_bits, layout)  # [R, Tb, C, rows_p]
    dig = _row_tiles(dig, layout, axis=-1)  # [R, Tb, C, tr, ne]
    dig = jnp.transpose(dig, (0, 3, 1, 2, 4)).reshape(r, tr, tb * cyc_n, ne)
    ps = jnp.einsum("rkun,rknj->rkuj", dig, lv, precision=HIGHEST)
    ps = ps.reshape(r, tr, tb, cyc_n, cols)
    if noise is not None:
      ps = noise_lib.read_column_sums(ps, noise, bkey)
    if cfg.adc_bits is not None:
      ps = adc_convert(ps, lo, hi, cfg.adc_bits)
    else:
      ps = jnp.round(ps)
    psi = ps.astype(jnp.int32) * cyc[:, None]
    acc_cols = psi.sum(axis=(1, 3))  # [R, Tb, cols]
    return combine_columns(acc_cols, w_bits, layout)  # [R, Tb, m] int32

  per_token = max(1, r * tr * cyc_n * cols)
  blk = max(1, block_elems // per_token)
  if t <= blk:
    out = block(x, read_key)
  else:
    nb = -(-t // blk)
    xp = jnp.pad(x, ((0, 0), (0, nb * blk - t), (0, 0)))
    xs = jnp.moveaxis(xp.reshape(r, nb, blk, n), 1, 0)
    idx = jnp.arange(nb)

    def body(args):
      xb, i = args
      return block(xb, None if read_key is None else jax.random.fold_in(read_key, i))

    out = jax.lax.map(body, (xs, idx))  # [nb, R, blk, m]
    out = jnp.moveaxis(out, 0, 1).reshape(r, nb * blk, layout.m)[:, :t]
  if offset:
    out = out - jnp.left_shift(1, _i32(a_bits) - 1) * w_colsum.astype(jnp.int32)[:, None, :]
  return out.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("layout",))
def adc_utilisation(x: Array, levels: Array, w_bits: Any, a_bits: Any, layout: Layout) -> Array:
  """How much of the full-scale ADC range each analog partial sum uses (for calibration).

  Args:
    x: ``[R, T, n]`` integer-valued inputs.
    levels: ``[R, rows_p, cols_p]`` cell levels.
    w_bits, a_bits: bits.
    layout: static layout.

  Returns:
    ``[R, tr, T, C, cols_p]`` float32: ``v / hi`` for ``v > 0`` and ``v / lo`` for ``v < 0``
    (0 where the range is empty), in ``[0, 1]``, with the full-scale ("max") range.
  """
  r, t, _ = x.shape
  lv = _row_tiles(levels.astype(jnp.float32), layout, axis=-2)
  tr, ne, cyc_n = layout.row_tiles, layout.tile_rows, layout.cycles
  dig = _row_tiles(input_digits(x, a_bits, layout), layout, axis=-1)
  dig = jnp.transpose(dig, (0, 3, 1, 2, 4)).reshape(r, tr, t * cyc_n, ne)
  ps = jnp.einsum("rkun,rknj->rkuj", dig, lv, precision=HIGHEST).reshape(r, tr, t, cyc_n, -1)
  lo, hi = adc_bounds(w_bits, a_bits, layout)
  up = jnp.where(hi > 0, ps / jnp.where(hi > 0, hi, 1.0), 0.0)
  down = jnp.where(lo < 0, ps / jnp.where(lo < 0, lo, -1.0), 0.0)
  return jnp.where(ps >= 0, up, down)


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "signed_input", "max_w_bits", "max_a_bits", "noise", "block_elems"),
)
def crossbar_mvm(
  x: Array,
  w: Array,
  w_bits: Any,
  a_bits: Any,
  cfg: XbarConfig,
  *,
  signed_input: bool,
  max_w_bits: int = DEFAULT_MAX_BITS,
  max_a_bits: int = DEFAULT_MAX_BITS,
  adc_frac: Any = 1.0,
  noise: NoiseConfig | None = None,
  prog_key: Array | None = None,
  read_key: Array | None = None,
  block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> Array:
  """Bit-sliced, mapped, tiled crossbar MVM of integer operands (the ``mvm`` hook's shape).

  Programs ``w`` (slicing, mapping) and runs ``x`` through it with input bit slicing, per
  (tile, column, cycle) ADC and shift-and-add. With an ideal ADC and no noise the result equals
  ``x @ w`` exactly.

  Args:
    x: ``[R, T, n]`` integer-valued inputs (unsigned or signed, see ``signed_input``).
    w: ``[R, n, m]`` integer-valued weights in the narrow signed range of ``w_bits``.
    w_bits, a_bits: bits (Python ints or traced integer scalars; ``vmap`` over them works).
    cfg: static crossbar configuration.
    signed_input: static, whether ``x`` is signed.
    max_w_bits, max_a_bits: static upper bounds of the bits (allocation of slices/cycles).
    adc_frac: ADC range as a fraction of full scale (traced allowed).
    noise: static non-idealities (:class:`NoiseConfig` of Python floats) or None.
    prog_key, read_key: PRNG keys of the programming and the reads (required with ``noise``).
    block_elems: static token-block size, see :func:`simulate_levels`.

  Returns:
    ``[R, T, m]`` float32, integer-valued.
  """
  layout = make_layout(
    cfg,
    w.shape[-2],
    w.shape[-1],
    signed_input=signed_input,
    max_w_bits=max_w_bits,
    max_a_bits=max_a_bits,
  )
  levels = slice_levels(w, w_bits, layout)
  colsum = _to_int(w).sum(axis=-2) if (signed_input and cfg.input_scheme == "offset") else None
  return simulate_levels(
    x,
    levels,
    w_bits,
    a_bits,
    layout,
    w_colsum=colsum,
    adc_frac=adc_frac,
    noise=noise,
    prog_key=prog_key,
    read_key=read_key,
    block_elems=block_elems,
  )


def int_matmul(x: Array, w: Array) -> Array:
  """The reference integer product ``[R, T, n] x [R, n, m] -> [R, T, m]`` (float32, HIGHEST)."""
  return jnp.einsum("rtn,rnm->rtm", x, w, precision=HIGHEST)


# --------------------------------------------------------------------------------------------
# Straight-through gradient and the forward-pass hook
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def straight_through(x: Array, w: Array, y: Array) -> Array:
  """Returns ``y`` (the simulated product) with the gradient of the ideal ``x @ w``.

  Forward: ``y``. Backward: the cotangent ``g`` of the output flows to ``x`` as ``g @ w^T``
  and to ``w`` as ``x^T @ g`` (the gradient of the integer matmul); ``y`` gets none. This is
  what noise-aware fine-tuning needs: the loss sees the noisy crossbar, the update is the ideal
  one.

  Args:
    x: ``[R, T, n]``; w: ``[R, n, m]``; y: ``[R, T, m]``.
  """
  del x, w
  return y


def _st_fwd(x, w, y):
  return y, (x, w)


def _st_bwd(res, g):
  x, w = res
  gx = jnp.einsum("rtm,rnm->rtn", g, w, precision=HIGHEST)
  gw = jnp.einsum("rtn,rtm->rnm", x, g, precision=HIGHEST)
  return gx, gw, jnp.zeros_like(g)


straight_through.defvjp(_st_fwd, _st_bwd)


def layer_keys(key: Array | None, index: int) -> tuple[Array | None, Array | None]:
  """Per-layer ``(prog_key, read_key)`` derived from one key (None -> None)."""
  if key is None:
    return None, None
  k = jax.random.fold_in(key, index)
  return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


MvmHook = Callable[[int, Any, Array, Array, Array, Array], Array]


def static_noise(noise: NoiseConfig | None) -> NoiseConfig | None:
  """A hashable copy of ``noise`` with Python-float magnitudes, or None when all are zero.

  Raises:
    TypeError: a magnitude is traced (the simulator needs compile-time magnitudes).
  """
  if noise is None:
    return None
  try:
    out = NoiseConfig(*(float(v) for v in noise))
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
      "noise magnitudes must be concrete numbers (they are compile-time "
      "constants of the simulator), not traced values"
    ) from None
  return None if out.is_zero() else out


def make_mvm_hook(
  cfg: XbarConfig,
  *,
  policy: Any = None,
  max_bits: int = DEFAULT_MAX_BITS,
  noise: NoiseConfig | None = None,
  key: Array | None = None,
  read_key: Array | None = None,
  adc_frac: Any = None,
  straight_through_grad: bool = True,
  block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> MvmHook:
  """An ``mvm`` hook for :func:`cimjax.models.forward` that runs every layer on the simulator.

  Usage::

    hook = make_mvm_hook(XbarConfig.from_hw(hw, adc_bits=6), noise=NoiseConfig(variation=.05),
                         key=jax.random.key(0))
    logits, _ = forward(module, variables, x, policy, mvm=hook)

  Args:
    cfg: crossbar configuration.
    policy: optional static ``[L, 2]`` NumPy policy: slices/cycles are then allocated exactly
      per layer (faster). It must equal the policy passed to ``forward``. Leave None when the
      policy is traced (``jit``/``vmap`` over policies): slices and cycles are then allocated
      for ``max_bits`` and masked.
    max_bits: allocation bound when ``policy`` is None.
    noise: non-idealities (zero magnitudes are dropped statically), or None.
    key: the chip's PRNG key: programming noise of layer ``l`` uses ``fold_in(key, l)``.
    read_key: key of the read noise (e.g. one per batch); defaults to one derived from ``key``.
    adc_frac: optional ``[L]`` calibrated ADC ranges (fractions of full scale).
    straight_through_grad: backward pass of the ideal integer matmul (noise-aware training).
    block_elems: token-block size of the simulator.

  Returns:
    ``mvm(index, spec, x [R, T, n], w [R, n, m], w_bits, a_bits) -> [R, T, m]``.
  """
  noise = static_noise(noise)
  if noise is not None and key is None:
    raise ValueError("make_mvm_hook: noise needs a PRNG key")
  pol = None if policy is None else np.asarray(policy)

  def hook(index, spec, x, w, w_bits, a_bits):
    if spec is None:
      raise ValueError(f"mvm hook: layer {index} has no LayerSpec (signedness unknown)")
    if pol is not None:
      mw, ma = int(pol[index, 0]), int(pol[index, 1])
    else:
      mw = ma = max_bits
    pk, rk = layer_keys(key, index)
    if read_key is not None:
      rk = jax.random.fold_in(read_key, index)
    frac = 1.0 if adc_frac is None else adc_frac[index]
    y = crossbar_mvm(
      x,
      w,
      w_bits,
      a_bits,
      cfg,
      signed_input=bool(spec.signed_input),
      max_w_bits=mw,
      max_a_bits=ma,
      adc_frac=frac,
      noise=noise,
      prog_key=pk,
      read_key=rk,
      block_elems=block_elems,
    )
    if straight_through_grad:
      y = straight_through(x, w, jax.lax.stop_gradient(y))
    return y

  return hook


# --------------------------------------------------------------------------------------------
# Requantisation helpers (digital periphery)
# --------------------------------------------------------------------------------------------


def fixed_point_multiplier(scale: Any) -> tuple[np.ndarray, np.ndarray]:
  """Represents positive float scales as ``mult * 2^-shift`` with a 31-bit ``mult``.

  Args:
    scale: positive float array (e.g. ``s_x * s_w / s_out``).

  Returns:
    ``(mult, shift)``: int64 arrays, ``mult`` in ``[2^30, 2^31)`` (0 for a zero scale).
  """
  s = np.asarray(scale, np.float64)
  if np.any(s < 0) or not np.all(np.isfinite(s)):
    raise ValueError("fixed_point_multiplier: scales must be finite and >= 0")
  mant, exp = np.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
  mult = np.round(mant * (1 << 31)).astype(np.int64)
  shift = (31 - exp).astype(np.int64)
  full = mult == (1 << 31)
  mult = np.where(full, mult // 2, mult)
  shift = np.where(full, shift - 1, shift)
  mult = np.where(s == 0, 0, mult)
  shift = np.where(s == 0, 0, shift)
  return mult, shift


def requantize_fixed(acc: Any, mult: Any, shift: Any, lo: int, hi: int) -> np.ndarray:
  """Exact integer requantisation ``clip(round(acc * mult / 2^shift), lo, hi)`` (NumPy int64).

  Rounds half up (``floor(v + 1/2)``), the usual fixed-point convention. ``acc`` must satisfy
  ``|acc| < 2^31`` so the product fits in int64.
  """
  a = np.asarray(acc, np.int64)
  m = np.asarray(mult, np.int64)
  sh = np.asarray(shift, np.int64)
  prod = a * m
  pos = sh > 0
  rnd = np.where(pos, np.left_shift(np.int64(1), np.maximum(sh - 1, 0)), 0)
  out = np.where(
    pos, np.right_shift(prod + rnd, np.maximum(sh, 0)), np.left_shift(prod, np.maximum(-sh, 0))
  )
  return np.clip(out, lo, hi)


def requantize(acc: Array, scale: Array, lo: Any, hi: Any) -> Array:
  """Float requantisation ``clip(round(acc * scale), lo, hi)`` (jnp; traced bounds allowed)."""
  return jnp.clip(jnp.round(acc * scale), lo, hi)


__all__ = [
  "DEFAULT_MAX_BITS",
  "INPUT_SCHEMES",
  "Layout",
  "MAPPINGS",
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
  "layer_keys",
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
]
