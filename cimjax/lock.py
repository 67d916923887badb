"""An exclusive lock on a run's workdir, so two runs never write the same checkpoints.

The lock is a file ``WORKDIR/.cimjax.lock`` holding JSON ``{"pid", "host", "start", "argv"}``,
created with ``O_CREAT | O_EXCL`` (atomic on POSIX file systems). A second run on the same
workdir finds it and raises :class:`WorkdirBusyError` naming the holder. A lock whose process
is gone (same host, the pid no longer exists) is stale: it is taken over with a warning. A lock
held from another host cannot be checked and is always respected; delete the file by hand if
that run is known to be dead. In a multi-process run only process 0 takes the lock (it is the
only writer).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from absl import logging

from cimjax.errors import WorkdirBusyError

LOCK_NAME = ".cimjax.lock"


def _holder() -> dict[str, Any]:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "start": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "argv": sys.argv,
  }


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: Path) -> dict[str, Any] | None:
  try:
    return dict(json.loads(path.read_text()))
  except (OSError, ValueError, TypeError):
    return None


def _create(path: Path) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(_holder(), f)
    f.flush()
    os.fsync(f.fileno())
  return True


def acquire(workdir: str | os.PathLike[str]) -> Path:
  """Takes the workdir's lock (creating the workdir) or raises.

  Returns:
    The lock file's path (pass it to :func:`release`).

  Raises:
    WorkdirBusyError: a live process (or one on another host) holds the lock.
    OSError: the workdir cannot be created or written (the caller reports it).
  """
  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  path = wd / LOCK_NAME
  for _ in range(3):
    if _create(path):
      return path
    info = _read(path)
    if info is None:  # being written right now, or garbage: look again shortly
      time.sleep(0.2)
      info = _read(path)
    same_host = info is not None and info.get("host") == socket.gethostname()
    if info is not None and (not same_host or _alive(int(info.get("pid", -1)))):
      raise WorkdirBusyError(
        f"workdir {str(wd)!r} is in use by process {info.get('pid')} on host "
        f"{info.get('host')} (started {info.get('start')}); wait for it or use another workdir"
      )
    logging.warning(
      "workdir %s: taking over the lock of a process that no longer runs (%s)",
      wd,
      "unreadable lock file" if info is None else f"pid {info.get('pid')}, {info.get('start')}",
    )
    with contextlib.suppress(FileNotFoundError):
      path.unlink()
  raise WorkdirBusyError(f"workdir {str(wd)!r}: could not take the lock {path}")


def release(path: str | os.PathLike[str]) -> None:
  """Removes the lock file if this process holds it."""
  p = Path(path)
  info = _read(p)
  if info is not None and info.get("pid") == os.getpid():
    try:
      p.unlink()
    except OSError as e:
      if e.errno != errno.ENOENT:
        raise


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike[str], *, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the block (no-op when ``enabled`` is False, e.g. process > 0)."""
  if not enabled:
    yield
    return
  path = acquire(workdir)
  try:
    yield
  finally:
    release(path)


__all__ = ["LOCK_NAME", "WorkdirBusyError", "acquire", "release", "workdir_lock"]
