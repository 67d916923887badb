"""The simulator: runs integer inputs through matrices programmed as cell levels.

:func:`simulate_levels` is the kernel (input bit slicing, one batched contraction per row tile,
read noise, the ADC of every (tile, column, cycle) partial sum, shift-and-add in int32);
:func:`crossbar_mvm` programs an integer matrix and runs it; :func:`adc_utilisation` measures
how much of the ADC range the partial sums use (calibration); :func:`int_matmul` is the ideal
reference product.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cimjax import noise as noise_lib
from cimjax.crossbar.adc import adc_bounds, adc_convert
from cimjax.crossbar.digits import cycle_coeffs, input_digits
from cimjax.crossbar.layout import (
  DEFAULT_BLOCK_ELEMS,
  DEFAULT_MAX_BITS,
  HIGHEST,
  Layout,
  XbarConfig,
  as_i32,
  make_layout,
  round_i32,
)
from cimjax.crossbar.levels import column_level_max, combine_columns, slice_levels
from cimjax.crossbar.tiles import split_row_tiles
from cimjax.noise import NoiseConfig

Array = jax.Array


def _partial_sums(x: Array, lv: Array, a_bits: Any, layout: Layout) -> Array:
  """Analog column sums of every (row tile, token, cycle, physical column).

  Args:
    x: ``[R, T, n]`` integer-valued inputs.
    lv: ``[R, tr, ne, cols_p]`` float32 cell levels split into row tiles.
    a_bits: activation bits.
    layout: static layout.

  Returns:
    ``[R, tr, T, C, cols_p]`` float32 partial sums in column-sum units.
  """
  r, t = x.shape[:2]
  tr, ne, cyc_n = layout.row_tiles, layout.tile_rows, layout.cycles
  dig = split_row_tiles(input_digits(x, a_bits, layout), layout, axis=-1)  # [R, T, C, tr, ne]
  dig = jnp.transpose(dig, (0, 3, 1, 2, 4)).reshape(r, tr, t * cyc_n, ne)
  ps = jnp.einsum("rkun,rknj->rkuj", dig, lv, precision=HIGHEST)
  return ps.reshape(r, tr, t, cyc_n, layout.cols_p)


def _check_operands(
  x: Array,
  levels: Array,
  layout: Layout,
  w_colsum: Array | None,
  noise: NoiseConfig | None,
  prog_key: Array | None,
  read_key: Array | None,
) -> None:
  """Raises ValueError when the operands of :func:`simulate_levels` do not fit together."""
  if x.shape[-1] != layout.n or levels.shape[-2:] != (layout.rows_p, layout.cols_p):
    raise ValueError(
      f"simulate_levels: x {x.shape} / levels {levels.shape} do not match the "
      f"layout (n={layout.n}, rows_p={layout.rows_p}, cols_p={layout.cols_p})"
    )
  if _offset_input(layout) and w_colsum is None:
    raise ValueError("simulate_levels: the offset input scheme needs w_colsum")
  if noise is not None and (prog_key is None or read_key is None):
    raise ValueError("simulate_levels: noise needs prog_key and read_key")


def _offset_input(layout: Layout) -> bool:
  """Whether the layer's signed input is applied with the ``"offset"`` scheme."""
  return layout.signed_input and layout.cfg.input_scheme == "offset"


def _programmed_tiles(
  levels: Array, w_bits: Any, layout: Layout, noise: NoiseConfig | None, prog_key: Array | None
) -> Array:
  """``[R, tr, ne, cols_p]`` float32: the cells as programmed (with programming noise)."""
  if noise is not None:
    levels = noise_lib.program_levels(levels, column_level_max(w_bits, layout), noise, prog_key)
    # Materialise the programmed conductances once (otherwise XLA may fuse the random draws
    # into the contraction and recompute them for every block of tokens).
    levels = jax.lax.optimization_barrier(levels)
  return split_row_tiles(levels.astype(jnp.float32), layout, axis=-2)


def _map_token_blocks(
  block: Callable[[Array, Array | None], Array], x: Array, read_key: Array | None, blk: int, m: int
) -> Array:
  """Runs ``block`` on ``x [R, T, n]`` in blocks of ``blk`` tokens (``lax.map``; one when it fits).

  Block ``i`` gets the read key ``fold_in(read_key, i)``; a single block gets ``read_key``.

  Returns:
    ``[R, T, m]``, the blocks' outputs concatenated.
  """
  r, t, n = x.shape
  if t <= blk:
    return block(x, read_key)
  nb = -(-t // blk)
  xp = jnp.pad(x, ((0, 0), (0, nb * blk - t), (0, 0)))
  xs = jnp.moveaxis(xp.reshape(r, nb, blk, n), 1, 0)
  idx = jnp.arange(nb)

  def body(args):
    xb, i = args
    return block(xb, None if read_key is None else jax.random.fold_in(read_key, i))

  out = jax.lax.map(body, (xs, idx))  # [nb, R, blk, m]
  return jnp.moveaxis(out, 0, 1).reshape(r, nb * blk, m)[:, :t]


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
  _check_operands(x, levels, layout, w_colsum, noise, prog_key, read_key)
  adc_bits = layout.cfg.adc_bits
  lv = _programmed_tiles(levels, w_bits, layout, noise, prog_key)  # [R, tr, ne, cols]
  cyc = cycle_coeffs(a_bits, layout)  # [C]
  if adc_bits is not None:
    lo, hi = adc_bounds(w_bits, a_bits, layout, adc_frac)  # [C, cols]

  def block(xb: Array, bkey: Array | None) -> Array:
    ps = _partial_sums(xb, lv, a_bits, layout)  # [R, tr, Tb, C, cols]
    if noise is not None:
      ps = noise_lib.read_column_sums(ps, noise, bkey)
    ps = jnp.round(ps) if adc_bits is None else adc_convert(ps, lo, hi, adc_bits)
    acc_cols = (ps.astype(jnp.int32) * cyc[:, None]).sum(axis=(1, 3))  # [R, Tb, cols]
    return combine_columns(acc_cols, w_bits, layout)  # [R, Tb, m] int32

  per_token = max(1, x.shape[0] * layout.row_tiles * layout.cycles * layout.cols_p)
  out = _map_token_blocks(block, x, read_key, max(1, block_elems // per_token), layout.m)
  if _offset_input(layout):
    out = out - jnp.left_shift(1, as_i32(a_bits) - 1) * w_colsum.astype(jnp.int32)[:, None, :]
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
  lv = split_row_tiles(levels.astype(jnp.float32), layout, axis=-2)
  ps = _partial_sums(x, lv, a_bits, layout)
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
  colsum = round_i32(w).sum(axis=-2) if (signed_input and cfg.input_scheme == "offset") else None
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


__all__ = ["adc_utilisation", "crossbar_mvm", "int_matmul", "simulate_levels"]
