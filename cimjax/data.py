"""Image classification data on the host: Fashion-MNIST, scikit-learn digits, a committed subset.

Everything here is NumPy on the host; the training loop moves one batch at a time to the device.

Datasets (``load_dataset(name, ...)``):

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

Splits (:class:`Splits`): ``train`` and ``val`` come from the train file, ``val`` (the
"search-validation" split, default 5,000 images for the full set) is held out by a permutation
of the train file seeded by ``split_seed``; ``test`` is the test file, used only for final
numbers. ``train_size``/``val_size``/``test_size`` take deterministic subsets: prefixes of the
same permutation (train, val) or of the test file, so a smaller subset is contained in a larger
one. The train split never overlaps val (``Dataset.index`` holds the source-file indices).

Normalisation: per-channel mean and standard deviation of the train split (after subsetting,
after padding), applied to every split; images become float32 NHWC. Optional ``image_size``
pads the raw images (with 0, the background) centred to a larger square and ``channels=3``
repeats the grey channel, e.g. 32x32x3 for ResNet-20.

Batching: :func:`epoch_batches` shuffles with a permutation that is a pure function of
``(key, epoch)`` and yields fixed-size batches, **dropping the remainder** (fewer than
``batch_size`` images an epoch; a different permutation each epoch, so every image is used),
so shapes never change and nothing recompiles. :func:`eval_batches` covers a split exactly
once: the last batch is **padded** to the fixed size and a boolean mask marks the real images.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cimjax import io
from cimjax.errors import DataError  # noqa: F401 (re-exported)

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
_REPO_TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DATASET_NAMES = ("fashion_mnist", "fashion_mnist_subset", "digits")
_INSTALL_HINT = (
  f"install it with `apt-get install dataset-fashion-mnist` or set "
  f"{DATA_DIR_ENV} to a directory holding the four Fashion-MNIST IDX .gz files"
)

# IDX type codes -> numpy dtypes (big-endian where multi-byte).
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split held on the host.

  Attributes:
    images: float32 ``[N, H, W, C]`` normalised images.
    labels: int32 ``[N]`` class labels.
    index: int64 ``[N]`` position of each image in its source file (train or test file).
  """

  images: np.ndarray
  labels: np.ndarray
  index: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def shape(self) -> tuple[int, int, int]:
    """One image's shape ``(H, W, C)``."""
    return tuple(self.images.shape[1:])  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """Train, search-validation and test splits of one dataset.

  Attributes:
    name: dataset name.
    train: training split (from the train file).
    val: search-validation split, held out from the train file (the search and model
      selection use only this one).
    test: the test file, for final numbers only.
    num_classes: number of classes.
    mean: float32 ``[C]`` per-channel mean of the raw train split (0..255 scale).
    std: float32 ``[C]`` per-channel standard deviation of the raw train split.
  """

  name: str
  train: Dataset
  val: Dataset
  test: Dataset
  num_classes: int
  mean: np.ndarray
  std: np.ndarray

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """One image's shape ``(H, W, C)``."""
    return self.train.shape

  def __getitem__(self, split: str) -> Dataset:
    """``splits["train" | "val" | "validation" | "test"]``."""
    key = {"validation": "val", "search_val": "val"}.get(split, split)
    if key not in ("train", "val", "test"):
      raise KeyError(f"unknown split {split!r}; choose train, val or test")
    return getattr(self, key)


# ----------------------------------------------------------------------------------------------
# IDX files


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


_DEFAULT_VAL = {"fashion_mnist": 5000, "fashion_mnist_subset": 400, "digits": 200}


