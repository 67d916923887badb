"""Coordination of the processes of a multi-process (``jax.distributed``) run.

Every process runs the same program on the same inputs (multi-controller JAX); these helpers
are the few places where they must agree or exchange host values. Single-process, each is the
identity (or a no-op) and needs no collective.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def is_leader() -> bool:
  """Whether this is process 0 (the one that writes the run's plain files)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op single-process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def leader_flag(value: bool) -> bool:
  """Process 0's ``value`` on every process (e.g. "this stage is finished", read from disk)."""
  if jax.process_count() == 1:
    return bool(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable ``obj``, in process order (``[obj]`` single-process).

  The values travel as UTF-8 bytes padded to the longest one.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, lengths, strict=True)]


__all__ = ["barrier", "gather_json", "is_leader", "leader_flag"]
