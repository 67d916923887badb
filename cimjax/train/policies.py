"""The policies a training stage uses: its bit mask, the extreme policies, the sampled ones.

Policy arrays, constraints and the samplers themselves live in :mod:`cimjax.policy`
(:func:`cimjax.policy.uniform_policy`, :func:`cimjax.policy.random_policies`); this module
turns a stage config's ``bits`` into the mask and derives the per-step policies of the
any-precision stage.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import policy as policy_lib
from cimjax.variables import FAST_COMPILE

Array = jax.Array


def bits_mask(
  num_layers: int,
  *,
  min_bits: int = 2,
  max_bits: int = 8,
  constraint: str = "none",
  cell_bits: int | None = None,
  table_bits: int = 8,
) -> np.ndarray:
  """Allowed (w, a) pairs ``bool [L, table_bits, table_bits]`` (see cimjax.policy.action_mask).

  Args:
    num_layers: L.
    min_bits: smallest bit-width.
    max_bits: largest bit-width (also the bits forced by the ``io`` constraint).
    constraint: ``"none"``, ``"io"``, ``"weight"`` or ``"both"``.
    cell_bits: bits per cell (``weight``/``both``); 0 or None otherwise.
    table_bits: size of the clip tables; the mask is zero-padded to it.
  """
  mask = policy_lib.action_mask(
    num_layers,
    constraint,
    cell_bits=cell_bits or None,
    min_bits=min_bits,
    max_bits=max_bits,
    io_bits=max_bits,
  )
  if mask.shape[1] < table_bits:
    pad = table_bits - mask.shape[1]
    mask = np.pad(mask, ((0, 0), (0, pad), (0, pad)))
  return mask


def extreme_policy(mask: Any, which: str = "max") -> Array:
  """Per layer the largest (``"max"``) or smallest (``"min"``) allowed w and a bits.

  Args:
    mask: bool ``[L, B, B]`` allowed pairs (each layer's set is a product of a weight set
      and an activation set).
    which: ``"max"`` or ``"min"``.

  Returns:
    int32 ``[L, 2]``.
  """
  m = np.asarray(mask, bool)
  w_ok, a_ok = m.any(axis=2), m.any(axis=1)
  bits = np.arange(1, m.shape[1] + 1)
  pick = np.max if which == "max" else np.min
  w = [pick(bits[r]) for r in w_ok]
  a = [pick(bits[r]) for r in a_ok]
  return jnp.asarray(np.stack([w, a], axis=1), jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "include_min"), compiler_options=FAST_COMPILE)
def step_policies(
  key: Array, step: Array, mask: Array, min_policy: Array, *, k: int, include_min: bool
) -> Array:
  """The any-precision stage's sampled policies of one step (compiled fast: it is tiny).

  Args:
    key: the stage's PRNG key; the draw is a pure function of ``fold_in(key, step)``.
    step: int32 scalar, the step.
    mask: bool ``[L, B, B]`` allowed pairs.
    min_policy: int32 ``[L, 2]``, appended when ``include_min``.
    k: policies drawn uniformly among the allowed pairs of each layer.
    include_min: also train the min-bits policy.

  Returns:
    int32 ``[K (+1), L, 2]``.
  """
  pols = policy_lib.random_policies(jax.random.fold_in(key, step), mask, k)
  if include_min:
    pols = jnp.concatenate([pols, min_policy[None]], axis=0)
  return pols


def policy_label(policy: Any) -> str:
  """``"float"``, ``"w{w}a{a}"`` for a uniform policy, else ``"policy"`` (metric names)."""
  if policy is None:
    return "float"
  p = np.asarray(policy)
  if (p == p[0]).all():
    return f"w{p[0, 0]}a{p[0, 1]}"
  return "policy"


__all__ = ["bits_mask", "extreme_policy", "policy_label", "step_policies"]
