"""Weights to cell levels: bit slicing, mapping and the digital recombination of columns.

A signed integer matrix ``w [n, m]`` becomes a physical matrix of cell levels
(:func:`slice_levels`) in the layout of the mapping (``of``, ``dc``, ``dr``; see
:mod:`cimjax.crossbar`); :func:`combine_columns` shifts and adds the physical columns' results
back into the ``m`` outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.crossbar.layout import Layout, as_i32, num_slices

Array = jax.Array


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
  bits_s = jnp.clip(as_i32(w_bits) - c * s, 0, c)
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
  used = s < num_slices(as_i32(w_bits), c)
  cs = jnp.where(used, jnp.left_shift(1, c * s), 0)  # [S]
  mapping = layout.cfg.mapping
  if mapping == "dc":
    sign = jnp.array([1, -1], jnp.int32)
    return (cs[None, :, None] * sign[None, None, :] * jnp.ones((m, 1, 1), jnp.int32)).reshape(-1)
  main = jnp.broadcast_to(cs[None, :], (m, s_alloc)).reshape(-1)
  if mapping == "dr":
    return main
  corr = -jnp.left_shift(1, as_i32(w_bits) - 1)
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


__all__ = ["column_coeffs", "column_level_max", "combine_columns", "slice_levels"]
