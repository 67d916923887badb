"""Training checkpoints through orbax-checkpoint, and atomic JSON files.

One :class:`Checkpointer` per training stage directory. Each checkpoint is an orbax
``CheckpointManager`` step holding a ``Composite`` of

* ``state``: the training-state pytree (params, batch statistics, optimizer state, step, PRNG
  key), saved with ``StandardSave`` and restored exactly (dtypes kept) with ``StandardRestore``
  against an abstract target;
* ``meta``: a JSON dict (config, stage, policy, progress), saved with ``JsonSave``;
* ``data`` (only when given): the input pipeline's iterator state, a JSON dict
  (:meth:`cimjax.data.StreamIterator.get_state`, grain's state and its step), saved with
  ``JsonSave``; restored into ``meta["data_state"]``. Checkpoints without it (every one written
  before the streaming loader, and every in-memory run's) read back as before.

Saving is synchronous: a step directory appears (atomically renamed by orbax) only once it is
complete, so a run killed at any moment leaves either the previous checkpoints or a new one,
never half of one; leftover temporaries of a killed save are ignored and cleaned up. Nothing
here unpickles: orbax stores arrays with tensorstore and metadata as JSON.

Every save records a digest of the state (and one of the data state) in its metadata and every
restore checks them, so a
checkpoint whose bytes changed on disk is told apart from a good one
(:class:`CorruptCheckpointError`); :meth:`Checkpointer.restore_intact` resumes from the newest
intact one. A failed orbax restore abandons its other reads in the background; what they would
print when they finish ("Event loop is closed", "Exception ignored in <coroutine ...>",
"coroutine ... was never awaited", "Task exception was never retrieved") is dropped
(:func:`quiet_abandoned_reads`, installed on import), as it says nothing about the error
already raised.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging as logging_std
import os
import re
import sys
import warnings
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
    self,
    step: int,
    state: Any,
    meta: dict[str, Any] | None = None,
    *,
    force: bool = True,
    data: dict[str, Any] | None = None,
  ) -> None:
    """Saves ``state`` and ``meta`` (and ``data``) as checkpoint ``step`` (synchronously).

    Args:
      step: the global step (checkpoint name).
      state: the pytree to save.
      meta: JSON-serialisable metadata (config, stage, ...).
      force: overwrite an existing checkpoint of the same step.
      data: the input pipeline's iterator state (a JSON dict), or None.
    """
    step = int(step)
    if step in self._manager.all_steps():
      if not force:
        return
      self._manager.delete(step)
    meta = {**dict(meta or {}), DIGEST_KEY: tree_digest(state)}
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      meta[DATA_DIGEST_KEY] = json_digest(data)
      items["data"] = ocp.args.JsonSave(dict(data))
    args = ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items)
    try:
      self._manager.save(step, args=args, force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # tensorstore reports a full disk as a ValueError
      full = disk_full_error(e, self.directory)
      if full is None:
        raise
      raise full from None

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the latest).

    Args:
      target: a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``); its
        structure and dtypes are used.
      step: which checkpoint, or None for the latest.

    Returns:
      ``(state, meta)``; ``meta["data_state"]`` holds the data iterator state of a checkpoint
      saved with one.

    Raises:
      CheckpointError: no checkpoint, or the saved state does not match ``target``.
    """
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_like(target))}
    if self.has_data(step):
      items["data"] = ocp.args.JsonRestore()
    args = ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)
    try:
      out = self._manager.restore(int(step), args=args)
    except Exception as e:  # orbax/tensorstore raise many types
      if _is_data_loss(e):
        raise CorruptCheckpointError(
          f"{self.directory}: checkpoint {step} is corrupt ({cause(e)})"
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
    want_data = meta.pop(DATA_DIGEST_KEY, None)
    if "data" in items:
      data = dict(out.data or {})
      if want_data is not None and json_digest(data) != want_data:
        raise CorruptCheckpointError(
          f"{self.directory}: checkpoint {step} is corrupt (its data iterator state does not "
          "match the digest written with it)"
        )
      meta[DATA_STATE_KEY] = data
    return out.state, meta

  def has_data(self, step: int) -> bool:
    """Whether checkpoint ``step`` holds a data iterator state (a ``data`` item)."""
    return (self.directory / str(int(step)) / "data").exists()

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
DATA_DIGEST_KEY = "_data_sha256"
DATA_STATE_KEY = "data_state"


def json_digest(obj: Any) -> str:
  """SHA-256 of a JSON value written with sorted keys (the data state's digest)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tree_digest(tree: Any) -> str:
  """SHA-256 over a pytree's leaves (path, dtype, shape and bytes), in tree order.

  Leaves are hashed in the dtype they are restored as (64-bit NumPy arrays as 32-bit unless
  ``jax_enable_x64``), so a state's digest equals its restored copy's.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    # As restored: without jax_enable_x64 a saved float64/int64 array reads back 32-bit.
    a = np.ascontiguousarray(a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


# What orbax and tensorstore say when a checkpoint's files cannot be read back: flipped bytes
# (DATA_LOSS, a bad b-tree node), a file cut short (OUT_OF_RANGE), one that is gone (NOT_FOUND).
# A restore target that does not fit the saved tree is reported differently ("do not match",
# "not compatible with the stored shape").
_DATA_LOSS = (
  "DATA_LOSS",
  "OUT_OF_RANGE",
  "NOT_FOUND",
  "Error decoding",
  "corrupt",
  "Corrupt",
  "checksum",
  "truncated",
)


def _is_data_loss(e: BaseException) -> bool:
  text = f"{type(e).__name__}: {e}"
  return isinstance(e, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError) or any(
    k in text for k in _DATA_LOSS
  )


def _from_orbax(code: Any) -> bool:
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _abandoned_read(unraisable: Any) -> bool:
  """Whether an unraisable exception is the noise of a failed orbax restore's other reads."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  return _from_orbax(getattr(unraisable.object, "cr_code", None))  # a coroutine never finished


class _AbandonedTaskFilter(logging_std.Filter):
  """Drops asyncio's "... exception was never retrieved" about orbax's and tensorstore's reads."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    msg = record.getMessage()
    if "exception was never retrieved" not in msg:
      return True
    if f"{os.sep}orbax{os.sep}" in msg or "tensorstore" in msg:
      return False
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:  # raised in orbax's code
      if _from_orbax(tb.tb_frame.f_code):
        return False
      tb = tb.tb_next
    return True


def quiet_abandoned_reads() -> None:
  """Drops what the abandoned reads of a failed orbax restore print when they finish.

  When one array of a restore fails to read (a corrupt file, a shape that does not fit), orbax
  raises at once and leaves the other reads behind. Finishing after their event loop closed,
  or collected later, they report ``RuntimeError: Event loop is closed`` and ``Exception
  ignored in: <coroutine>`` (``sys.unraisablehook``), ``coroutine '...' was never awaited``
  (a ``RuntimeWarning``) and ``Task exception was never retrieved`` (the ``asyncio`` logger),
  in the middle of a run or after its one-line error. This drops exactly those about orbax's
  and tensorstore's work; anything else goes where it went. Idempotent.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_cimjax_quiet", False):
    return

  def hook(unraisable: Any) -> None:
    if not _abandoned_read(unraisable):
      previous(unraisable)

  hook._cimjax_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
  # CPython calls this to warn about a coroutine that was never awaited.
  warn_unawaited = getattr(warnings, "_warn_unawaited_coroutine", None)
  if warn_unawaited is not None:

    def warn(coro: Any) -> None:
      if not _from_orbax(getattr(coro, "cr_code", None)):
        warn_unawaited(coro)

    warnings._warn_unawaited_coroutine = warn  # type: ignore[attr-defined]
  logging_std.getLogger("asyncio").addFilter(_AbandonedTaskFilter())


quiet_abandoned_reads()


def disk_full_error(e: BaseException, path: str | os.PathLike[str]) -> OSError | None:
  """``OSError(ENOSPC)`` naming ``path`` when ``e`` (from orbax or tensorstore, which wrap it in
  other types) says the disk is full; None otherwise (``e`` itself is already an OSError)."""
  if isinstance(e, OSError):
    return None
  text = str(e)
  if "No space left on device" in text or "ENOSPC" in text:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  return None


def cause(e: BaseException) -> str:
  """Why an orbax restore failed, in a few words: the file orbax/tensorstore names (``cannot
  read FILE``), or the start of the message's first line."""
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
  "DATA_STATE_KEY",
  "CheckpointError",
  "Checkpointer",
  "CorruptCheckpointError",
  "tree_digest",
  "abstract_like",
  "cause",
  "disk_full_error",
  "json_digest",
  "quiet_abandoned_reads",
  "read_json",
  "write_json_atomic",
]
