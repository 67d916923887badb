"""Search state and its checkpoints (orbax), for exact resumption.

The whole state of a search is one pytree, :class:`LoopState`: the agent's state (parameters,
optimiser state, replay buffer, ...), the evaluation :class:`~cimjax.search.env.History`
(every evaluated policy with its accuracy, cost and reward: the cache and the budget counter),
the iteration, the stall counter, the done flag and the PRNG key. Iteration ``t`` draws its keys
from ``fold_in(key, t)``, so restoring a checkpoint and continuing gives exactly the run that
was never interrupted.

Checkpoints go through :class:`cimjax.checkpoint.Checkpointer` (orbax ``CheckpointManager``,
synchronous: a step directory appears only when complete) with the search's JSON metadata
(configuration, reference accuracy, timings) next to the arrays.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from cimjax import checkpoint as ckpt_lib
from cimjax.search.env import History


class LoopState(NamedTuple):
  """Everything a search needs to continue.

  Attributes:
    agent: the agent's state pytree.
    history: the evaluation history (cache + budget counter).
    iteration: int32 iterations done.
    stall: int32 consecutive iterations without a new evaluation.
    done: bool, the search has stopped (budget spent, stalled or out of iterations).
    key: uint32 ``[2]`` the run's PRNG key.
  """

  agent: Any
  history: History
  iteration: Any
  stall: Any
  done: Any
  key: Any


class SearchCheckpointer:
  """Saves and restores :class:`LoopState` (plus JSON metadata) in ``directory``.

  Args:
    directory: checkpoint directory (created if needed).
    max_to_keep: checkpoints kept.
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2):
    self._ck = ckpt_lib.Checkpointer(directory, max_to_keep=max_to_keep)
    self.directory = self._ck.directory

  def latest_iteration(self) -> int | None:
    """Iteration of the newest checkpoint, or None."""
    return self._ck.latest_step()

  def save(self, state: LoopState, meta: dict[str, Any]) -> None:
    """Saves ``state`` under its iteration (synchronously; overwrites the same iteration)."""
    host = jax.tree.map(np.asarray, jax.device_get(state))
    self._ck.save(int(host.iteration), host, dict(meta))

  def restore(
    self, target: LoopState, iteration: int | None = None
  ) -> tuple[LoopState, dict[str, Any]]:
    """Restores the newest (or the given) checkpoint into the structure of ``target``."""
    tree, meta = self._ck.restore(jax.tree.map(np.asarray, target), iteration)
    return LoopState(*tree) if not isinstance(tree, LoopState) else tree, meta

  def restore_intact(self, target: LoopState) -> tuple[LoopState, dict[str, Any]] | None:
    """The newest checkpoint that reads back intact (corrupt ones: one warning line each,
    skipped), or None when none is left (:meth:`cimjax.checkpoint.Checkpointer.restore_intact`).
    """
    out = self._ck.restore_intact(jax.tree.map(np.asarray, target))
    if out is None:
      return None
    _, tree, meta = out
    return LoopState(*tree) if not isinstance(tree, LoopState) else tree, meta

  def has_checkpoints(self) -> bool:
    """Whether any checkpoint (intact or not) is on disk."""
    return bool(self._ck.all_steps())

  def close(self) -> None:
    self._ck.close()


__all__ = ["LoopState", "SearchCheckpointer"]
