"""The ADC: range of every (cycle, physical column) partial sum, conversion and step size.

Ideal (``adc_bits=None``: partial sums are rounded to integers) or ``adc_bits`` bits over the
full-scale or calibrated range; see :mod:`cimjax.crossbar` for the one- and two-sided ranges.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cimjax.crossbar.digits import digit_bounds
from cimjax.crossbar.layout import Layout
from cimjax.crossbar.levels import column_level_max

Array = jax.Array


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


__all__ = ["adc_bounds", "adc_convert", "adc_step"]
