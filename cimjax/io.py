"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash (or a kill) never leaves half a file: readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
  """Yields a temporary path next to ``path``; renames it onto ``path`` if the block succeeds.

  The parent folder is created if needed. On an exception the temporary file is removed and
  ``path`` is left untouched.
  """
  dest = Path(path)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
  os.close(fd)
  try:
    yield Path(tmp)
    os.replace(tmp, dest)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
  """Atomically writes ``data`` to ``path`` (flushed to disk before the rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
  """Atomically writes UTF-8 ``text`` to ``path``."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(
  path: str | os.PathLike[str],
  obj: Any,
  *,
  indent: int = 2,
  sort_keys: bool = False,
  allow_nan: bool = False,
) -> Path:
  """Atomically writes ``obj`` as JSON (numpy arrays/scalars, paths, sets converted)."""
  return write_text(
    path,
    json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_jsonable, allow_nan=allow_nan)
    + "\n",
  )


def _jsonable(obj: Any) -> Any:
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if hasattr(obj, "item"):
    return obj.item()
  if isinstance(obj, Path):
    return str(obj)
  if isinstance(obj, (set, frozenset, tuple)):
    return list(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
