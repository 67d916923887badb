"""Batch iterators: shuffled fixed-size training batches and padded evaluation batches.

:func:`epoch_batches` shuffles with a permutation that is a pure function of ``(key, epoch)``
and yields fixed-size batches, **dropping the remainder** (fewer than ``batch_size`` images an
epoch; a different permutation each epoch, so every image is used), so shapes never change and
nothing recompiles. :func:`train_batches` chains epochs from a global step, so a resumed run sees
the same batches. :func:`eval_batches` covers a split exactly once: the last batch is **padded**
to the fixed size and a boolean mask marks the real images.

The iterators only index ``Dataset.images`` and ``Dataset.labels``; a streaming source would
supply the same ``(images, labels)`` batches for the same indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from cimjax.data.splits import Dataset
from cimjax.errors import DataError


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
  "epoch_batches",
  "epoch_permutation",
  "eval_batches",
  "steps_per_epoch",
  "train_batches",
]
