"""Crossbar non-idealities: conductance variation, stuck-at faults and read noise.

All of them act on the integer model of :mod:`cimjax.crossbar` in *level units*: a cell
programmed to level ``k`` of a slice with ``2^b - 1`` levels carries conductance ``k`` steps
(level 0 is the high-resistance state and carries no current, i.e. the HRS current is taken as
cancelled or negligible), and a column sum is counted in "one level step times one input LSB".

Every non-ideality is keyed by a PRNG key, so a run is reproducible and a "chip" is a key:

- **Device-to-device variation** (``variation``): each programmed cell level is multiplied by
  ``1 + variation * z``, ``z ~ N(0, 1)`` independently per cell, and clipped at 0 (a
  conductance is never negative). Drawn once per programming (``program_levels``).
- **Stuck-at faults** (``stuck_at_0``, ``stuck_at_1``): each cell is independently stuck at the
  minimum level (0, HRS) with probability ``stuck_at_0`` or at the maximum level of its column
  (``2^b_s - 1``, LRS) with probability ``stuck_at_1``, whatever was programmed.
- **Read noise** (``read_noise``): an additive Gaussian on every analog column sum of every
  (tile, slice, input cycle, MVM), with standard deviation ``read_noise`` in column-sum units
  (one level step times one input LSB). Drawn per MVM (``read_column_sums``).
- **ADC clipping and quantization** live in :func:`cimjax.crossbar.adc_convert`.

:class:`NoiseConfig` is a hashable NamedTuple of floats. The simulator kernels take it as a
static (compile-time) argument: non-idealities whose magnitude is exactly 0 are skipped at trace
time (no random draws, which matters for read noise: one Gaussian per partial sum), and a new
magnitude compiles a new kernel. The functions below also accept traced magnitudes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class NoiseConfig(NamedTuple):
  """Magnitudes of the analog non-idealities (each may be a float or a traced scalar).

  Attributes:
    variation: relative standard deviation of programmed cell levels (device-to-device).
    stuck_at_0: probability that a cell is stuck at level 0.
    stuck_at_1: probability that a cell is stuck at its column's maximum level.
    read_noise: standard deviation of the additive Gaussian on each column sum, in units of one
      level step times one input LSB.
  """

  variation: float | Array = 0.0
  stuck_at_0: float | Array = 0.0
  stuck_at_1: float | Array = 0.0
  read_noise: float | Array = 0.0

  def is_zero(self) -> bool:
    """True when every magnitude is a concrete zero (the simulator may skip the noise)."""
    try:
      return all(float(v) == 0.0 for v in self)
    except (TypeError, jax.errors.ConcretizationTypeError):
      return False

  def to_dict(self) -> dict[str, float]:
    """The magnitudes as plain floats (for JSON reports)."""
    return {k: float(v) for k, v in self._asdict().items()}


def is_active(v: float | Array) -> bool:
  """False only for a concrete (Python or NumPy) zero: such a non-ideality is skipped.

  Traced magnitudes are always applied (their value is unknown at trace time).
  """
  if isinstance(v, (int, float, np.integer, np.floating)):
    return float(v) != 0.0
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return float(v) != 0.0
  return True


def program_levels(levels: Array, level_max: Array, noise: NoiseConfig, key: Array) -> Array:
  """Programs cells with device-to-device variation and stuck-at faults.

  Args:
    levels: ``[..., rows, cols]`` ideal cell levels (integer-valued float32).
    level_max: ``[cols]`` maximum level of each column (stuck-at-1 value), float32.
    noise: magnitudes; ``read_noise`` is not used here.
    key: PRNG key of this programming (one chip / one write).

  Returns:
    ``[..., rows, cols]`` float32 conductances in level units.
  """
  k_var, k_stuck = jax.random.split(key)
  g = levels
  if is_active(noise.variation):
    z = jax.random.normal(k_var, levels.shape, jnp.float32)
    g = jnp.maximum(levels * (1.0 + noise.variation * z), 0.0)
  if is_active(noise.stuck_at_0) or is_active(noise.stuck_at_1):
    u = jax.random.uniform(k_stuck, levels.shape, jnp.float32)
    g = jnp.where(u < noise.stuck_at_0, 0.0, g)
    g = jnp.where(u >= 1.0 - noise.stuck_at_1, jnp.broadcast_to(level_max, g.shape), g)
  return g


def read_column_sums(sums: Array, noise: NoiseConfig, key: Array) -> Array:
  """Adds read noise to analog column sums.

  Args:
    sums: column sums of any shape, in column-sum units.
    noise: magnitudes; only ``read_noise`` is used.
    key: PRNG key of this read (one MVM batch).

  Returns:
    ``sums + read_noise * N(0, 1)``, float32, same shape.
  """
  if not is_active(noise.read_noise):
    return sums
  return sums + noise.read_noise * jax.random.normal(key, sums.shape, jnp.float32)
