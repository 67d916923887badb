"""A streaming input pipeline (grain) for training data that does not fit in host memory.

:func:`open_stream` scans an image folder (class-per-subfolder, the layouts and decoding of
:mod:`cimjax.data.folder`) or array files (``.npy`` files are memory-mapped; an ``.npz`` archive
is read into memory, so use ``.npy`` files for large arrays) without decoding the training
images, and returns a :class:`TrainStream`; its :meth:`TrainStream.iterator` yields the batches
of training steps, decoded and augmented by ``grain`` (``MapDataset`` over step indices ->
``to_iter_dataset(ReadOptions)`` -> ``mp_prefetch(MultiprocessingOptions)``; ``workers=0``
decodes in the training process).

Contracts:

* **Order.** Step ``s`` is batch ``s % spe`` of epoch ``s // spe`` (``spe`` = full global batches
  an epoch, the remainder dropped). The epoch's order is
  :func:`cimjax.data.epoch_permutation` ``(seed, epoch, n)``, a pure function of
  ``(seed, epoch)``, and a global batch holds the sorted slots ``perm[b*G:(b+1)*G]``: exactly the
  batches of :func:`cimjax.data.train_batches` over the same images. Nothing depends on the
  number of workers, threads, devices or hosts.
* **Batches.** The global batch ``G`` (``config.batch_size``) = per-device batch x local devices
  x processes. Host ``p`` of ``P`` (``jax.process_index()`` / ``jax.process_count()``, or a
  ``grain.sharding.ShardOptions``) takes rows ``[p*G/P, (p+1)*G/P)`` of every global batch:
  the hosts' shards of a step are disjoint and together are the whole global batch. The
  training loop places a host's rows on its local devices (``NamedSharding`` over ``data``).
* **Augmentation.** Training: random resized crop (area 8..100 %, aspect 3/4..4/3, the
  torchvision recipe, centre-crop fallback) to ``crop_size`` and a horizontal flip with
  probability 1/2; its randomness is ``default_rng([seed, epoch, example])``, so it is
  deterministic and independent of the workers. Evaluation: resize the shorter side to
  ``resize_size`` then centre-crop ``crop_size`` (ImageNet defaults 256 -> 224). With
  ``augment=False`` training uses the evaluation transform; with ``crop_size = resize_size =``
  the images' own side it is the identity (and the stream equals the in-memory batches).
* **Normalisation.** ``(x - mean) / std`` per channel on 0..1 pixels: ``"data"`` statistics of
  a fixed sample of ``stats_images`` training images (all of them: the in-memory statistics),
  or ``"imagenet"`` (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
* **Splits.** As :func:`cimjax.data.assemble`: the same seeded permutations hold out test and
  val from a pool (or use the ``val/`` and ``test/`` parts). Only the train split streams; val
  and test are decoded into memory with the evaluation transform (bound them with
  ``val_size`` / ``test_size``), as the search and the evaluations need arrays.
* **Bad images.** An unreadable training image (found when decoded, as the stream cannot know
  beforehand) is replaced by the next readable one of the epoch's permutation, deterministically,
  and counted (:attr:`StreamIterator.skipped`; one warning line per new image); with
  ``on_bad_image="error"`` the iterator raises a :class:`cimjax.data.BadImageError` naming the
  file. In val/test it is left out and counted, as in memory.
* **Resume.** :meth:`StreamIterator.get_state` is a JSON dict (grain's iterator state plus the
  step it belongs to); :meth:`TrainStream.iterator` given it continues with exactly the batches
  that followed. The state is the same on every host (host 0's is the one checkpointed).

Host memory, bounded whatever the dataset size (B_l = G / P rows a host, S = ``crop_size``,
C channels; ``batch_bytes = B_l * S * S * C * 4`` for the float32 images plus ``B_l * 16`` for
labels and bad-image ids; ``decode_bytes`` = one decoded full-size image, H * W * C bytes)::

  workers == 0:  (prefetch + threads) * batch_bytes + threads * decode_bytes
  workers  > 0:  workers * ((2 * prefetch + threads) * batch_bytes + threads * decode_bytes)
                 + workers * prefetch * batch_bytes   (batches in the queues to the trainer)
  plus always:   2 * n * 8 bytes (cached epoch permutations) + the file list (~100 B/image)
                 + the val/test arrays and the calibration sample (val+test+sample) * S*S*C*4
                 + each worker's Python/NumPy/Pillow runtime (~150 MB a worker process)

Example, ImageNet (n = 1.28 M, G = 256 on one host, S = 224, workers = 8, prefetch = 2,
threads = 1): batch_bytes = 154 MB, so at most 8 * (3 * 2 + 1) * 154 MB = 8.6 GB of batches
(prefetch=1: 4.9 GB), plus 20 MB of permutations and ~130 MB of file names, whatever n.

Small data keeps the fast in-memory path (:func:`cimjax.data.train_batches`); the stream is
chosen by ``train.data.stream = True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from cimjax.data.arrays import read_arrays
from cimjax.data.assemble import LoadOptions, check_labels
from cimjax.data.batches import _seed_words, epoch_permutation
from cimjax.data.folder import scan_folder
from cimjax.data.images import to_float
from cimjax.data.source import ON_BAD_IMAGE, SKIPPED_SHOWN, ArraySource, BadImageError, Source
from cimjax.data.splits import STD_FLOOR, Dataset, Splits, channel_stats, check_size
from cimjax.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE = ("data", "imagenet")
STREAM_SOURCES = ("folder", "npy", "npz")
STATE_VERSION = 1
_MAX_SUBSTITUTES = 64  # readable images tried in place of an unreadable one


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How the stream decodes, augments and prefetches (the ``train.data`` fields of the names).

  Attributes:
    workers: grain worker processes decoding batches (0: in the training process).
    prefetch: batches each worker (or the in-process reader) buffers ahead.
    threads: decoding threads in each worker (grain ``ReadOptions.num_threads``; >= 1).
    augment: random resized crop + horizontal flip for training (else the eval transform).
    crop_size: the side of the images the model sees (pixels).
    resize_size: evaluation: the shorter side is resized to this before the centre crop.
    min_scale: smallest crop area (fraction of the image) of the random resized crop.
    normalize: ``"data"`` (statistics of a training sample) or ``"imagenet"``.
    stats_images: training images the ``"data"`` statistics are computed from.
    channels: output channels (0: those of the first training image; a grey image is
      repeated to colour).
    on_bad_image: ``"skip"`` (replace and count) or ``"error"``.
  """

  workers: int = 0
  prefetch: int = 2
  threads: int = 1
  augment: bool = True
  crop_size: int = 224
  resize_size: int = 256
  min_scale: float = 0.08
  normalize: str = "data"
  stats_images: int = 1000
  channels: int = 0
  on_bad_image: str = "skip"

  def validate(self) -> None:
    """Raises DataError naming the first bad field (``train.data.<field>``) and what is allowed."""
    ints = {"workers": 0, "prefetch": 1, "threads": 1, "crop_size": 1, "resize_size": 1}
    ints.update(stats_images=1, channels=0)
    for f, lo in ints.items():
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise DataError(f"train.data.{f}={v!r}; allowed: an integer >= {lo}")
    if self.resize_size < self.crop_size:
      raise DataError(
        f"train.data.resize_size={self.resize_size}; allowed: >= crop_size ({self.crop_size})"
      )
    if not isinstance(self.augment, (bool, np.bool_)):
      raise DataError(f"train.data.augment={self.augment!r}; allowed: True or False")
    if not isinstance(self.min_scale, (int, float)) or not 0 < self.min_scale <= 1:
      raise DataError(f"train.data.min_scale={self.min_scale!r}; allowed: 0 < min_scale <= 1")
    if self.normalize not in NORMALIZE:
      raise DataError(f"train.data.normalize={self.normalize!r}; allowed: {', '.join(NORMALIZE)}")
    if self.on_bad_image not in ON_BAD_IMAGE:
      raise DataError(
        f"train.data.on_bad_image={self.on_bad_image!r}; allowed: {', '.join(ON_BAD_IMAGE)}"
      )


