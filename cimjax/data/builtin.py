"""The built-in datasets: Fashion-MNIST, its committed subset, scikit-learn digits.

* ``"fashion_mnist"``: the full Fashion-MNIST (60k train, 10k test, 28x28x1, 10 classes, MIT
  licence, Zalando), read from the IDX gzip files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``), or from the directory in
  ``$CIMJAX_DATA_DIR``, or from an explicit ``data_dir``.
* ``"fashion_mnist_subset"``: 2,000 train and 1,000 test Fashion-MNIST images committed in
  ``tests/data/fashion_mnist_subset.npz`` (200 and 100 per class), so unit tests need no
  system package. It was made from the Debian files with::

    python -c "from cimjax import data; \
               data.write_fashion_subset('tests/data/fashion_mnist_subset.npz')"

* ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 images, values 0..16 rescaled to
  0..255, kept at 8x8x1), shipped inside the scikit-learn wheel (its ``digits.csv.gz`` is read
  directly, or a copy of it in ``$CIMJAX_DATA_DIR``). It has no test file, so a fixed
  permutation (independent of ``split_seed``) holds out 297 images as its test split.

Splits: ``val`` (default 5,000 images for the full set, 400 for the subset, 200 for digits) is
held out from the train file by :func:`cimjax.data.held_out_split`; ``test`` is the test file
(``test_size``: a prefix in file order). The images stay on the 0..255 scale; the statistics
are those of the train split after padding (``image_size`` pads centred with 0, the background;
``channels=3`` repeats the grey channel, e.g. 32x32x3 for ResNet-20).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from cimjax import io
from cimjax.data.splits import Splits, check_size, held_out_split, splits_from_indices
from cimjax.errors import DataError

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "CIMJAX_DATA_DIR"
FASHION_FILES = {
  "train_images": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_images": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
SUBSET_FILE = "fashion_mnist_subset.npz"
_REPO_TEST_DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
DATASET_NAMES = ("fashion_mnist", "fashion_mnist_subset", "digits")
_INSTALL_HINT = (
  f"install it with `apt-get install dataset-fashion-mnist` or set "
  f"{DATA_DIR_ENV} to a directory holding the four Fashion-MNIST IDX .gz files"
)

# IDX type codes -> numpy dtypes (big-endian where multi-byte).
_IDX_DTYPES: dict[int, np.dtype] = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(
  path: str | os.PathLike[str], *, expected_ndim: int | None = None, expected_dtype: Any = np.uint8
) -> np.ndarray:
  """Reads an IDX file (gzip-compressed if the name ends in ``.gz``).

  IDX layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
  big-endian uint32 per dimension, then the data, row-major.

  Args:
    path: the file.
    expected_ndim: required number of dimensions (3 for images, 1 for labels), or None.
    expected_dtype: required element dtype, or None for any.

  Returns:
    The array, shaped as the header says (native byte order).

  Raises:
    DataError: missing or unreadable file, bad magic number, unexpected dtype or rank, or a
      data section shorter or longer than the header says; the message names the file.
  """
  p = Path(path)
  if not p.is_file():
    raise DataError(f"{p}: file not found; {_INSTALL_HINT}")
  try:
    if p.suffix == ".gz":
      with gzip.open(p, "rb") as f:
        raw = f.read()
    else:
      raw = p.read_bytes()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(
      f"{p}: cannot read (truncated or corrupt file: {e}); reinstall it: {_INSTALL_HINT}"
    ) from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(
      f"{p}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); {_INSTALL_HINT}"
    )
  dtype = _IDX_DTYPES[raw[2]]
  ndim = raw[3]
  if expected_dtype is not None and dtype != np.dtype(expected_dtype):
    raise DataError(f"{p}: IDX element type {dtype}, expected {np.dtype(expected_dtype)}")
  if expected_ndim is not None and ndim != expected_ndim:
    raise DataError(
      f"{p}: IDX magic {raw[:4].hex()} says {ndim} dimensions, expected {expected_ndim}"
    )
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{p}: truncated IDX header ({len(raw)} bytes); {_INSTALL_HINT}")
  dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  got = len(raw) - header
  if got != expected:
    what = "truncated" if got < expected else "has trailing bytes"
    raise DataError(
      f"{p}: {what}: header says shape {dims} ({expected} data bytes), file has "
      f"{got}; {_INSTALL_HINT}"
    )
  arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzip if the name ends in ``.gz``); for tests."""
  arr = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
  data = header + arr.tobytes()
  p = Path(path)
  if p.suffix == ".gz":
    with gzip.open(p, "wb") as f:
      f.write(data)
  else:
    p.write_bytes(data)


