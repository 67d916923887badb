"""Requantisation helpers of the digital periphery (fixed-point and float)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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


__all__ = ["fixed_point_multiplier", "requantize", "requantize_fixed"]
