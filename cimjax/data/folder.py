"""Image folders: one subfolder a class, optionally inside ``train/``, ``val/``, ``test/``.

Layouts (``train.data.path=ROOT``)::

  ROOT/train/<class>/*.png     ROOT/<class>/*.png      (one pool: test and val are held out by
  ROOT/val/<class>/*.png                                val_fraction / test_fraction, seeded)
  ROOT/test/<class>/*.png

``val/`` (or ``validation/``) and ``test/`` are optional; without them, those splits are held
out of ``train/`` (see :mod:`cimjax.data.assemble`). ``val_folder="test"``
(``train.data.val_folder``) reads ``val/`` as the test part instead, for ImageNet's own layout
(``train/`` + ``val/``, where ``val/`` is the benchmark's evaluation set): the search's
validation split is then held out of ``train/``. Class names are the sorted subfolder names
of ``train/`` (or ``ROOT``), class ``i`` the ``i``-th; a class folder in ``val/`` or ``test/``
must also exist in ``train/``. Images (extensions :data:`cimjax.data.images.IMAGE_EXTENSIONS`,
any case, searched recursively, sorted by path; hidden files ignored) are decoded with Pillow.

An unreadable or corrupt image is left out and counted (one warning line with the count and the
first paths; ``Splits.info["skipped"]`` and ``["skipped_paths"]``), or refused with
``on_bad_image="error"``. An empty class folder, or a train class with no readable image, is
an error naming the folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from cimjax.data.assemble import LoadOptions, RawData, assemble, read_sources
from cimjax.data.images import IMAGE_EXTENSIONS, decode_image
from cimjax.data.splits import Splits
from cimjax.errors import DataError

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_LAYOUT_HINT = (
  "expected ROOT/<class>/<images> or ROOT/train/<class>/<images> (with optional val/ and test/)"
)


def _subdirs(d: Path) -> list[Path]:
  return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(d: Path) -> list[Path]:
  return sorted(
    p
    for p in d.rglob("*")
    if p.is_file()
    and p.suffix.lower() in IMAGE_EXTENSIONS
    and not any(part.startswith(".") for part in p.relative_to(d).parts)
  )


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource:
  """A :class:`cimjax.data.Source` over image files (decoded on each ``get``).

  Attributes:
    root: the folder of the part (``ROOT`` or ``ROOT/train``, ...).
    files: the image files.
    labels: int64 ``[N]`` class index of each file.
  """

  root: Path
  files: tuple[Path, ...]
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.files)

  def get(self, i: int) -> tuple[np.ndarray, int]:
    return decode_image(self.files[i]), int(self.labels[i])

  def describe(self, i: int) -> str:
    return str(self.files[i])


VAL_FOLDER_ROLES = ("val", "test")


def scan_folder(
  path: str | os.PathLike[str], val_folder: str = "val"
) -> tuple[dict[str, FolderSource], tuple[str, ...]]:
  """The parts and class names of an image folder (no image is decoded).

  Args:
    path: the folder (layouts: see the module docstring).
    val_folder: the part that ``val/`` (``validation/``) holds: ``"val"`` (the search's
      validation split) or ``"test"`` (ImageNet's layout; then no ``test/`` may exist).

  Returns:
    ``({"train": source, ["val": ...], ["test": ...]}, class_names)``.

  Raises:
    DataError: a missing folder, an unclear layout, an empty class folder, or a val/test class
      without a train folder; the message names the folder.
  """
  root = Path(path)
  if val_folder not in VAL_FOLDER_ROLES:
    raise DataError(f"val_folder={val_folder!r}; allowed: {', '.join(VAL_FOLDER_ROLES)}")
  if not root.is_dir():
    raise DataError(f"{root}: folder not found ({_LAYOUT_HINT})")
  subs = _subdirs(root)
  split_dirs = [s for s in subs if s.name in SPLIT_FOLDERS]
  if split_dirs:
    others = [s.name for s in subs if s.name not in SPLIT_FOLDERS]
    if others:
      raise DataError(
        f"{root}: mixes split folders ({', '.join(s.name for s in split_dirs)}) with other "
        f"folders ({', '.join(others)}); {_LAYOUT_HINT}"
      )
    by_part: dict[str, Path] = {}
    roles = {**SPLIT_FOLDERS, "val": val_folder, "validation": val_folder}
    for s in split_dirs:
      part = roles[s.name]
      if part in by_part and val_folder == "test" and "test" in (s.name, by_part[part].name):
        raise DataError(
          f"{root}: val_folder=test reads {'val' if s.name == 'test' else s.name}/ as the test "
          f"part, but test/ exists too; keep one, or use val_folder=val"
        )
      if part in by_part:
        raise DataError(f"{root}: both {by_part[part].name}/ and {s.name}/; keep one")
      by_part[part] = s
    if "train" not in by_part:
      raise DataError(f"{root}: has {', '.join(sorted(by_part))} but no train/; {_LAYOUT_HINT}")
  else:
    by_part = {"train": root}
  classes = tuple(d.name for d in _subdirs(by_part["train"]))
  if not classes:
    raise DataError(f"{by_part['train']}: no class subfolders; {_LAYOUT_HINT}")
  index = {c: i for i, c in enumerate(classes)}
  sources = {}
  for part, pdir in by_part.items():
    files: list[Path] = []
    labels: list[int] = []
    for cdir in _subdirs(pdir):
      if cdir.name not in index:
        raise DataError(f"{cdir}: class {cdir.name!r} has no folder in {by_part['train']}")
      imgs = _images_in(cdir)
      if not imgs:
        raise DataError(f"{cdir}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} images)")
      files += imgs
      labels += [index[cdir.name]] * len(imgs)
    sources[part] = FolderSource(pdir, tuple(files), np.asarray(labels, np.int64))
  return sources, classes


def load_folder(path: str | os.PathLike[str], opts: LoadOptions) -> Splits:
  """An image folder as :class:`Splits` (layouts and bad images: see the module docstring).

  Raises:
    DataError: naming the folder or file: see :func:`scan_folder`; an unreadable image with
      ``on_bad_image="error"``; images of different sizes without ``image_size``; a train
      class without a readable image; splits too small for the requested sizes.
  """
  root = Path(path)
  sources, classes = scan_folder(root, opts.val_folder)
  parts, skipped = read_sources(
    sources, {part: str(src.root) for part, src in sources.items()}, str(root), opts
  )
  counts = np.bincount(parts["train"].labels.astype(np.int64), minlength=len(classes))
  for c, name in enumerate(classes):
    if counts[c] == 0:
      raise DataError(
        f"{sources['train'].root / name}: no readable images (all were skipped as unreadable)"
      )
  info = {
    "source": "folder",
    "path": str(root),
    **skipped,
    "files": {part: src.num_examples for part, src in sources.items()},
  }
  return assemble(RawData(f"folder:{root.name}", parts, classes, info), opts)


__all__ = ["SPLIT_FOLDERS", "VAL_FOLDER_ROLES", "FolderSource", "load_folder", "scan_folder"]