def fashion_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
  """The Fashion-MNIST directory: ``data_dir``, else ``$CIMJAX_DATA_DIR``, else Debian's."""
  if data_dir:
    return Path(data_dir)
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return Path(env)
  return DEFAULT_FASHION_DIR


def load_fashion_mnist_raw(
  data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads the four Fashion-MNIST IDX files.

  Args:
    data_dir: directory with the ``.gz`` files (see :func:`fashion_mnist_dir`).

  Returns:
    ``(train_images uint8 [60000, 28, 28], train_labels uint8 [60000], test_images
    [10000, 28, 28], test_labels [10000])``.

  Raises:
    DataError: a missing, truncated or corrupt file, or image/label counts that disagree.
  """
  d = fashion_mnist_dir(data_dir)
  out = {}
  for key, fname in FASHION_FILES.items():
    out[key] = read_idx(d / fname, expected_ndim=3 if key.endswith("images") else 1)
  for part in ("train", "test"):
    n_img, n_lab = len(out[f"{part}_images"]), len(out[f"{part}_labels"])
    if n_img != n_lab:
      raise DataError(f"{d}: {part} has {n_img} images but {n_lab} labels")
    if out[f"{part}_labels"].max(initial=0) >= 10:
      raise DataError(f"{d / FASHION_FILES[part + '_labels']}: labels outside 0..9")
  return out["train_images"], out["train_labels"], out["test_images"], out["test_labels"]


def subset_path() -> Path:
  """Where the committed Fashion-MNIST subset lives (``$CIMJAX_DATA_DIR`` first)."""
  env = os.environ.get(DATA_DIR_ENV)
  if env and (Path(env) / SUBSET_FILE).is_file():
    return Path(env) / SUBSET_FILE
  return _REPO_TEST_DATA / SUBSET_FILE


def write_fashion_subset(
  path: str | os.PathLike[str],
  n_train_per_class: int = 200,
  n_test_per_class: int = 100,
  seed: int = 0,
  data_dir: str | os.PathLike[str] | None = None,
) -> Path:
  """Writes a class-balanced Fashion-MNIST subset as a compressed ``.npz`` (uint8).

  Keys ``x_train [N, 28, 28]``, ``y_train [N]``, ``x_test``, ``y_test``, ``train_index``,
  ``test_index`` (positions in the original files). Images are chosen per class by a seeded
  permutation and kept in original file order.
  """
  xtr, ytr, xte, yte = load_fashion_mnist_raw(data_dir)
  rng = np.random.default_rng(seed)

  def pick(y: np.ndarray, per_class: int) -> np.ndarray:
    idx = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)]
    return np.sort(np.concatenate(idx))

  itr, ite = pick(ytr, n_train_per_class), pick(yte, n_test_per_class)
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  with io.atomic_path(p) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(
      f,
      x_train=xtr[itr],
      y_train=ytr[itr],
      x_test=xte[ite],
      y_test=yte[ite],
      train_index=itr.astype(np.int64),
      test_index=ite.astype(np.int64),
    )
  return p


def _load_subset_raw() -> tuple[np.ndarray, ...]:
  p = subset_path()
  if not p.is_file():
    raise DataError(
      f"{p}: committed Fashion-MNIST subset not found (it lives in the source "
      f"tree under tests/data/, or in ${DATA_DIR_ENV})"
    )
  try:
    with np.load(p, allow_pickle=False) as z:
      return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise DataError(f"{p}: cannot read the subset ({e})") from None


DIGITS_TEST = 297
_DIGITS_SEED = 20240601  # fixed: the digits test split does not depend on split_seed


@functools.lru_cache(maxsize=1)
def _load_digits_raw() -> tuple[np.ndarray, ...]:
  # The CSV that sklearn.datasets.load_digits reads, read directly: importing scikit-learn
  # takes seconds on a loaded 2-core machine.
  env = os.environ.get(DATA_DIR_ENV)
  path = Path(env or ".") / "digits.csv.gz"
  if not (env and path.is_file()):  # a copy in $CIMJAX_DATA_DIR, else scikit-learn's own
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
      raise DataError(
        f"the digits dataset needs scikit-learn (pip install scikit-learn) or "
        f"a copy of its digits.csv.gz in ${DATA_DIR_ENV}"
      )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
  if path.is_file():
    table = np.loadtxt(path, delimiter=",")
    raw, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
  else:  # a future layout: go through the public loader
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    d = load_digits()
    raw, target = d.images, d.target
  images = np.round(raw * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
  labels = target.astype(np.uint8)
  perm = np.random.default_rng(_DIGITS_SEED).permutation(len(labels))
  te, tr = np.sort(perm[:DIGITS_TEST]), np.sort(perm[DIGITS_TEST:])
  out = (images[tr], labels[tr], images[te], labels[te])
  for a in out:
    a.setflags(write=False)  # cached: shared between calls
  return out


DEFAULT_VAL = {"fashion_mnist": 5000, "fashion_mnist_subset": 400, "digits": 200}


def load_raw(
  name: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The raw uint8 arrays of a built-in dataset.

  Args:
    name: one of :data:`DATASET_NAMES`.
    data_dir: the Fashion-MNIST directory (``"fashion_mnist"`` only).

  Returns:
    ``(train_images uint8 [N, H, W], train_labels uint8 [N], test_images, test_labels)``.

  Raises:
    DataError: missing or corrupt files (with install instructions).
    ValueError: an unknown name.
  """
  if name == "fashion_mnist":
    return load_fashion_mnist_raw(data_dir)
  if name == "fashion_mnist_subset":
    return _load_subset_raw()  # type: ignore[return-value]
  if name == "digits":
    return _load_digits_raw()  # type: ignore[return-value]
  raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def load_builtin(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  train_size: int | None = None,
  val_size: int | None = None,
  test_size: int | None = None,
  split_seed: int = 0,
  image_size: int | None = None,
  channels: int | None = None,
) -> Splits:
  """A built-in dataset as :class:`Splits` (arguments: see :func:`cimjax.data.load_dataset`).

  Raises:
    DataError: missing data files (with install instructions) or impossible sizes.
    ValueError: unknown dataset name.
  """
  xtr, ytr, xte, yte = load_raw(name, data_dir)
  n_val = DEFAULT_VAL[name] if val_size is None else val_size
  train_idx, val_idx = held_out_split(len(ytr), n_val, train_size, seed=split_seed, name=name)
  test_idx = np.arange(check_size(len(yte), test_size, "test_size", name))
  if len(train_idx) == 0:
    raise DataError(
      f"{name}: the train split is empty (train_size={train_size}, val_size={val_size})"
    )
  where = str(fashion_mnist_dir(data_dir)) if name == "fashion_mnist" else ""
  if name == "fashion_mnist_subset":
    where = str(subset_path())
  return splits_from_indices(
    name,
    (xtr, ytr),
    (xte, yte),
    train_index=train_idx,
    val_index=val_idx,
    test_index=test_idx,
    num_classes=10,
    image_size=image_size,
    channels=channels,
    class_names=FASHION_CLASSES if name.startswith("fashion") else tuple(str(i) for i in range(10)),
    info={"source": name, "path": where},
  )


__all__ = [
  "DATASET_NAMES",
  "DATA_DIR_ENV",
  "DEFAULT_VAL",
  "DIGITS_TEST",
  "FASHION_CLASSES",
  "FASHION_FILES",
  "fashion_mnist_dir",
  "load_builtin",
  "load_fashion_mnist_raw",
  "load_raw",
  "read_idx",
  "subset_path",
  "write_fashion_subset",
  "write_idx",
]
