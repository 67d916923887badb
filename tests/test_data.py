"""Tests of cimjax.data: IDX parsing, splits, normalisation, batching."""

import gzip
import os

import jax
import numpy as np
import pytest

from cimjax import data


def _fake_fashion_dir(tmp_path, n_train=60, n_test=20):
  rng = np.random.default_rng(0)
  d = tmp_path / "fmnist"
  d.mkdir()
  data.write_idx(
    d / data.FASHION_FILES["train_images"], rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
  )
  data.write_idx(d / data.FASHION_FILES["train_labels"], np.arange(n_train) % 10)
  data.write_idx(
    d / data.FASHION_FILES["test_images"], rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
  )
  data.write_idx(d / data.FASHION_FILES["test_labels"], np.arange(n_test) % 10)
  return d


# ---------------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
  arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  data.write_idx(tmp_path / name, arr)
  out = data.read_idx(tmp_path / name, expected_ndim=3)
  np.testing.assert_array_equal(out, arr)
  assert out.dtype == np.uint8


def test_idx_header_layout(tmp_path):
  """Bytes as the IDX spec says: 0, 0, type 0x08, ndim, big-endian uint32 dims, data."""
  p = tmp_path / "labels-idx1-ubyte"
  p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
  np.testing.assert_array_equal(data.read_idx(p, expected_ndim=1), [7, 8, 9])


def test_idx_bad_magic(tmp_path):
  p = tmp_path / "bad-idx1-ubyte"
  p.write_bytes(bytes([1, 2, 8, 1, 0, 0, 0, 1, 5]))
  with pytest.raises(data.DataError, match="bad magic"):
    data.read_idx(p)


def test_idx_wrong_rank(tmp_path):
  p = tmp_path / "labels-idx1-ubyte.gz"
  data.write_idx(p, np.zeros(5, np.uint8))
  with pytest.raises(data.DataError, match="1 dimensions, expected 3"):
    data.read_idx(p, expected_ndim=3)


def test_idx_truncated_data(tmp_path):
  p = tmp_path / "train-images-idx3-ubyte"
  data.write_idx(p, np.zeros((4, 28, 28), np.uint8))
  p.write_bytes(p.read_bytes()[:-100])
  with pytest.raises(data.DataError) as e:
    data.read_idx(p)
  msg = str(e.value)
  assert "train-images-idx3-ubyte" in msg and "truncated" in msg
  assert "apt-get install dataset-fashion-mnist" in msg and data.DATA_DIR_ENV in msg


def test_idx_truncated_gzip_stream(tmp_path):
  p = tmp_path / "t10k-images-idx3-ubyte.gz"
  data.write_idx(p, np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
  p.write_bytes(p.read_bytes()[:2000])
  with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
    data.read_idx(p)


def test_idx_trailing_bytes(tmp_path):
  p = tmp_path / "x-idx1-ubyte"
  p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]))
  with pytest.raises(data.DataError, match="trailing"):
    data.read_idx(p)


def test_missing_fashion_file_names_file_and_install(tmp_path):
  d = _fake_fashion_dir(tmp_path)
  os.remove(d / data.FASHION_FILES["test_labels"])
  with pytest.raises(data.DataError) as e:
    data.load_fashion_mnist_raw(d)
  assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
  assert "apt-get install dataset-fashion-mnist" in str(e.value)


def test_fashion_dir_from_env_and_argument(tmp_path, monkeypatch):
  d = _fake_fashion_dir(tmp_path)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(d))
  assert data.fashion_mnist_dir() == d
  s = data.load_dataset("fashion_mnist", val_size=10)
  assert (len(s.train), len(s.val), len(s.test)) == (50, 10, 20)
  monkeypatch.delenv(data.DATA_DIR_ENV)
  s2 = data.load_dataset("fashion_mnist", data_dir=d, val_size=10)
  np.testing.assert_array_equal(s.train.images, s2.train.images)


# ---------------------------------------------------------------------------------- splits


@pytest.fixture(scope="module")
def subset():
  return data.load_dataset("fashion_mnist_subset")


def test_subset_file_small_and_balanced():
  p = data.subset_path()
  assert p.stat().st_size < 2_000_000
  with np.load(p, allow_pickle=False) as z:
    assert z["x_train"].shape == (2000, 28, 28) and z["x_train"].dtype == np.uint8
    assert z["x_test"].shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(z["y_test"]), [100] * 10)


def test_subset_splits(subset):
  assert (len(subset.train), len(subset.val), len(subset.test)) == (1600, 400, 1000)
  assert subset.input_shape == (28, 28, 1)
  assert subset.train.images.dtype == np.float32 and subset.train.labels.dtype == np.int32
  assert subset["validation"] is subset.val


