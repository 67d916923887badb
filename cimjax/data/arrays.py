"""Array files: a ``.npz`` archive, or ``.npy`` files in a folder.

Keys (``.npz``) or file stems (``.npy``, one array a file):

* ``x_train``, ``y_train`` and optionally ``x_val``/``y_val``, ``x_test``/``y_test`` (the
  layout of the shipped ``tests/data/fashion_mnist_subset.npz``), or
* ``images``, ``labels``: one pool, split by ``val_fraction``/``test_fraction`` (see
  :mod:`cimjax.data.assemble`);
* optionally ``class_names``: a 1-D string array, one name a class.

Images are ``[N, H, W]`` (grey) or ``[N, H, W, C]``, integer (uint8 0..255 -> 0..1) or float;
labels are integer class indices ``[N]``. Nothing is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from cimjax.data.assemble import LoadOptions, Part, RawData, assemble
from cimjax.data.images import prepare_array
from cimjax.data.splits import Splits
from cimjax.errors import DataError

_PART_KEYS = {
  "train": ("x_train", "y_train"),
  "val": ("x_val", "y_val"),
  "test": ("x_test", "y_test"),
}
_POOL_KEYS = ("images", "labels")
_EXPECTED = "x_train and y_train (optionally x_val/y_val, x_test/y_test), or images and labels"


def _read_npz(p: Path) -> dict[str, np.ndarray]:
  try:
    z = np.load(p, allow_pickle=False)
    if isinstance(z, np.ndarray):
      raise DataError(f"{p}: a single array, not an .npz archive of {_EXPECTED}")
    with z:
      return {k: z[k] for k in z.files}
  except DataError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(f"{p}: cannot read the array file ({e})") from None


def _read_npy_dir(d: Path) -> dict[str, np.ndarray]:
  out = {}
  for f in sorted(d.glob("*.npy")):
    try:
      arr = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f"{f}: cannot read the array file ({e})") from None
    out[f.stem] = arr
  return out


def read_arrays(path: str | os.PathLike[str]) -> tuple[Path, dict[str, np.ndarray]]:
  """The named arrays of an ``.npz`` file or of the ``.npy`` files of a folder.

  Args:
    path: an ``.npz`` file, a folder of ``.npy`` files, or one ``.npy`` file of such a folder.

  Returns:
    ``(the file or folder, {name: array})``.

  Raises:
    DataError: a missing or unreadable file (object arrays are refused).
  """
  p = Path(path)
  if p.is_file() and p.suffix == ".npy":
    p = p.parent
  if p.is_dir():
    arrays = _read_npy_dir(p)
    if not arrays:
      raise DataError(f"{p}: no .npy files (expected {_EXPECTED})")
    return p, arrays
  if not p.is_file():
    raise DataError(f"{p}: file not found (expected an .npz file or a folder of .npy files)")
  return p, _read_npz(p)


def load_arrays(path: str | os.PathLike[str], opts: LoadOptions) -> Splits:
  """An array file as :class:`Splits` (layouts: see the module docstring).

  Raises:
    DataError: naming the file: missing keys, bad shapes or dtypes, bad labels, parts of
      different image shapes, splits too small for the requested sizes.
  """
  p, arrays = read_arrays(path)
  kind = "npy" if p.is_dir() else "npz"
  layout = dict(_PART_KEYS) if "x_train" in arrays else {"train": _POOL_KEYS}
  if "x_train" not in arrays and "images" not in arrays:
    raise DataError(f"{p}: expected {_EXPECTED}; found {', '.join(sorted(arrays)) or 'nothing'}")
  parts = {}
  for part, (xk, yk) in layout.items():
    if xk not in arrays and yk not in arrays:
      continue
    for k in (xk, yk):
      if k not in arrays:
        other = yk if k == xk else xk
        raise DataError(f"{p}: has {other} but no {k}")
    where, labels_where = (
      (f"{p}:{xk}", f"{p}:{yk}") if kind == "npz" else (str(p / f"{xk}.npy"), str(p / f"{yk}.npy"))
    )
    images = prepare_array(arrays[xk], where, opts.image_size, opts.channels)
    parts[part] = Part(images, arrays[yk], where, labels_where)
  class_names: tuple[str, ...] = ()
  if "class_names" in arrays:
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
      raise DataError(f"{p}: class_names must be a 1-D string array, got {names.dtype}")
    class_names = tuple(s.decode() if isinstance(s, bytes) else str(s) for s in names.tolist())
  info = {"source": kind, "path": str(p), "skipped": 0, "skipped_paths": []}
  return assemble(RawData(f"{kind}:{p.name}", parts, class_names, info), opts)


__all__ = ["load_arrays", "read_arrays"]
