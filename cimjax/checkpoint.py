"""Training checkpoints through orbax-checkpoint, and atomic JSON files.

One :class:`Checkpointer` per training stage directory. Each checkpoint is an orbax
``CheckpointManager`` step holding a ``Composite`` of

* ``state``: the training-state pytree (params, batch statistics, optimizer state, step, PRNG
  key), saved with ``StandardSave`` and restored exactly (dtypes kept) with ``StandardRestore``
  against an abstract target;
* ``meta``: a JSON dict (config, stage, policy, progress), saved with ``JsonSave``.

Saving is synchronous: a step directory appears (atomically renamed by orbax) only once it is
complete, so a run killed at any moment leaves either the previous checkpoints or a new one,
never half of one; leftover temporaries of a killed save are ignored and cleaned up. Nothing
here unpickles: orbax stores arrays with tensorstore and metadata as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cimjax import io
from cimjax.errors import CheckpointError, CorruptCheckpointError  # noqa: F401 (re-exported)


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding structs of ``tree``: a restore target for this process's devices.

  Leaves that carry a sharding (live ``jax.Array``s) keep it; the others (numpy arrays,
  ``jax.eval_shape`` structs) are placed on the first local device. Orbax restores onto the
  target's shardings, so a checkpoint written on another device topology (trained on a CPU
  with 8 host devices, searched on one GPU, say) loads; without a sharding it would try the
  saved topology and fail.
  """
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def struct(x: Any) -> Any:
    y = ocp.utils.to_shape_dtype_struct(x)
    if not isinstance(y, jax.ShapeDtypeStruct) or getattr(y, "sharding", None) is not None:
      return y
    return jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=dev)

  return jax.tree.map(struct, tree)


class Checkpointer:
  """Saves and restores one stage's training state with an orbax ``CheckpointManager``.

  Args:
    directory: the stage's checkpoint directory (created if needed).
    max_to_keep: number of most recent checkpoints kept on disk.
  """

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def save(
    self, step: int, state: Any, meta: dict[str, Any] | None = None, *, force: bool = True
  ) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``step`` (synchronously).

    Args:
      step: the global step (checkpoint name).
      state: the pytree to save.
      meta: JSON-serialisable metadata (config, stage, ...).
      force: overwrite an existing checkpoint of the same step.
    """
    step = int(step)
    if step in self._manager.all_steps():
      if not force:
        return
      self._manager.delete(step)
    meta = {**dict(meta or {}), DIGEST_KEY: tree_digest(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, force=True)
    self._manager.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the latest).

    Args:
      target: a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``); its
        structure and dtypes are used.
      step: which checkpoint, or None for the latest.

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointError: no checkpoint, or the saved state does not match ``target``.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()
    )
    try:
      out = self._manager.restore(int(step), args=args)
    except Exception as e:  # orbax/tensorstore raise many types
      if _is_data_loss(e):
        raise CorruptCheckpointError(
          f"{self.directory}: checkpoint {step} is corrupt ({_first_line(e)})"
        ) from None
      if isinstance(e, ValueError | KeyError | TypeError):
        raise CheckpointError(
          f"{self.directory}: checkpoint {step} does not match the expected "
          f"training state ({type(e).__name__}: {e})"
        ) from None
      raise
    meta = dict(out.meta or {})
    want = meta.pop(DIGEST_KEY, None)
    if want is not None and tree_digest(out.state) != want:
      raise CorruptCheckpointError(
        f"{self.directory}: checkpoint {step} is corrupt (its arrays do not match the "
        "digest written with them)"
      )
    return out.state, meta

  def restore_intact(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back intact, skipping corrupt ones.

    A checkpoint whose files fail to read (bytes flipped on a bad disk, a copy cut short:
    orbax and tensorstore verify their chunks) is reported in one warning line naming its step
    and the cause, and the next older one is tried.

    Args:
      target: as in :meth:`restore`.

    Returns:
      ``(step, state, meta)`` of the newest intact checkpoint, or None when none is left
      (then the caller restarts the stage from its beginning).

    Raises:
      CheckpointError: a checkpoint reads back but does not match ``target`` (a changed model
        or config, which an older checkpoint would not fix).
    """
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(target, step)
      except CorruptCheckpointError as e:
        logging.warning("%s; trying an older one", e)
        continue
      return step, state, meta
    return None

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    """Only the JSON metadata of checkpoint ``step`` (default: the latest)."""
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    out = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta or {})

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


DIGEST_KEY = "_state_sha256"


def tree_digest(tree: Any) -> str:
  """SHA-256 over a pytree's leaves (path, dtype, shape and bytes), in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _is_data_loss(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}"
  return isinstance(e, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError) or any(
    k in text for k in ("DATA_LOSS", "corrupt", "Corrupt", "checksum", "truncated")
  )


def _first_line(e: BaseException) -> str:
  """The cause in a few words: the file orbax/tensorstore names, or the message's start."""
  text = str(e)
  files = re.findall(r'local file "([^"]+)"', text)
  if files:
    return f"cannot read {files[-1]}"
  line = (text.strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {line[:200]}"


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
  """Writes ``obj`` as indented, key-sorted JSON atomically (see :mod:`cimjax.io`)."""
  return io.write_json(path, obj, sort_keys=True, allow_nan=True)


def read_json(path: str | os.PathLike[str]) -> Any:
  """Reads a JSON file."""
  with open(path) as f:
    return json.load(f)


__all__ = [
  "CheckpointError",
  "Checkpointer",
  "CorruptCheckpointError",
  "tree_digest",
  "abstract_like",
  "read_json",
  "write_json_atomic",
]