def test_splits_disjoint_and_deterministic(subset):
  again = data.load_dataset("fashion_mnist_subset")
  np.testing.assert_array_equal(subset.train.index, again.train.index)
  np.testing.assert_array_equal(subset.val.images, again.val.images)
  assert not set(subset.train.index) & set(subset.val.index)
  assert len(set(subset.train.index) | set(subset.val.index)) == 2000
  other = data.load_dataset("fashion_mnist_subset", split_seed=1)
  assert set(other.val.index) != set(subset.val.index)


def test_subset_sizes_are_nested_prefixes():
  small = data.load_dataset("digits", train_size=100, val_size=50, test_size=30)
  big = data.load_dataset("digits", train_size=400, val_size=50, test_size=60)
  assert (len(small.train), len(small.val), len(small.test)) == (100, 50, 30)
  np.testing.assert_array_equal(small.train.index, big.train.index[:100])
  np.testing.assert_array_equal(small.val.index, big.val.index)
  np.testing.assert_array_equal(small.test.index, big.test.index[:30])
  with pytest.raises(data.DataError, match="train_size"):
    data.load_dataset("digits", train_size=10_000)


def test_normalised_with_train_statistics(subset):
  x = subset.train.images
  assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3
  # val/test use the train statistics, not their own.
  raw0 = subset.val.images[0] * subset.std + subset.mean
  assert raw0.min() > -1e-3 and raw0.max() < 255.01


def test_digits_native_8x8():
  s = data.load_dataset("digits")
  assert s.input_shape == (8, 8, 1)
  assert len(s.test) == data.DIGITS_TEST
  assert len(s.train) + len(s.val) + len(s.test) == 1797


def test_pad_and_repeat_channels():
  s = data.load_dataset("digits", image_size=12, channels=3, val_size=0)
  assert s.input_shape == (12, 12, 3)
  np.testing.assert_array_equal(s.train.images[..., 0], s.train.images[..., 2])
  # The padding holds the background (raw 0) value.
  np.testing.assert_allclose(s.train.images[:, 0, :, 0], -s.mean[0] / s.std[0], rtol=1e-6)
  assert len(s.val) == 0


def test_unknown_dataset():
  with pytest.raises(ValueError, match="fashion_mnist"):
    data.load_dataset("cifar10")


# ---------------------------------------------------------------------------------- batching


def test_shuffle_depends_only_on_key_and_epoch(subset):
  ds = subset.val
  a = list(data.epoch_batches(ds, 64, 3, 0))
  b = list(data.epoch_batches(ds, 64, 3, 0))
  c = list(data.epoch_batches(ds, 64, 3, 1))
  d = list(data.epoch_batches(ds, 64, 4, 0))
  assert len(a) == 400 // 64
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(a[0][1], c[0][1]) and not np.array_equal(a[0][1], d[0][1])
  key = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(
    data.epoch_permutation(key, 2, 100), data.epoch_permutation(np.asarray(key), 2, 100)
  )
  np.testing.assert_array_equal(
    data.epoch_permutation(jax.random.key(5), 2, 100), data.epoch_permutation(key, 2, 100)
  )


def test_epoch_covers_each_image_at_most_once(subset):
  ds = subset.val
  seen = np.concatenate([y for _, y in data.epoch_batches(ds, 64, 0, 0)])
  assert seen.shape == (6 * 64,)  # remainder (16 images) dropped
  batches = list(data.epoch_batches(ds, 64, 0, 0))
  rows = np.concatenate([x.reshape(64, -1)[:, :1] for x, _ in batches])
  assert rows.shape[0] == 384


def test_train_batches_resume_matches(subset):
  ds = subset.val
  it = data.train_batches(ds, 64, 7)
  full = [next(it) for _ in range(15)]  # crosses two epoch boundaries (6 batches an epoch)
  it2 = data.train_batches(ds, 64, 7, start_step=9)
  for i in range(9, 15):
    x, y = next(it2)
    np.testing.assert_array_equal(x, full[i][0])
    np.testing.assert_array_equal(y, full[i][1])


def test_eval_batches_pad_and_mask(subset):
  ds = subset.val
  out = list(data.eval_batches(ds, 150))
  assert [len(m) for _, _, m in out] == [150, 150, 150]
  assert [len(m) for _, _, m in data.eval_batches(ds, 1000)] == [1000]  # fixed shape
  assert sum(int(m.sum()) for _, _, m in out) == 400
  y = np.concatenate([y[m] for _, y, m in out])
  np.testing.assert_array_equal(y, ds.labels)


def test_batch_larger_than_split():
  s = data.load_dataset("digits", val_size=20)
  with pytest.raises(data.DataError, match="batch_size"):
    next(data.epoch_batches(s.val, 64, 0, 0))


def test_gzip_module_reads_our_files(tmp_path):
  p = tmp_path / "a-idx1-ubyte.gz"
  data.write_idx(p, np.arange(5))
  with gzip.open(p) as f:
    assert f.read()[:4] == bytes([0, 0, 8, 1])
