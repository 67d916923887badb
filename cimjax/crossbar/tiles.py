"""Tiles: cutting physical matrices into ``N x M`` crossbar tiles and back.

The compiler stores the full zero-padded ``[tr, tc, N, M]`` tiles (:func:`tile_matrix`); the
simulator tiles rows only (:func:`split_row_tiles`), since every physical column is converted on
its own and the column tiling changes no partial sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.crossbar.layout import HIGHEST, Layout

Array = jax.Array


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


def split_row_tiles(a: Array, layout: Layout, axis: int) -> Array:
  """Pads ``axis`` (of length rows_p) to ``row_tiles * tile_rows`` and splits it in two."""
  axis = axis % a.ndim
  tr, ne = layout.row_tiles, layout.tile_rows
  pad = tr * ne - layout.rows_p
  if pad:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    a = jnp.pad(a, widths)
  return a.reshape(*a.shape[:axis], tr, ne, *a.shape[axis + 1 :])


__all__ = ["split_row_tiles", "tile_matrix", "tile_mvm", "untile_matrix"]
