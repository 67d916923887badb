"""CIM-AQ's reward (docs/architecture.md, section 3), as pure array functions.

With ``acc_t = acc_int8 - allowed_drop`` (percentage points) and
``cost_ratio = cost(policy) / cost(8/8)``::

  reward = -10 * (acc_t - acc)                               if acc <  acc_t
  reward = 100 * (1 / cost_ratio - 1) + 0.1 * (acc - acc_t)  otherwise

``100 * (1 / cost_ratio - 1)`` is 100 x (speedup - 1) for a latency table. The reward jumps by
about that much at the threshold; the agents here see it through rank-based utilities (PG) or
as is (DDPG, as in the reference).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

Array = Any
BELOW_SCALE = 10.0  # reward per point below the target
SPEED_SCALE = 100.0  # reward per unit of (1 / cost_ratio - 1)
ABOVE_SCALE = 0.1  # reward per point above the target


def accuracy_target(acc_ref: float, acc_drop: float) -> float:
  """``acc_t = acc_ref - acc_drop`` (both in percent / percentage points)."""
  return float(acc_ref) - float(acc_drop)


def reward(
  acc: Array, cost_ratio: Array, acc_target: Array, xp: Any = jnp, speedup: Array | None = None
) -> Array:
  """CIM-AQ's episode reward.

  Args:
    acc: ``[...]`` accuracy in percent.
    cost_ratio: ``[...]`` ``cost(policy) / cost(baseline)`` (> 0).
    acc_target: scalar or ``[...]`` target accuracy in percent.
    xp: ``jax.numpy`` (jittable, float32) or ``numpy`` (exact float64).
    speedup: optional ``1 / cost_ratio`` computed directly as ``baseline / cost`` (one
      rounding instead of two).

  Returns:
    ``[...]`` rewards.
  """
  acc = xp.asarray(acc)
  cost_ratio = xp.asarray(cost_ratio)
  acc_target = xp.asarray(acc_target, dtype=acc.dtype)
  below = -BELOW_SCALE * (acc_target - acc)
  inv = 1.0 / cost_ratio if speedup is None else xp.asarray(speedup)
  above = SPEED_SCALE * (inv - 1.0) + ABOVE_SCALE * (acc - acc_target)
  return xp.where(acc < acc_target, below, above)


def feasible(acc: Array, acc_target: Array, xp: Any = jnp) -> Array:
  """bool ``[...]``: ``acc >= acc_t`` (the policy meets the accuracy target)."""
  acc = xp.asarray(acc)
  return acc >= xp.asarray(acc_target, dtype=acc.dtype)


def reference_reward(acc: float, cost_ratio: float, acc_target: float) -> float:
  """The reward of one candidate in plain Python floats (for reports and hand checks)."""
  if acc < acc_target:
    return -BELOW_SCALE * (acc_target - acc)
  return SPEED_SCALE * (1.0 / cost_ratio - 1.0) + ABOVE_SCALE * (acc - acc_target)


__all__ = ["accuracy_target", "feasible", "reference_reward", "reward"]
