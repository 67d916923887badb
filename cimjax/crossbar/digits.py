"""Inputs to DAC digits: input bit slicing, per-cycle digit ranges and cycle weights.

An ``a``-bit input is applied as ``ceil(a / dac_bits)`` digits, LSB first; signed inputs use
the ``"twos"`` or ``"offset"`` scheme (see :mod:`cimjax.crossbar`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cimjax.crossbar.layout import Layout, as_i32, num_cycles, round_i32

Array = jax.Array


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
  ab = as_i32(a_bits)
  xi = round_i32(x)
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
    top = k == num_cycles(as_i32(a_bits), d) - 1
    lo = jnp.where(top, -float(1 << (d - 1)), lo)
    hi = jnp.where(top, float((1 << (d - 1)) - 1), hi)
  return lo, hi


def cycle_coeffs(a_bits: Any, layout: Layout) -> Array:
  """``[C]`` int32 digital weight ``2^(k*dac_bits)`` of each cycle; 0 for unused cycles."""
  d = layout.cfg.dac_bits
  k = jnp.arange(layout.cycles, dtype=jnp.int32)
  return jnp.where(k < num_cycles(as_i32(a_bits), d), jnp.left_shift(1, d * k), 0)


__all__ = ["cycle_coeffs", "digit_bounds", "input_digits"]
