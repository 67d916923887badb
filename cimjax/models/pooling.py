"""Max pooling with a fast gradient on XLA:CPU: :func:`max_pool_2x2`.

XLA's gradient of a max ``reduce_window`` is ``select_and_scatter``, a scalar loop on XLA:CPU
that took 35 % of the reference CNN's fp32 training step (``launch/bench_train.py``). For
non-overlapping 2x2 windows the same gradient is a few elementwise masks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _first_max_masks(x: jax.Array, y: jax.Array) -> list[jax.Array]:
  """Per 2x2 window element (row-major), whether it is the window's first maximum."""
  b, h, w, c = y.shape
  xc = x[:, : 2 * h, : 2 * w].reshape(b, h, 2, w, 2, c)
  taken = jnp.zeros(y.shape, bool)
  masks = []
  for i in (0, 1):
    for j in (0, 1):
      m = (xc[:, :, i, :, j, :] == y) & ~taken
      masks.append(m)
      taken = taken | m
  return masks


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (2, 2), (2, 2))`` with a faster, bit-identical gradient.

  XLA's gradient of ``reduce_window`` max is ``select_and_scatter``, a slow scalar loop on
  XLA:CPU. For non-overlapping windows it only places each output's cotangent at the window's
  first maximum (``ge`` selection, row-major order) and zeros elsewhere, which this gradient
  does with elementwise masks: the same values bit for bit (NaNs aside; a -0.0 cotangent lands
  as +0.0, as XLA's does except for an input that is a single window, where XLA keeps -0.0).
  """
  return nn.max_pool(x, (2, 2), (2, 2))


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  y = nn.max_pool(x, (2, 2), (2, 2))
  return y, (x, y)


def _max_pool_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
  x, y = res
  b, h, w, c = y.shape
  # select_and_scatter adds the cotangent to +0.0, so a -0.0 cotangent lands as +0.0
  nz = g != 0
  parts = [jnp.where(m & nz, g, 0.0) for m in _first_max_masks(x, y)]
  gx = jnp.stack(parts, axis=-2).reshape(b, h, w, 2, 2, c)  # [b, h, w, i, j, c]
  gx = gx.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
  pad = ((0, 0), (0, x.shape[1] - 2 * h), (0, x.shape[2] - 2 * w), (0, 0))
  return (jnp.pad(gx, pad),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


__all__ = ["max_pool_2x2"]
