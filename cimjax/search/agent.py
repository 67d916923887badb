"""The interface every search agent implements (optax-style pairs of pure functions).

An :class:`Agent` is a NamedTuple of pure, jittable functions over a pytree state:

- ``init(key) -> state``;
- ``ask(state, key) -> (policies int32 [P, L, 2], aux)``: the next candidates (``P`` is the
  agent's static population; DDPG and CIM-AQ evaluate one per episode);
- ``tell(state, policies, out, aux, key) -> (state, metrics)``: learn from the scored
  candidates, ``out`` an :class:`~cimjax.search.env.EvalOut` (``reward``, ``valid``,
  ``accuracy``, ``cost_ratio``, ``new`` per candidate); invalid ones (over budget) must be
  ignored.

The search loop (:mod:`cimjax.search.runner`) owns the environment, the budget counter and the
keys: iteration ``t`` uses ``fold_in(key, t)`` split into the ask and tell keys, so a run is a
pure function of its seed and resumes exactly from a checkpoint of the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from cimjax.optim import standard_promotion

PyTree = Any


class Agent(NamedTuple):
  """A search agent.

  Attributes:
    name: ``"pg"``, ``"ddpg"``, ``"random"``, ``"exhaustive"``.
    population: candidates per ``ask``.
    init: ``key -> state``.
    ask: ``(state, key) -> (policies [P, L, 2], aux)``.
    tell: ``(state, policies, out: EvalOut, aux, key) -> (state, metrics dict)``.
    config: JSON-ready hyperparameters (for reports and checkpoints).
  """

  name: str
  population: int
  init: Callable[[jax.Array], PyTree]
  ask: Callable[[PyTree, jax.Array], tuple[jax.Array, PyTree]]
  tell: Callable[..., tuple[PyTree, dict[str, jax.Array]]]
  config: dict[str, Any]


def iteration_keys(key: jax.Array, iteration: Any) -> tuple[jax.Array, jax.Array]:
  """The (ask, tell) keys of iteration ``iteration`` (jittable; iteration may be traced)."""
  k = jax.random.fold_in(key, iteration)
  return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


__all__ = ["Agent", "iteration_keys", "standard_promotion"]
