"""Tests of cimjax.data's sources: built-ins (unchanged), arrays, image folders, hubs, bad data.

Every dataset here is generated in ``tmp_path``: a 3-class folder of 40x40x3 PNGs with
class-dependent stripes, and the same images as ``.npz`` / ``.npy`` files.
"""

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cimjax import data
from cimjax import train as train_lib
from cimjax.trace import trace_specs

CLASSES = ("diagonal", "hstripe", "vstripe")  # sorted, as the folder loader orders classes
SIZE = 40
PER_CLASS = 16


def _pattern(c, rng, size=SIZE):
  """A colour image whose stripes' direction is the class (learnable), with noise."""
  yy, xx = np.mgrid[0:size, 0:size]
  base = [((xx + yy) // 5) % 2, (yy // 4) % 2, (xx // 4) % 2][c].astype(np.float64)
  tint = rng.uniform([0.6, 0.2, 0.3], [1.0, 0.6, 0.9])
  img = np.stack([base * tint[0], base * tint[1], 1 - base * tint[2]], -1)
  img = img + rng.normal(0, 0.08, img.shape)
  return np.clip(img * 255, 0, 255).astype(np.uint8)


def _write_folder(root, per_class=PER_CLASS, seed=0, size=SIZE):
  """ROOT/<class>/NNN.png; returns the images and labels in the loader's order."""
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for c, name in enumerate(CLASSES):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      img = _pattern(c, rng, size)
      Image.fromarray(img).save(d / f"{i:03d}.png")
      xs.append(img)
      ys.append(c)
  return np.stack(xs), np.asarray(ys)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  """``(folder, npz, x, y)``: one pool of 48 images as a folder and as an .npz."""
  root = tmp_path_factory.mktemp("pool")
  x, y = _write_folder(root / "shapes")
  npz = root / "shapes.npz"
  np.savez(npz, images=x, labels=y, class_names=np.asarray(CLASSES))
  return root / "shapes", npz, x, y


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
  """``ROOT`` with train/ (16 a class), val/ (4), test/ (5) and the arrays of each part."""
  root = tmp_path_factory.mktemp("split") / "shapes"
  parts = {}
  for seed, (part, n) in enumerate((("train", 16), ("val", 4), ("test", 5))):
    parts[part] = _write_folder(root / part, per_class=n, seed=seed)
  return root, parts


def _assert_same_splits(a, b):
  for s in ("train", "val", "test"):
    np.testing.assert_array_equal(a[s].images, b[s].images)
    np.testing.assert_array_equal(a[s].labels, b[s].labels)
    np.testing.assert_array_equal(a[s].index, b[s].index)
  np.testing.assert_array_equal(a.mean, b.mean)
  np.testing.assert_array_equal(a.std, b.std)
  assert a.num_classes == b.num_classes


# ------------------------------------------------------------------ built-ins: bit-identical

# sha256 (first 24 hex digits) of mean, std and every split's images, labels and index, as the
# single-module cimjax/data.py produced them before the package (same NumPy arithmetic).
_BUILTIN_DIGESTS = [
  ("fashion_mnist_subset", {}, "c37d9529ff02ecfca2f9b0fe", 73.1644515991211, 89.76122283935547),
  (
    "fashion_mnist_subset",
    dict(val_size=400, image_size=32, channels=3),
    "9123267c073ea70b27b092fc",
    56.01653289794922,
    84.43498229980469,
  ),
  (
    "fashion_mnist_subset",
    dict(val_size=0, train_size=500, split_seed=7),
    "5cc5526514296c15196d9df1",
    74.78502655029297,
    90.66221618652344,
  ),
  ("digits", {}, "298c14e82153b0065e6020af", 77.81395721435547, 95.86763763427734),
  (
    "digits",
    dict(val_size=300, train_size=1000, test_size=50),
    "5edd8a24429a25de377f525a",
    77.74555969238281,
    95.79142761230469,
  ),
  (
    "digits",
    dict(val_size=100, image_size=10, channels=3, split_seed=1),
    "f7e304ae474b277b00eaf6e8",
    49.81315612792969,
    85.27079010009766,
  ),
]


def _digest(arrays):
  h = hashlib.sha256()
  for a in arrays:
    a = np.asarray(a)
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:24]


def _splits_digest(s):
  arrays = [s.mean, s.std]
  for sp in ("train", "val", "test"):
    arrays += [s[sp].images, s[sp].labels, s[sp].index]
  return _digest(arrays)


@pytest.mark.parametrize("name,kw,digest,mean,std", _BUILTIN_DIGESTS)
def test_builtins_bit_identical_to_the_old_module(name, kw, digest, mean, std):
  s = data.load_dataset(name, **kw)
  assert s.mean[0] == np.float32(mean) and s.std[0] == np.float32(std)
  assert _splits_digest(s) == digest
  assert s.num_classes == 10 and s.info["source"] == name and s.info["skipped"] == 0


def test_builtin_batches_bit_identical_to_the_old_module():
  s = data.load_dataset("digits")
  arrays = []
  for x, y in list(data.epoch_batches(s.train, 64, 5, 2))[:3]:
    arrays += [x, y]
  it = data.train_batches(s.train, 64, 11, start_step=7)
  for _ in range(2):
    arrays += list(next(it))
  x, _, m = next(data.eval_batches(s.test, 256))
  arrays += [x, m, data.epoch_permutation(123, 4, 1000)]
  assert _digest(arrays) == "3157775beb06a33ecbc9646f"


def _tiny_train_config(repo_root):
  """The training part of train/run_tiny.py (cell bits filled as the run fills them)."""
  path = os.path.join(repo_root, "train", "run_tiny.py")
  spec = importlib.util.spec_from_file_location("run_tiny", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  t = mod.get_config().train
  t.bits.cell_bits = 2
  return t


def test_old_name_configs_unchanged_and_source_alias(repo_root):
  t = _tiny_train_config(repo_root)
  assert t.data.name == "digits" and t.data.source == ""
  train_lib.validate_config(t)
  by_name = train_lib.load_splits(t)
  assert _splits_digest(by_name) == "298c14e82153b0065e6020af"
  t.data.source = "digits"
  t.data.name = "fashion_mnist"  # ignored: the source names the built-in
  _assert_same_splits(train_lib.load_splits(t), by_name)


# ------------------------------------------------------------------ arrays


def test_npz_with_train_and_test_keys(tmp_path):
  rng = np.random.default_rng(1)
  xtr = rng.integers(0, 256, (30, 12, 10), dtype=np.uint8)  # H x W grey: C = 1
  ytr = np.arange(30) % 4
  xte = rng.integers(0, 256, (8, 12, 10), dtype=np.uint8)
  yte = np.arange(8) % 4
  p = tmp_path / "grey.npz"
  np.savez(p, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
  s = data.load_dataset("npz", path=p, val_size=6)
  assert s.input_shape == (12, 10, 1) and s.num_classes == 4 and s.class_names == ()
  assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 8)
  # The validation split is held out of the train part exactly as for the built-ins.
  train_idx, val_idx = data.held_out_split(30, 6, seed=0)
  np.testing.assert_array_equal(s.train.index, train_idx)
  np.testing.assert_array_equal(s.val.index, val_idx)
  np.testing.assert_array_equal(s.test.index, np.arange(8))
  # uint8 -> /255, then the train split's statistics for every split.
  raw = xtr[train_idx].astype(np.float32) / np.float32(255)
  np.testing.assert_allclose(s.mean, [raw.mean()], rtol=1e-6)
  np.testing.assert_allclose(s.std, [raw.std()], rtol=1e-5)
  expect_test = (xte[..., None].astype(np.float32) / np.float32(255) - s.mean) / s.std
  np.testing.assert_allclose(s.test.images, expect_test, rtol=1e-6, atol=1e-6)
  assert s.info["source"] == "npz" and s.info["layout"] == "train+test"


def test_npz_pool_split_by_ratio_is_seeded(pool):
  _, npz, x, y = pool
  s = data.load_dataset("npz", path=npz, val_fraction=0.125, test_fraction=0.25)
  assert (len(s.train), len(s.val), len(s.test)) == (30, 6, 12)
  idx = np.concatenate([s.train.index, s.val.index, s.test.index])
  np.testing.assert_array_equal(np.sort(idx), np.arange(48))  # disjoint, everything used
  np.testing.assert_array_equal(s.train.labels, y[s.train.index])
  again = data.load_dataset("npz", path=npz, val_fraction=0.125, test_fraction=0.25)
  _assert_same_splits(s, again)
  other = data.load_dataset("npz", path=npz, val_fraction=0.125, test_fraction=0.25, split_seed=1)
  assert set(other.test.index) != set(s.test.index)
  assert s.class_names == CLASSES and s.info["layout"] == "pool"


def test_npy_folder_equals_npz(pool, tmp_path):
  _, npz, x, y = pool
  d = tmp_path / "npy"
  d.mkdir()
  np.save(d / "images.npy", x)
  np.save(d / "labels.npy", y)
  np.save(d / "class_names.npy", np.asarray(CLASSES))
  a = data.load_dataset("npy", path=d)
  _assert_same_splits(a, data.load_dataset("npz", path=npz))
  # A path to one of the .npy files means its folder.
  _assert_same_splits(a, data.load_dataset("npy", path=d / "images.npy"))
  assert a.info["source"] == "npy"


def test_float_images_are_not_rescaled(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.normal(5.0, 2.0, (40, 6, 6, 2)).astype(np.float32)
  p = tmp_path / "f.npz"
  np.savez(p, images=x, labels=np.arange(40) % 2)
  s = data.load_dataset("npz", path=p)
  raw = x[s.train.index].reshape(-1, 2).astype(np.float64)
  np.testing.assert_allclose(s.mean, raw.mean(0), rtol=1e-6)
  np.testing.assert_allclose(s.std, raw.std(0), rtol=1e-6)


# ------------------------------------------------------------------ folders


def test_folder_with_train_val_test(split_folder):
  root, parts = split_folder
  s = data.load_dataset("folder", path=root, train_size=40)
  assert s.class_names == CLASSES and s.num_classes == 3 and s.input_shape == (40, 40, 3)
  assert (len(s.train), len(s.val), len(s.test)) == (40, 12, 15)
  np.testing.assert_array_equal(s.val.labels, parts["val"][1])  # val/ and test/ as given
  np.testing.assert_array_equal(s.test.index, np.arange(15))
  # Statistics: the raw train split's (images / 255), per channel.
  xtr = (parts["train"][0][s.train.index].astype(np.float32) / np.float32(255)).astype(np.float64)
  np.testing.assert_allclose(s.mean, xtr.reshape(-1, 3).mean(0), rtol=1e-5)
  np.testing.assert_allclose(s.std, xtr.reshape(-1, 3).std(0), rtol=1e-5)
  raw_val = parts["val"][0].astype(np.float32) / np.float32(255)
  np.testing.assert_allclose(s.val.images, (raw_val - s.mean) / s.std, rtol=1e-5, atol=1e-5)
  assert s.info["layout"] == "train+val+test" and s.info["files"]["test"] == 15
  assert s.info["class_names"] == list(CLASSES)
  json.dumps(s.info)  # the report can embed it


def test_val_folder_as_test_reads_imagenet_layout(split_folder, tmp_path):
  """``val_folder="test"``: ``train/`` + ``val/`` (ImageNet's layout), ``val/`` is the test
  split and the search's validation split is held out of ``train/``."""
  import shutil

  src, parts = split_folder
  root = tmp_path / "imagenet"
  shutil.copytree(src / "train", root / "train")
  shutil.copytree(src / "val", root / "val")
  s = data.load_dataset("folder", path=root, val_folder="test", val_size=6)
  np.testing.assert_array_equal(s.test.labels, parts["val"][1])
  assert len(s.val) == 6 and len(s.train) == len(parts["train"][1]) - 6
  default = data.load_dataset("folder", path=root)  # val/ is the validation split by default
  np.testing.assert_array_equal(default.val.labels, parts["val"][1])
  with pytest.raises(data.DataError, match=r"val_folder=test reads val/ as the test part"):
    data.load_dataset("folder", path=src, val_folder="test")  # val/ and test/ both there
  with pytest.raises(data.DataError, match=r"val_folder='x'; allowed: val, test"):
    data.load_dataset("folder", path=root, val_folder="x")


def test_folder_pool_equals_npz(pool):
  folder, npz, _, _ = pool
  a = data.load_dataset("folder", path=folder, split_seed=3)
  b = data.load_dataset("npz", path=npz, split_seed=3)
  _assert_same_splits(a, b)
  assert a.class_names == b.class_names == CLASSES
  assert a.name == "folder:shapes" and b.name == "npz:shapes.npz"


def test_num_classes_from_data_and_option(pool):
  _, npz, _, _ = pool
  assert data.load_dataset("npz", path=npz).num_classes == 3
  # class_names and num_classes must agree; without class names num_classes widens the range.
  with pytest.raises(data.DataError, match="3 class names but train.data.num_classes=5") as e:
    data.load_dataset("npz", path=npz, num_classes=5)
  assert str(npz) in str(e.value)
  # Without class names, num_classes widens the label range (classes without images).
  _, _, x, y = pool
  s = data.splits_from_indices(
    "wide", (x, y), (x, y), train_index=np.arange(40), val_index=[40], num_classes=5
  )
  assert s.num_classes == 5 and s.info["num_classes"] == 5


def test_model_input_follows_the_data(pool, repo_root):
  folder, _, _, _ = pool
  t = _tiny_train_config(repo_root)
  t.data.source, t.data.path = "folder", str(folder)
  train_lib.validate_config(t)
  splits = train_lib.load_splits(t)
  model = train_lib.build_model(t, splits)
  assert model.input_shape == (40, 40, 3) and model.num_classes == 3
  specs = trace_specs(model)
  assert specs[0].n == 3 * 3 * 3  # conv1 sees 3 channels
  assert specs[-1].m == 3  # the logits layer has one output a class


def test_sources_implement_the_protocol(pool):
  folder, _, x, y = pool
  sources, classes = data.scan_folder(folder)
  src = sources["train"]
  assert isinstance(src, data.Source) and src.num_examples == 48 and classes == CLASSES
  img, label = src.get(17)
  np.testing.assert_array_equal(img, x[17])
  assert label == y[17] == 1 and src.describe(17).endswith("hstripe/001.png")
  assert isinstance(data.ArraySource(x, y), data.Source)


# ------------------------------------------------------------------ public split builders


def test_splits_from_indices_reproduces_a_given_split():
  rng = np.random.default_rng(4)
  x = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
  y = np.arange(50) % 5
  train_idx = [7, 3, 11, 40, 41, 2, 9, 30, 31, 33]  # another tool's lists, in its order
  val_idx = [0, 1, 4, 5]
  test_idx = [49, 48]
  s = data.splits_from_indices(
    "theirs", (x, y), (x, y), train_index=train_idx, val_index=val_idx, test_index=test_idx
  )
  np.testing.assert_array_equal(s.train.index, train_idx)
  np.testing.assert_array_equal(s.val.index, val_idx)
  np.testing.assert_array_equal(s.test.labels, y[test_idx])
  mean, std = data.channel_stats(x[train_idx][..., None])
  np.testing.assert_array_equal(s.train.images, data.normalise(x[train_idx][..., None], mean, std))
  assert s.num_classes == 5  # from the labels
  with pytest.raises(data.DataError, match="val_index holds positions outside"):
    data.splits_from_indices("theirs", (x, y), (x, y), train_index=[0], val_index=[50])


def test_held_out_split_is_the_builtin_split():
  s = data.load_dataset("digits", val_size=150, train_size=900, split_seed=5)
  train_idx, val_idx = data.held_out_split(1797 - data.DIGITS_TEST, 150, 900, seed=5)
  np.testing.assert_array_equal(s.train.index, train_idx)
  np.testing.assert_array_equal(s.val.index, val_idx)
  xtr, ytr, xte, yte = data.load_raw("digits")
  again = data.splits_from_indices(
    "digits",
    (xtr, ytr),
    (xte, yte),
    train_index=train_idx,
    val_index=val_idx,
    num_classes=10,
    class_names=s.class_names,
  )
  _assert_same_splits(s, again)


# ------------------------------------------------------------------ bad data


def _copy_folder(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return dst


def test_corrupt_image_is_skipped_and_counted(pool, tmp_path, caplog):
  root = _copy_folder(pool[0], tmp_path / "bad")
  bad = root / "vstripe" / "003.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (root / "hstripe" / "005.png").write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    s = data.load_dataset("folder", path=root)
  assert s.info["skipped"] == 2 and str(bad) in s.info["skipped_paths"]
  assert len(s.train) + len(s.val) + len(s.test) == 46
  lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(lines) == 1 and "skipped 2 unreadable images" in lines[0] and "005.png" in lines[0]


def test_report_counts_the_skipped_images(pool, tmp_path):
  """The run's report carries the source's skipped count and names the first files."""
  from cimjax import report

  root = _copy_folder(pool[0], tmp_path / "bad")
  bad = root / "vstripe" / "003.png"
  bad.write_bytes(b"not an image")
  s = data.load_dataset("folder", path=root)
  summary = report.RunSummary(
    model="m",
    dataset=s.name,
    hw="h",
    hw_description="d",
    latency_mode="serial",
    train_images=len(s.train),
    val_images=len(s.val),
    test_images=len(s.test),
    train_subset=False,
    epochs={},
    allowed_drop=0.5,
    results={},
    policy=[],
    cost_int8={},
    cost_mixed={},
    metrics={},
    search_dir=tmp_path,
    workdir=tmp_path,
    data_info=s.info,
  )
  d = report._data(summary)
  assert d["skipped_images"] == 1 and d["skipped_paths"] == [str(bad)]
  assert d["source"] == "folder"
  r = {
    "model": "m",
    "dataset": s.name,
    "hw": "h",
    "hw_description": "d",
    "latency_mode": "serial",
    "data": d,
  }
  text = "\n".join(report._intro_lines(r))
  assert "1 unreadable image skipped" in text and "003.png" in text
  d["skipped_images"], d["skipped_paths"] = 0, []
  assert "unreadable" not in "\n".join(report._intro_lines(r))


def test_corrupt_image_refused_on_request(pool, tmp_path):
  root = _copy_folder(pool[0], tmp_path / "bad")
  bad = root / "diagonal" / "000.png"
  bad.write_bytes(bad.read_bytes()[:60])  # truncated
  with pytest.raises(data.DataError, match="on_bad_image=skip") as e:
    data.load_dataset("folder", path=root, on_bad_image="error")
  assert str(bad) in str(e.value)


def test_empty_class_folder(pool, tmp_path):
  root = _copy_folder(pool[0], tmp_path / "empty")
  (root / "zebra").mkdir()
  (root / "zebra" / "notes.txt").write_text("no images here")
  with pytest.raises(data.DataError, match="empty class folder") as e:
    data.load_dataset("folder", path=root)
  assert str(root / "zebra") in str(e.value)


def test_mismatched_sizes_in_a_folder_and_resizing(pool, tmp_path):
  root = _copy_folder(pool[0], tmp_path / "sizes")
  odd = root / "hstripe" / "002.png"
  Image.fromarray(np.zeros((32, 36, 3), np.uint8)).save(odd)
  with pytest.raises(data.DataError, match="different sizes") as e:
    data.load_dataset("folder", path=root)
  assert str(odd) in str(e.value) and "image_size" in str(e.value)
  s = data.load_dataset("folder", path=root, image_size=24)
  assert s.input_shape == (24, 24, 3) and s.info["image_shape"] == [24, 24, 3]


def test_grey_images_among_colour_become_colour(pool, tmp_path):
  root = _copy_folder(pool[0], tmp_path / "grey")
  grey = root / "hstripe" / "004.png"
  Image.fromarray(np.full((40, 40), 200, np.uint8)).save(grey)
  s = data.load_dataset("folder", path=root, test_fraction=0.0, val_fraction=0.0, val_size=0)
  assert s.input_shape == (40, 40, 3)
  i = list(s.train.index).index(16 + 4)
  np.testing.assert_allclose(s.train.images[i] * s.std + s.mean, 200 / 255, rtol=1e-5)


def test_mismatched_shapes_in_an_array_file(tmp_path):
  p = tmp_path / "mixed.npz"
  np.savez(
    p,
    x_train=np.zeros((10, 28, 28), np.uint8),
    y_train=np.zeros(10, np.int64),
    x_test=np.zeros((4, 32, 32), np.uint8),
    y_test=np.zeros(4, np.int64),
  )
  with pytest.raises(data.DataError, match="test images are 32x32x1 but the train") as e:
    data.load_dataset("npz", path=p)
  assert str(p) in str(e.value) and "image_size" in str(e.value)
  assert data.load_dataset("npz", path=p, image_size=30, val_size=2).input_shape == (30, 30, 1)


@pytest.mark.parametrize(
  "labels,message",
  [
    (np.array([0, 1, 2, 5, 0, 1, 2, 0, 1, 2]), "label 5 at position 3 is out of range for 3"),
    (np.array([0, 1, -1, 2, 0, 1, 2, 0, 1, 2]), "negative label -1 at position 2"),
    (np.array([0, 1, 2, 0.5, 0, 1, 2, 0, 1, 2]), "non-integer label 0.5 at position 3"),
    (np.eye(3)[np.arange(10) % 3], "one-hot labels are not supported"),
  ],
)
def test_bad_labels_name_the_file(tmp_path, labels, message):
  p = tmp_path / "labels.npz"
  np.savez(p, images=np.zeros((10, 8, 8), np.uint8), labels=labels, class_names=np.asarray(CLASSES))
  with pytest.raises(data.DataError, match=message) as e:
    data.load_dataset("npz", path=p)
  assert str(p) in str(e.value)


def test_split_too_small_for_the_requested_sizes(pool):
  folder, npz, _, _ = pool
  with pytest.raises(data.DataError, match="val_size=100 but only") as e:
    data.load_dataset("npz", path=npz, val_size=100)
  assert str(npz) in str(e.value)
  s = data.load_dataset("folder", path=folder)  # 5 validation images
  data.check_search_images(s, 4)
  with pytest.raises(data.DataError, match="search.search_images=5 needs at least 6") as e:
    data.check_search_images(s, 5)
  assert str(folder) in str(e.value)


@pytest.mark.parametrize(
  "layout,message",
  [
    ({"train/a/x.png": 1, "test/b/y.png": 1}, "class 'b' has no folder in"),
    ({"train/a/x.png": 1, "cats/x.png": 1}, "mixes split folders"),
    ({"test/a/x.png": 1}, "no train/"),
    ({"x.png": 1}, "no class subfolders"),
  ],
)
def test_unclear_folder_layouts(tmp_path, layout, message):
  for rel in layout:
    p = tmp_path / "d" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p)
  with pytest.raises(data.DataError, match=message) as e:
    data.load_dataset("folder", path=tmp_path / "d")
  assert str(tmp_path / "d") in str(e.value)


def test_unreadable_or_incomplete_array_files(tmp_path):
  p = tmp_path / "broken.npz"
  p.write_bytes(b"PK\x03\x04 broken zip")
  with pytest.raises(data.DataError, match="cannot read the array file") as e:
    data.load_dataset("npz", path=p)
  assert str(p) in str(e.value)
  q = tmp_path / "keys.npz"
  np.savez(q, pixels=np.zeros((2, 4, 4)), y=np.zeros(2))
  with pytest.raises(data.DataError, match="expected x_train and y_train.*found pixels, y"):
    data.load_dataset("npz", path=q)
  r = tmp_path / "counts.npz"
  np.savez(r, images=np.zeros((5, 4, 4), np.uint8), labels=np.zeros(4, np.int64))
  with pytest.raises(data.DataError, match="5 images but 4 labels"):
    data.load_dataset("npz", path=r)
  with pytest.raises(data.DataError, match="file not found"):
    data.load_dataset("npz", path=tmp_path / "nope.npz")


def test_config_validation_of_the_data_fields(repo_root):
  from cimjax.errors import ConfigError

  cases = [
    (dict(source="csv"), "config.data.source = 'csv'"),
    (dict(source="folder"), "config.data.path = ''"),
    (dict(source="npz", path="x.npz", on_bad_image="ignore"), "config.data.on_bad_image"),
    (dict(source="npz", path="x.npz", val_fraction=0.6, test_fraction=0.5), "val_fraction +"),
    (dict(num_classes=-2), "config.data.num_classes"),
  ]
  for fields, needle in cases:
    t = _tiny_train_config(repo_root)
    t.data.update(fields)
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
      train_lib.validate_config(t)


def test_bad_folder_exits_2_in_the_cli(pool, tmp_path, repo_root):
  root = _copy_folder(pool[0], tmp_path / "cli")
  (root / "zebra").mkdir()
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.run",
      "--config=train/run_tiny.py",
      "--config.train.data.source=folder",
      f"--config.train.data.path={root}",
      f"--workdir={tmp_path / 'w'}",
    ],
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert "error:" in last and str(root / "zebra") in last and "empty class" in last
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ hubs (optional packages)


class ClassLabel:  # named like the hub's feature class: the loaders look at the type's name
  def __init__(self, names):
    self.names = names


class _FakeHfSplit:
  def __init__(self, x, y, bad=()):
    self.features = {"label": ClassLabel(list(CLASSES)), "image": type("Image", (), {})()}
    self.x, self.y, self.bad = x, y, set(bad)

  def __len__(self):
    return len(self.y)

  def __getitem__(self, i):
    if i in self.bad:
      raise OSError("image file is truncated")
    return {"image": Image.fromarray(self.x[i]), "label": int(self.y[i])}


def test_hf_source_with_a_fake_datasets_module(pool, monkeypatch, tmp_path):
  _, npz, x, y = pool
  calls = []
  fake = types.ModuleType("datasets")

  def load_dataset(name, config=None, cache_dir=None):
    calls.append((name, config, cache_dir, os.environ.get("HF_DATASETS_OFFLINE")))
    return {"train": _FakeHfSplit(x, y, bad=[7])}

  fake.load_dataset = load_dataset
  fake.load_from_disk = lambda p: {"train": _FakeHfSplit(x, y)}
  monkeypatch.setitem(sys.modules, "datasets", fake)
  monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
  s = data.load_dataset("hf", path=str(tmp_path))  # an existing folder: load_from_disk
  _assert_same_splits(s, data.load_dataset("npz", path=npz))
  assert s.class_names == CLASSES and s.info["source"] == "hf"
  skipped = data.load_dataset("hf", path="user/shapes:v1", data_dir="/cache")
  assert calls == [("user/shapes", "v1", "/cache", "1")]  # offline unless the user says
  assert skipped.info["skipped"] == 1 and skipped.info["skipped_paths"] == [
    "hf:user/shapes:v1[train][7]"
  ]


def test_hf_without_the_package_says_so(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
  with pytest.raises(data.DataError, match="pip install datasets"):
    data.load_dataset("hf", path="mnist")


def test_tfds_source_with_a_fake_module(pool, monkeypatch):
  _, npz, x, y = pool
  n = len(y)

  class Builder:
    info = types.SimpleNamespace(
      splits={"train": None, "test": None}, features={"label": ClassLabel(list(CLASSES))}
    )

    def as_dataset(self, split, as_supervised):
      assert as_supervised
      sel = slice(0, 40) if split == "train" else slice(40, n)
      return list(zip(x[sel], y[sel]))

  fake = types.ModuleType("tensorflow_datasets")
  fake.builder = lambda name, data_dir=None: Builder()
  fake.as_numpy = lambda ds: ds
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  s = data.load_dataset("tfds", path="shapes", val_size=8)
  assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 8) and s.class_names == CLASSES
  np.testing.assert_array_equal(s.test.labels, y[40:])


def test_hf_real_package_offline(pool, tmp_path):
  datasets = pytest.importorskip("datasets")
  _, npz, x, y = pool
  features = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
  )
  ds = datasets.Dataset.from_dict(
    {"image": [Image.fromarray(i) for i in x], "label": y.tolist()}, features=features
  )
  datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
  s = data.load_dataset("hf", path=str(tmp_path / "hf"))
  _assert_same_splits(s, data.load_dataset("npz", path=npz))


def test_tfds_real_package_missing_dataset(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(data.DataError, match="never downloads"):
    data.load_dataset("tfds", path="mnist", data_dir=str(tmp_path))


# ------------------------------------------------------------------ end to end (acceptance)


def _figures(report):
  r = dict(report)
  for k in ("stage_time_s", "total_time_s", "dataset"):
    r.pop(k)
  r["search"] = {k: v for k, v in r["search"].items() if k != "wall_s"}
  return r


@pytest.mark.slow
def test_folder_and_npz_runs_give_the_same_figures(pool, tmp_path, repo_root):
  """``cimjax`` on the 40x40x3 PNG folder and on the same images as .npz: the same report."""
  folder, npz, _, _ = pool
  shrink = [
    "--config=train/run_tiny.py",
    "--config.train.batch_size=16",
    "--config.train.eval_batch_size=64",
    "--config.train.calib_images=32",
    "--config.train.fp32.steps=20",
    "--config.train.data.val_size=10",
    "--config.search.search_images=6",
    "--config.search.budget=16",
    "--config.compile.num_verify=2",
    "--config.compile.eval_images=10",
  ]
  reports = []
  for source, path in (("folder", folder), ("npz", npz)):
    wd = tmp_path / source
    p = subprocess.run(
      [
        sys.executable,
        "-m",
        "launch.run",
        *shrink,
        f"--config.train.data.source={source}",
        f"--config.train.data.path={path}",
        f"--workdir={wd}",
      ],
      cwd=repo_root,
      capture_output=True,
      text=True,
      timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    reports.append(json.loads((wd / "report.json").read_text()))
  a, b = reports
  assert a["dataset"] == "folder:shapes" and b["dataset"] == "npz:shapes.npz"
  assert _figures(a) == _figures(b)
  assert a["data"]["train_images"] == 28 and a["data"]["val_images"] == 10
  assert a["verification"]["bit_exact"] is True and a["speedup"] > 1.0
  assert a["data"]["skipped_images"] == 0 and a["data"]["source"] == "folder"
  assert a["accuracy"]["fp32"]["test"] > 100 / 3  # better than chance on 3 classes