def _pad_and_channels(x: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
  """``[N, H, W]`` uint8 -> ``[N, S, S, C]`` uint8 (zero padding, centred; grey repeated)."""
  x = x[..., None]
  h, w = x.shape[1:3]
  if image_size:
    if image_size < max(h, w):
      raise DataError(
        f"image_size={image_size} is smaller than the images ({h}x{w}); only padding is supported"
      )
    top, left = (image_size - h) // 2, (image_size - w) // 2
    x = np.pad(x, ((0, 0), (top, image_size - h - top), (left, image_size - w - left), (0, 0)))
  if channels and channels != 1:
    x = np.repeat(x, channels, axis=-1)
  return x


def _take(n_avail: int, size: int | None, what: str, name: str) -> int:
  if size is None or size < 0:
    return n_avail
  if size > n_avail:
    raise DataError(f"{name}: {what}={size} but only {n_avail} images are available")
  return int(size)


def load_dataset(
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
  """Loads a dataset as normalised float32 NHWC train/val/test splits.

  Args:
    name: ``"fashion_mnist"``, ``"fashion_mnist_subset"`` or ``"digits"``.
    data_dir: Fashion-MNIST directory (default ``$CIMJAX_DATA_DIR`` or the Debian path).
    train_size: images in the train split (None or negative: all that remain after val).
    val_size: images held out from the train file for search validation (None: 5,000 for the
      full set, 400 for the subset, 200 for digits; 0 gives an empty val split).
    test_size: images of the test file to use (None: all; a prefix in file order).
    split_seed: seed of the permutation of the train file that separates val and train.
    image_size: pad images (centred, with the background value 0) to this square size.
    channels: repeat the grey channel this many times (e.g. 3).

  Returns:
    :class:`Splits`.

  Raises:
    DataError: missing data files (with install instructions) or impossible sizes.
    ValueError: unknown dataset name.
  """
  if name == "fashion_mnist":
    xtr, ytr, xte, yte = load_fashion_mnist_raw(data_dir)
  elif name == "fashion_mnist_subset":
    xtr, ytr, xte, yte = _load_subset_raw()
  elif name == "digits":
    xtr, ytr, xte, yte = _load_digits_raw()
  else:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
  n_val = _take(len(ytr), _DEFAULT_VAL[name] if val_size is None else val_size, "val_size", name)
  perm = np.random.default_rng(split_seed).permutation(len(ytr))
  val_idx = perm[:n_val]
  rest = perm[n_val:]
  train_idx = rest[: _take(len(rest), train_size, "train_size", name)]
  test_idx = np.arange(_take(len(yte), test_size, "test_size", name))
  if len(train_idx) == 0:
    raise DataError(
      f"{name}: the train split is empty (train_size={train_size}, val_size={val_size})"
    )

  xtr_p = _pad_and_channels(xtr[train_idx], image_size, channels)
  flat = xtr_p.reshape(-1, xtr_p.shape[-1]).astype(np.float64)
  mean = flat.mean(axis=0)
  std = np.maximum(flat.std(axis=0), 1e-6)

  def make(
    x: np.ndarray, y: np.ndarray, idx: np.ndarray, padded: np.ndarray | None = None
  ) -> Dataset:
    xp = _pad_and_channels(x[idx], image_size, channels) if padded is None else padded
    imgs = (xp.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32)
    return Dataset(
      images=np.ascontiguousarray(imgs, np.float32),
      labels=y[idx].astype(np.int32),
      index=idx.astype(np.int64),
    )

  return Splits(
    name=name,
    train=make(xtr, ytr, train_idx, xtr_p),
    val=make(xtr, ytr, val_idx),
    test=make(xte, yte, test_idx),
    num_classes=10,
    mean=mean.astype(np.float32),
    std=std.astype(np.float32),
  )


# ----------------------------------------------------------------------------------------------
# Batching


def _seed_words(key: Any) -> list[int]:
  """An int seed or a JAX PRNG key (typed or raw uint32) as a list of ints for NumPy."""
  if isinstance(key, (int, np.integer)):
    return [int(key) & 0xFFFFFFFF, (int(key) >> 32) & 0xFFFFFFFF]
  import jax  # pylint: disable=g-import-not-at-top

  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return [int(v) for v in np.asarray(key, dtype=np.uint32).reshape(-1)]


def epoch_permutation(key: Any, epoch: int, n: int) -> np.ndarray:
  """The shuffle of epoch ``epoch``: a pure function of ``(key, epoch, n)``.

  Args:
    key: an int seed or a JAX PRNG key.
    epoch: epoch number (>= 0).
    n: number of examples.

  Returns:
    int64 ``[n]`` permutation.
  """
  rng = np.random.default_rng([*_seed_words(key), 0x5EED, int(epoch)])
  return rng.permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full batches an epoch (the remainder is dropped)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if n < batch_size:
    raise DataError(f"batch_size={batch_size} is larger than the split ({n} images)")
  return n // batch_size


def epoch_batches(
  ds: Dataset, batch_size: int, key: Any, epoch: int, *, start: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled fixed-size batches of one epoch (remainder dropped).

  Args:
    ds: the split.
    batch_size: images a batch.
    key: int seed or PRNG key; the order is a pure function of ``(key, epoch)``.
    epoch: epoch number.
    start: first batch index to yield (resuming mid-epoch).

  Yields:
    ``(images float32 [batch_size, H, W, C], labels int32 [batch_size])``.
  """
  spe = steps_per_epoch(len(ds), batch_size)
  perm = epoch_permutation(key, epoch, len(ds))
  for i in range(start, spe):
    idx = np.sort(perm[i * batch_size : (i + 1) * batch_size])  # sorted: faster gather
    yield ds.images[idx], ds.labels[idx]


def train_batches(
  ds: Dataset, batch_size: int, key: Any, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless shuffled batches, epoch after epoch, from global step ``start_step``.

  Batch ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so the data
  order is a pure function of ``(key, step)`` and a resumed run sees the same batches.
  """
  spe = steps_per_epoch(len(ds), batch_size)
  epoch, start = divmod(int(start_step), spe)
  while True:
    yield from epoch_batches(ds, batch_size, key, epoch, start=start)
    epoch, start = epoch + 1, 0


def eval_batches(
  ds: Dataset, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every image exactly once, in order, in fixed-size batches (the last one padded).

  Yields:
    ``(images [batch_size, H, W, C], labels int32 [batch_size], mask bool [batch_size])``;
    padded rows repeat image 0 and have ``mask`` False.
  """
  n = len(ds)
  bs = batch_size  # always this shape, however small the split: one compilation serves all
  for lo in range(0, n, bs):
    hi = min(lo + bs, n)
    x, y = ds.images[lo:hi], ds.labels[lo:hi]
    mask = np.ones(bs, bool)
    if hi - lo < bs:
      pad = bs - (hi - lo)
      x = np.concatenate([x, np.repeat(ds.images[:1], pad, axis=0)])
      y = np.concatenate([y, np.repeat(ds.labels[:1], pad)])
      mask[hi - lo :] = False
    yield x, y, mask


__all__ = [
  "DATASET_NAMES",
  "DataError",
  "Dataset",
  "FASHION_CLASSES",
  "Splits",
  "epoch_batches",
  "epoch_permutation",
  "eval_batches",
  "fashion_mnist_dir",
  "load_dataset",
  "load_fashion_mnist_raw",
  "read_idx",
  "steps_per_epoch",
  "train_batches",
  "write_idx",
  "write_fashion_subset",
]