# ----------------------------------------------------------------------------- geometry


def random_resized_crop_box(
  h: int, w: int, rng: np.random.Generator, min_scale: float = 0.08
) -> tuple[float, float, float, float]:
  """The crop of a random resized crop (torchvision's recipe), as a Pillow box.

  Args:
    h: image height (pixels).
    w: image width (pixels).
    rng: the example's generator.
    min_scale: smallest crop area as a fraction of the image.

  Returns:
    ``(left, top, right, bottom)`` in pixels: 10 tries of an area in ``[min_scale, 1]`` and a
    log-uniform aspect ratio in ``[3/4, 4/3]``, else the largest centred crop of aspect within
    that range.
  """
  area = float(h * w)
  lo, hi = math.log(3 / 4), math.log(4 / 3)
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    ratio = math.exp(rng.uniform(lo, hi))
    cw = int(round(math.sqrt(target * ratio)))
    ch = int(round(math.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return (left, top, left + cw, top + ch)
  ratio = w / h
  if ratio < 3 / 4:
    cw, ch = w, int(round(w / (3 / 4)))
  elif ratio > 4 / 3:
    ch, cw = h, int(round(h * (4 / 3)))
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return (left, top, left + cw, top + ch)


def center_crop_box(h: int, w: int, resize: int, crop: int) -> tuple[float, float, float, float]:
  """Resize-shorter-side-to-``resize`` then centre-crop ``crop``, as a box in the original.

  Returns:
    ``(left, top, right, bottom)`` in original pixels (floats): the square of side
    ``crop * min(h, w) / resize`` centred in the image.
  """
  side = crop * min(h, w) / resize
  top, left = (h - side) / 2.0, (w - side) / 2.0
  return (left, top, left + side, top + side)


def crop_resize(img: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """The ``box`` of ``img`` resized (bilinear, Pillow) to ``[size, size, C]``.

  Args:
    img: ``[H, W, C]`` uint8 (resized as is) or another dtype (resized in float32).
    box: ``(left, top, right, bottom)`` in pixels.
    size: the output side.

  Returns:
    ``[size, size, C]`` of ``img``'s dtype for uint8, float32 otherwise; ``img`` itself when the
    box is the whole image and already ``size x size``.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = img.shape[:2]
  if tuple(box) == (0, 0, w, h) and (h, w) == (size, size):
    return img
  box = tuple(float(b) for b in box)
  if img.dtype == np.uint8 and img.shape[-1] in (1, 3):
    src = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out = np.asarray(src.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out[..., None] if out.ndim == 2 else out
  chans = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR, box=box
      ),
      np.float32,
    )
    for c in range(img.shape[-1])
  ]
  return np.stack(chans, axis=-1)


def example_rng(seed: Sequence[int], epoch: int, example: int) -> np.random.Generator:
  """The augmentation generator of one example: a pure function of (seed, epoch, example)."""
  return np.random.default_rng([*seed, 0xA06, int(epoch), int(example)])


# ----------------------------------------------------------------------------- sources


class NpyArraySource:
  """A :class:`cimjax.data.Source` over a memory-mapped ``.npy`` image file (opened lazily in
  each process, so pickling it to a worker copies the path, not the pixels).

  Args:
    path: the ``[N, H, W]`` or ``[N, H, W, C]`` images.
    labels: ``[N]`` labels (held in memory).
  """

  def __init__(self, path: str | os.PathLike[str], labels: np.ndarray):
    self.path = str(path)
    self.labels = np.asarray(labels)
    self._images: np.ndarray | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self.path, "labels": self.labels, "_images": None}

  @property
  def images(self) -> np.ndarray:
    if self._images is None:
      try:
        self._images = np.load(self.path, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise DataError(f"{self.path}: cannot read the array file ({e})") from None
    return self._images

  @property
  def num_examples(self) -> int:
    return int(len(self.labels))

  def get(self, i: int) -> tuple[np.ndarray, int]:
    return np.asarray(self.images[i]), int(self.labels[i])

  def describe(self, i: int) -> str:
    return f"{self.path}[{i}]"


@dataclasses.dataclass(frozen=True, eq=False)
class StreamParts:
  """The parts of a source, scanned but not decoded.

  Attributes:
    name: the dataset name (``folder:<name>``, ``npy:<name>``).
    where: the folder or file, for messages.
    parts: ``"train"`` and optionally ``"val"``, ``"test"`` sources.
    labels: int64 ``[N]`` checked labels of each part.
    class_names: one name a class, or empty.
    info: the source summary.
  """

  name: str
  where: str
  parts: dict[str, Source]
  labels: dict[str, np.ndarray]
  class_names: tuple[str, ...]
  info: dict[str, Any]


_ARRAY_KEYS = {"train": ("x_train", "y_train"), "val": ("x_val", "y_val")}
_ARRAY_KEYS["test"] = ("x_test", "y_test")


def scan_arrays(path: str | os.PathLike[str], kind: str) -> StreamParts:
  """The parts of an array source (layouts of :mod:`cimjax.data.arrays`), ``.npy`` mapped.

  Raises:
    DataError: a missing file or key, naming it.
  """
  p = Path(path)
  if p.is_file() and p.suffix == ".npy":
    p = p.parent
  if kind == "npy" or p.is_dir():
    if not p.is_dir():
      raise DataError(f"{p}: folder not found (expected a folder of .npy files)")
    files = {f.stem: f for f in sorted(p.glob("*.npy"))}
    read = lambda k: np.load(files[k], allow_pickle=False)
    keys = set(files)
  else:
    _, arrays = read_arrays(p)
    files, keys = {}, set(arrays)
    read = arrays.__getitem__
  layout = dict(_ARRAY_KEYS) if "x_train" in keys else {"train": ("images", "labels")}
  if layout["train"][0] not in keys or layout["train"][1] not in keys:
    raise DataError(
      f"{p}: expected x_train and y_train (optionally x_val/y_val, x_test/y_test), or images "
      f"and labels; found {', '.join(sorted(keys)) or 'nothing'}"
    )
  parts: dict[str, Source] = {}
  labels = {}
  for part, (xk, yk) in layout.items():
    if xk not in keys and yk not in keys:
      continue
    if xk not in keys or yk not in keys:
      raise DataError(f"{p}: has {xk if xk in keys else yk} but no {yk if xk in keys else xk}")
    y = check_labels(read(yk), f"{p}:{yk}")
    if xk in files:
      src: Source = NpyArraySource(files[xk], y)
    else:
      src = ArraySource(read(xk), y, f"{p}:{xk}")
    if src.num_examples != len(y) or (xk in files and len(src.images) != len(y)):
      raise DataError(f"{p}:{xk}: {len(src.images)} images but {len(y)} labels")
    parts[part], labels[part] = src, y
  names: tuple[str, ...] = ()
  if "class_names" in keys:
    arr = read("class_names")
    names = tuple(s.decode() if isinstance(s, bytes) else str(s) for s in arr.tolist())
  info = {"source": "npy" if files else "npz", "path": str(p)}
  return StreamParts(f"{info['source']}:{p.name}", str(p), parts, labels, names, info)


def scan_source(kind: str, path: str | os.PathLike[str], val_folder: str = "val") -> StreamParts:
  """The parts of a ``folder``, ``npy`` or ``npz`` source (nothing decoded; ``val_folder``:
  the part a folder's ``val/`` holds, see :func:`cimjax.data.scan_folder`).

  Raises:
    DataError: another source kind, or the scanners' errors.
  """
  if kind == "folder":
    sources, classes = scan_folder(path, val_folder)
    labels = {part: np.asarray(s.labels, np.int64) for part, s in sources.items()}
    info = {"source": "folder", "path": str(path)}
    return StreamParts(f"folder:{Path(path).name}", str(path), dict(sources), labels, classes, info)
  if kind in ("npy", "npz"):
    return scan_arrays(path, kind)
  raise DataError(
    f"train.data.source={kind!r} cannot stream; allowed with stream=True: "
    f"{', '.join(STREAM_SOURCES)}"
  )


def _fraction(n: int, f: float) -> int:
  return max(1, int(round(f * n))) if f > 0 and n > 1 else 0


def _subset(n: int, size: int | None, seed: int, what: str, where: str) -> np.ndarray:
  k = check_size(n, size, what, where)
  if k == n:
    return np.arange(n)
  return np.sort(np.random.default_rng([seed, 0x7E57]).permutation(n)[:k])


def split_indices(
  counts: Mapping[str, int], opts: LoadOptions, where: str
) -> dict[str, tuple[str, np.ndarray]]:
  """Which examples of which part each split takes: :func:`cimjax.data.assemble`'s rule.

  Args:
    counts: examples of each part (``"train"``, optional ``"val"``, ``"test"``).
    opts: sizes, fractions and ``split_seed``.
    where: the source, for messages.

  Returns:
    ``{"train" | "val" | "test": (part, int64 positions in that part)}``.

  Raises:
    DataError: sizes larger than what is available, or an empty train split.
  """
  n = int(counts["train"])
  if n == 0:
    raise DataError(f"{where}: no train images")
  perm = np.random.default_rng(opts.split_seed).permutation(n)
  seed = opts.split_seed
  if "test" in counts:
    test = ("test", _subset(counts["test"], opts.test_size, seed, "test_size", where))
    pool = perm
  else:
    n_test = _fraction(n, opts.test_fraction)
    k = check_size(n_test, opts.test_size, "test_size", f"{where} (test_fraction held out)")
    test, pool = ("train", perm[:n_test][:k]), perm[n_test:]
  if "val" in counts:
    val = ("val", _subset(counts["val"], opts.val_size, seed, "val_size", where))
    rest = pool
  else:
    n_val = _fraction(n, opts.val_fraction) if opts.val_size is None else opts.val_size
    val = ("train", pool[: check_size(len(pool), n_val, "val_size", where)])
    rest = pool[len(val[1]) :]
  train = rest[: check_size(len(rest), opts.train_size, "train_size", where)]
  if len(train) == 0:
    raise DataError(f"{where}: the train split is empty ({n} images)")
  return {"train": ("train", train), "val": val, "test": test}


# ----------------------------------------------------------------------------- transform


@dataclasses.dataclass(frozen=True, eq=False)
class Transform:
  """Decodes one example and brings it to the model's input (picklable: runs in workers).

  Attributes:
    options: the stream options.
    channels: output channels.
    mean: float32 ``[C]`` normalisation mean (0..1 pixels).
    std: float32 ``[C]`` normalisation standard deviation.
  """

  options: StreamOptions
  channels: int
  mean: np.ndarray
  std: np.ndarray

  def raw(self, source: Source, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Example ``i`` as float32 ``[S, S, C]`` in 0..1: eval transform, or training
    augmentation with ``rng``.

    Raises:
      BadImageError: the image cannot be decoded (naming it).
      DataError: channels that cannot become ``channels``.
    """
    img, _ = source.get(i)
    img = np.asarray(img)
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim != 3 or not img.size:
      raise BadImageError(f"{source.describe(i)}: image of shape {img.shape}")
    o = self.options
    h, w = img.shape[:2]
    if rng is None:
      box = center_crop_box(h, w, o.resize_size, o.crop_size)
      if (h, w) == (o.crop_size, o.crop_size) and o.resize_size == o.crop_size:
        box = (0, 0, w, h)
      out = crop_resize(img, box, o.crop_size)
    else:
      out = crop_resize(img, random_resized_crop_box(h, w, rng, o.min_scale), o.crop_size)
      if rng.random() < 0.5:
        out = out[:, ::-1]
    out = to_float(np.ascontiguousarray(out), source.describe(i))
    c = out.shape[-1]
    if c != self.channels:
      if c != 1:
        raise DataError(
          f"{source.describe(i)}: an image with {c} channels in a {self.channels}-channel "
          "stream; set train.data.channels"
        )
      out = np.repeat(out, self.channels, axis=-1)
    return out

  def __call__(self, source: Source, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """:meth:`raw`, normalised: float32 ``[S, S, C]``."""
    x = self.raw(source, i, rng)
    return ((x - self.mean) / self.std).astype(np.float32, copy=False)


def _first_channels(source: Source, idx: np.ndarray) -> int:
  for i in idx[:_MAX_SUBSTITUTES]:
    try:
      img = np.asarray(source.get(int(i))[0])
    except BadImageError:
      continue
    return 1 if img.ndim == 2 else int(img.shape[-1])
  raise DataError(f"no readable image among the first train images of {source.describe(0)}")


def _decode_split(
  tf: Transform, source: Source, idx: np.ndarray, labels: np.ndarray, on_bad: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The examples ``idx`` of ``source`` decoded (eval transform, normalised): ``(images
  [n, S, S, C], labels int32 [n], skipped)``; an unreadable one is left out or raised."""
  s, c = tf.options.crop_size, tf.channels
  xs, ys, skipped = [], [], []
  for i in idx:
    try:
      xs.append(tf(source, int(i)))
    except BadImageError as e:
      if on_bad == "error":
        raise BadImageError(
          f"{e}; set train.data.on_bad_image=skip to leave unreadable images out"
        ) from None
      skipped.append(source.describe(int(i)))
      continue
    ys.append(int(labels[i]))
  x = np.stack(xs) if xs else np.zeros((0, s, s, c), np.float32)
  return x, np.asarray(ys, np.int32), skipped


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class Shard:
  """Which rows of every global batch this host loads.

  Attributes:
    index: this host (``jax.process_index()``).
    count: hosts (``jax.process_count()``).
  """

  index: int = 0
  count: int = 1


def host_shard(shard: Any = None) -> Shard:
  """This host's shard: ``shard`` (a :class:`Shard` or ``grain.sharding.ShardOptions``), or
  ``grain.sharding.ShardByJaxProcess()`` (``jax.process_index()`` of ``jax.process_count()``)."""
  if isinstance(shard, Shard):
    return shard
  if shard is None:
    import grain  # pylint: disable=g-import-not-at-top

    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return Shard(int(shard.shard_index), int(shard.shard_count))


def step_slots(
  perm: np.ndarray, batch_in_epoch: int, global_batch: int, shard: Shard
) -> np.ndarray:
  """The permutation slots of one host's rows of one global batch.

  Args:
    perm: int64 ``[n]`` the epoch's permutation.
    batch_in_epoch: the batch's position in the epoch.
    global_batch: ``G``.
    shard: this host.

  Returns:
    int64 ``[G / count]``: rows ``[index * G/count, (index+1) * G/count)`` of the sorted global
    batch ``perm[b*G:(b+1)*G]``.
  """
  rows = global_batch // shard.count
  batch = np.sort(perm[batch_in_epoch * global_batch : (batch_in_epoch + 1) * global_batch])
  return batch[shard.index * rows : (shard.index + 1) * rows]


class StepBatch:
  """The grain map ``step -> this host's batch of that step`` (picklable; runs in workers).

  Args:
    source: the train part.
    index: int64 ``[n]`` positions of the train split's examples in ``source``.
    labels: int64 ``[len(source)]`` labels of the part.
    transform: the example transform.
    seed: the data seed (uint32 words).
    global_batch: ``G``.
    shard: this host.
    augment: use the training augmentation.
  """

  def __init__(
    self,
    source: Source,
    index: np.ndarray,
    labels: np.ndarray,
    transform: Transform,
    seed: Sequence[int],
    global_batch: int,
    shard: Shard,
    augment: bool,
  ):
    self.source, self.index, self.labels = source, np.asarray(index, np.int64), labels
    self.transform, self.seed = transform, [int(s) for s in seed]
    self.global_batch, self.shard, self.augment = int(global_batch), shard, bool(augment)
    self.spe = len(self.index) // self.global_batch
    self._perms: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_perms": {}}

  def permutation(self, epoch: int) -> np.ndarray:
    """The epoch's permutation (the last two cached)."""
    if epoch not in self._perms:
      if len(self._perms) >= 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = epoch_permutation(self.seed, epoch, len(self.index))
    return self._perms[epoch]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """``{"image": float32 [G/P, S, S, C], "label": int32 [G/P], "bad": int64 [G/P]}``;
    ``bad`` holds the positions (in the train part) of unreadable images that were replaced,
    -1 elsewhere."""
    epoch, b = divmod(int(step), self.spe)
    perm = self.permutation(epoch)
    slots = step_slots(perm, b, self.global_batch, self.shard)
    xs, ys = [], []
    bad = np.full(len(slots), -1, np.int64)
    n = len(perm)
    for r, slot in enumerate(slots):
      for k in range(_MAX_SUBSTITUTES):
        ex = int(self.index[(int(slot) + k) % n])
        rng = example_rng(self.seed, epoch, ex) if self.augment else None
        try:
          xs.append(self.transform(self.source, ex, rng))
        except BadImageError as e:
          if self.transform.options.on_bad_image == "error":
            raise BadImageError(
              f"{e}; set train.data.on_bad_image=skip to leave unreadable images out"
            ) from None
          if k == 0:
            bad[r] = int(self.index[int(slot)])
          continue
        ys.append(int(self.labels[ex]))
        break
      else:
        raise DataError(
          f"{self.source.describe(ex)}: {_MAX_SUBSTITUTES} unreadable images in a row"
        )
    return {"image": np.stack(xs), "label": np.asarray(ys, np.int32), "bad": bad}


def _ensure_absl_flags() -> None:
  """grain reads absl flags in its workers; a library caller (tests) may not have parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class StreamIterator:
  """Batches of training steps from a :class:`TrainStream` (``__next__`` -> ``(images, labels)``
  of this host; :meth:`get_state` to checkpoint, :meth:`close` to stop the workers).

  Attributes:
    step: the step of the next batch.
    skipped: positions (in the train part) of the unreadable images replaced so far.
  """

  def __init__(
    self,
    stream: TrainStream,
    seed: Any,
    start_step: int = 0,
    state: Mapping[str, Any] | None = None,
    num_steps: int | None = None,
  ):
    import grain  # pylint: disable=g-import-not-at-top

    self.stream = stream
    self.seed = _seed_words(seed if isinstance(seed, int) else np.asarray(seed, np.uint32))
    base, self.step = int(start_step), int(start_step)
    grain_state = None
    if state is not None and state.get("workers") != stream.options.workers:
      logging.info(
        "the saved data state is of %s workers, this run has %d: the stream restarts at step %s "
        "(the same batches: they are a pure function of the step)",
        state.get("workers"),
        stream.options.workers,
        state.get("next_step"),
      )
      nxt = int(state.get("next_step", start_step))
      state = {**state, "base_step": nxt, "grain": None, "workers": stream.options.workers}
    if state is not None:
      self._check_state(state)
      base, self.step, grain_state = (
        int(state["base_step"]),
        int(state["next_step"]),
        state["grain"],
      )
    self.base_step = base
    self.skipped: set[int] = set(int(v) for v in (state or {}).get("skipped", []))
    end = int(num_steps) if num_steps else base + stream.steps_per_epoch * 1_000_000
    o = stream.options
    fn = StepBatch(
      stream.source,
      stream.index,
      stream.labels,
      stream.transform,
      self.seed,
      stream.global_batch,
      stream.shard,
      o.augment,
    )
    ds = grain.MapDataset.range(base, max(end, base + 1)).map(fn)
    it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=o.threads, prefetch_buffer_size=o.prefetch)
    )
    if o.workers:
      _ensure_absl_flags()
      it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=o.workers, per_worker_buffer_size=o.prefetch)
      )
    self._it = iter(it_ds)
    if grain_state:
      self._it.set_state(grain_state)

  def _check_state(self, state: Mapping[str, Any]) -> None:
    want = self._identity()
    if state.get("version") != STATE_VERSION:
      raise DataError(f"data iterator state of version {state.get('version')!r}; expected 1")
    for k, v in want.items():
      if state.get(k) != v:
        raise DataError(
          f"the saved data iterator state has {k}={state.get(k)!r} but this run has {v!r}; "
          "resume with the same data, batch size, seed, workers and hosts"
        )

  def _identity(self) -> dict[str, Any]:
    s = self.stream
    return {
      "seed": list(self.seed),
      "global_batch": s.global_batch,
      "num_examples": len(s.index),
      "process_count": s.shard.count,
      "workers": s.options.workers,
      "augment": bool(s.options.augment),
    }

  def __iter__(self) -> StreamIterator:
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    try:
      batch = next(self._it)
    except BadImageError as e:
      raise BadImageError(str(e).splitlines()[0]) from None
    except DataError:
      raise
    except StopIteration:
      raise
    except Exception as e:  # grain re-raises a worker's error; keep ours one line
      inner = _data_error_in(e)
      if inner is not None:
        raise inner from None
      raise
    self.step += 1
    new = [int(b) for b in np.asarray(batch["bad"]) if b >= 0 and int(b) not in self.skipped]
    for b in new:
      self.skipped.add(b)
      logging.warning(
        "%s: unreadable image replaced in the stream (%d so far)",
        self.stream.source.describe(b),
        len(self.skipped),
      )
    return np.asarray(batch["image"]), np.asarray(batch["label"])

  def get_state(self) -> dict[str, Any]:
    """A JSON dict: grain's iterator state and the steps it belongs to."""
    return {
      "version": STATE_VERSION,
      "base_step": self.base_step,
      "next_step": self.step,
      **self._identity(),
      "skipped": sorted(self.skipped),
      "grain": json.loads(json.dumps(self._it.get_state())),
    }

  def close(self) -> None:
    """Stops the worker processes (idempotent)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> StreamIterator:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _data_error_in(e: BaseException) -> DataError | None:
  """A DataError raised in a grain worker, found in ``e`` or its causes."""
  seen = 0
  while e is not None and seen < 10:
    if isinstance(e, DataError):
      return type(e)(str(e).splitlines()[0])
    text = str(e)
    for cls in (BadImageError, DataError):
      if cls.__name__ in text:
        line = next((ln for ln in text.splitlines() if cls.__name__ in ln), text)
        return cls(line.split(f"{cls.__name__}: ", 1)[-1].strip())
    e = e.__cause__ or e.__context__
    seen += 1
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStream:
  """The streamed train split: what :func:`cimjax.train.fit` takes in place of a Dataset.

  Attributes:
    name: the dataset name.
    source: the train part.
    index: int64 ``[n]`` positions of the train split in ``source``.
    labels: int64 labels of the train part.
    transform: the example transform (normalisation included).
    options: the stream options.
    global_batch: ``G`` images a step over all hosts and devices.
    shard: this host.
    local_devices: devices of this host the batch is split over.
  """

  name: str
  source: Source
  index: np.ndarray
  labels: np.ndarray
  transform: Transform
  options: StreamOptions
  global_batch: int
  shard: Shard
  local_devices: int = 1

  def __len__(self) -> int:
    return int(len(self.index))

  @property
  def host_batch(self) -> int:
    """Rows a host loads a step: ``G / processes``."""
    return self.global_batch // self.shard.count

  @property
  def per_device_batch(self) -> int:
    """Rows a device gets: ``G / (processes * local devices)``."""
    return self.host_batch // self.local_devices

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches an epoch (the remainder dropped)."""
    return len(self.index) // self.global_batch

  @property
  def input_shape(self) -> tuple[int, int, int]:
    s = self.options.crop_size
    return (s, s, self.transform.channels)

  def iterator(
    self,
    seed: Any,
    start_step: int = 0,
    state: Mapping[str, Any] | None = None,
    num_steps: int | None = None,
  ) -> StreamIterator:
    """This host's batches from ``start_step`` (or from a saved ``state``) to ``num_steps``."""
    return StreamIterator(self, seed, start_step, state, num_steps)

  def with_batch(self, global_batch: int, local_devices: int = 1) -> TrainStream:
    """The same stream with another global batch (checked, see :func:`check_batch`)."""
    check_batch(global_batch, self.shard.count, local_devices, len(self.index))
    return dataclasses.replace(self, global_batch=int(global_batch), local_devices=local_devices)


def check_batch(global_batch: int, processes: int, local_devices: int, n: int) -> None:
  """Raises DataError unless ``global_batch`` splits evenly over hosts and devices and fits.

  The global batch is per-device batch x local devices x processes.
  """
  parts = processes * local_devices
  if global_batch < 1 or global_batch % parts:
    raise DataError(
      f"train.batch_size={global_batch}; allowed: a multiple of {parts} (the global batch is "
      f"per-device batch x {local_devices} local devices x {processes} processes)"
    )
  if global_batch > n:
    raise DataError(
      f"train.batch_size={global_batch} is larger than the training split ({n} images); "
      f"allowed: 1..{n}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class StreamData:
  """What :func:`open_stream` returns.

  Attributes:
    stream: the streamed train split.
    splits: in-memory :class:`Splits` for everything but training: ``train`` a fixed sample
      of the train split (calibration, batch-norm re-estimation), ``val`` and ``test`` whole
      (evaluation transform, normalised like the stream).
  """

  stream: TrainStream
  splits: Splits


def open_stream(
  kind: str,
  path: str | os.PathLike[str],
  opts: LoadOptions,
  stream_opts: StreamOptions,
  *,
  global_batch: int,
  local_devices: int = 1,
  sample_images: int = 0,
  sample_seed: int = 0,
  shard: Any = None,
) -> StreamData:
  """Scans a source and builds its training stream and in-memory evaluation splits.

  Args:
    kind: ``"folder"``, ``"npy"`` or ``"npz"``.
    path: the folder or file.
    opts: sizes, fractions, ``split_seed``, ``num_classes`` (``image_size`` is unused: the
      stream's ``crop_size`` sets the side).
    stream_opts: decoding, augmentation and prefetching.
    global_batch: ``G`` images a step over every host and device.
    local_devices: this host's devices the batch is split over.
    sample_images: training images decoded into ``splits.train`` (0: ``stats_images``).
    sample_seed: seed of that sample.
    shard: this host (see :func:`host_shard`).

  Returns:
    :class:`StreamData`.

  Raises:
    DataError: bad options, a bad source, sizes that do not fit, a batch that does not split
      over the hosts and devices (naming the field).
  """
  stream_opts.validate()
  opts.validate()
  sp = scan_source(kind, path, opts.val_folder)
  where = sp.where
  counts = {part: src.num_examples for part, src in sp.parts.items()}
  split = split_indices(counts, opts, where)
  n_cls = opts.num_classes or (len(sp.class_names) if sp.class_names else None)
  if n_cls is None:
    n_cls = max(1, max(int(y.max()) + 1 for y in sp.labels.values() if len(y)))
  for part, y in sp.labels.items():
    check_labels(y, f"{where} ({part})", n_cls)
  train_src, train_idx = sp.parts["train"], split["train"][1]
  host = host_shard(shard)
  check_batch(global_batch, host.count, local_devices, len(train_idx))
  channels = stream_opts.channels or _first_channels(train_src, train_idx)
  k = min(stream_opts.stats_images, len(train_idx))
  if k == len(train_idx):
    stats_idx = train_idx
  else:
    pick = np.random.default_rng([opts.split_seed, 0x57A7]).permutation(len(train_idx))[:k]
    stats_idx = train_idx[np.sort(pick)]
  plain = Transform(
    stream_opts, channels, np.zeros(channels, np.float32), np.ones(channels, np.float32)
  )
  if stream_opts.normalize == "imagenet":
    if channels != 3:
      raise DataError(
        f"train.data.normalize='imagenet' needs 3 channels; {where} has {channels} (set "
        "train.data.channels=3 or normalize='data')"
      )
    mean, std = np.asarray(IMAGENET_MEAN, np.float64), np.asarray(IMAGENET_STD, np.float64)
    skipped_stats: list[str] = []
  else:
    x, _, skipped_stats = _decode_split(
      plain, train_src, stats_idx, sp.labels["train"], stream_opts.on_bad_image
    )
    if not len(x):
      raise DataError(f"{where}: no readable training image for the statistics")
    mean, std = channel_stats(x)
    del x
  mean32 = mean.astype(np.float32)
  std32 = np.maximum(std, STD_FLOOR).astype(np.float32)
  tf = Transform(stream_opts, channels, mean32, std32)
  stream = TrainStream(
    sp.name,
    train_src,
    train_idx,
    sp.labels["train"],
    tf,
    stream_opts,
    int(global_batch),
    host,
    int(local_devices),
  )
  # the in-memory splits: a training sample, val, test (evaluation transform)
  n_sample = min(sample_images or stream_opts.stats_images, len(train_idx))
  pick = np.sort(epoch_permutation(sample_seed + 104729, 0, len(train_idx))[:n_sample])
  skipped = list(skipped_stats)
  made = {}
  for name, (part, idx) in (
    ("train", ("train", train_idx[pick])),
    *((s, split[s]) for s in ("val", "test")),
  ):
    x, y, sk = _decode_split(tf, sp.parts[part], idx, sp.labels[part], stream_opts.on_bad_image)
    skipped += [s for s in sk if s not in skipped]
    made[name] = Dataset(images=x, labels=y, index=np.asarray(idx, np.int64)[: len(y)])
  if skipped:
    logging.warning("%s: skipped %d unreadable images (%s)", where, len(skipped), skipped[0])
  info = {
    **sp.info,
    "stream": True,
    "skipped": len(skipped),
    "skipped_paths": skipped[:SKIPPED_SHOWN],
    "num_classes": int(n_cls),
    "class_names": list(sp.class_names),
    "image_shape": list(stream.input_shape),
    "mean": [float(v) for v in mean32],
    "std": [float(v) for v in std32],
    "normalize": stream_opts.normalize,
    "sizes": {"train": len(train_idx), "val": len(made["val"]), "test": len(made["test"])},
    "train_sample": len(made["train"]),
    "global_batch": int(global_batch),
    "per_device_batch": stream.per_device_batch,
  }
  splits = Splits(
    name=sp.name,
    train=made["train"],
    val=made["val"],
    test=made["test"],
    num_classes=int(n_cls),
    mean=mean32,
    std=std32,
    class_names=tuple(sp.class_names),
    info=info,
    stream=stream,
  )
  return StreamData(stream, splits)


__all__ = [
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "NORMALIZE",
  "STREAM_SOURCES",
  "NpyArraySource",
  "Shard",
  "StepBatch",
  "StreamData",
  "StreamIterator",
  "StreamOptions",
  "StreamParts",
  "TrainStream",
  "Transform",
  "center_crop_box",
  "check_batch",
  "crop_resize",
  "example_rng",
  "host_shard",
  "open_stream",
  "random_resized_crop_box",
  "scan_source",
  "split_indices",
  "step_slots",
]
