"""Tests of the streaming input pipeline (cimjax.data.stream) and its training integration.

Everything is generated in ``tmp_path`` (image folders, ``.npy`` and ``.npz`` files); nothing is
downloaded. The two-process ``jax.distributed`` test is marked ``slow``; the simulated per-host
split runs by default.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cimjax import checkpoint, data, train
from cimjax.data import stream as stream_lib
from cimjax.errors import ConfigError, DataError
from cimjax.models import get_model
from cimjax.variables import init_variables

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, n_per_class=(12, 12, 12), *, bad: int = 0, seed: int = 0) -> Path:
  """Class folders of JPEGs and PNGs of different sizes (+ ``bad`` corrupt files in c0)."""
  rng = np.random.default_rng(seed)
  for c, n in enumerate(n_per_class):
    d = root / f"c{c}"
    d.mkdir(parents=True)
    for i in range(n):
      h, w = (int(v) for v in rng.integers(20, 40, 2))
      img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
      img[..., c] = 200  # a class signal
      Image.fromarray(img).save(d / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    if c == 0:
      for b in range(bad):
        (d / f"zz_bad{b}.jpg").write_bytes(b"not an image")
  return root


def _npy(root: Path, n: int = 48, side: int = 8, seed: int = 0) -> Path:
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True)
  np.save(root / "images.npy", rng.integers(0, 255, (n, side, side), dtype=np.uint8))
  np.save(root / "labels.npy", (np.arange(n) % 3).astype(np.int64))
  return root


def _opts(**kw):
  base = dict(crop_size=16, resize_size=18, workers=0, prefetch=1)
  return data.StreamOptions(**{**base, **kw})


def _take(it, k):
  return [next(it) for _ in range(k)]


def _same(a, b):
  return len(a) == len(b) and all(
    np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b)
  )


# ----------------------------------------------------------------------------- sources


def test_every_source_streams(tmp_path):
  folder = _folder(tmp_path / "f")
  npy = _npy(tmp_path / "n")
  z = tmp_path / "a.npz"
  rng = np.random.default_rng(1)
  np.savez(
    z,
    x_train=rng.random((40, 10, 10, 3), np.float32),
    y_train=np.arange(40) % 4,
    x_test=rng.random((8, 10, 10, 3), np.float32),
    y_test=np.arange(8) % 4,
  )
  for kind, path, ch in (("folder", folder, 3), ("npy", npy, 1), ("npz", z, 3)):
    sd = data.open_stream(kind, path, data.LoadOptions(), _opts(), global_batch=4)
    with sd.stream.iterator(0) as it:
      x, y = next(it)
    assert x.shape == (4, 16, 16, ch) and x.dtype == np.float32, kind
    assert y.dtype == np.int32 and y.min() >= 0 and y.max() < sd.splits.num_classes
    assert sd.splits.val.images.shape[1:] == (16, 16, ch)
    assert sd.splits.info["stream"] and sd.splits.input_shape == (16, 16, ch)
  assert sd.splits.info["sizes"]["test"] == 8  # the npz's test part


def test_stream_equals_in_memory_batches(tmp_path):
  """No augmentation, native size, statistics of every image: exactly train_batches."""
  npy = _npy(tmp_path / "n", n=60)
  mem = data.load_dataset("npy", path=npy)
  so = _opts(crop_size=8, resize_size=8, augment=False, stats_images=10_000)
  sd = data.open_stream("npy", npy, data.LoadOptions(), so, global_batch=8)
  assert len(sd.stream) == len(mem.train)
  np.testing.assert_array_equal(sd.splits.mean, mem.mean)
  np.testing.assert_array_equal(sd.splits.val.images, mem.val.images)
  seed = np.asarray([3, 0], np.uint32)
  want = _take(data.train_batches(mem.train, 8, seed, 0), 9)  # crosses an epoch boundary
  with sd.stream.iterator(seed) as it:
    assert _same(_take(it, 9), want)


def test_geometry():
  rng = np.random.default_rng(0)
  for _ in range(50):
    left, top, right, bottom = stream_lib.random_resized_crop_box(30, 50, rng)
    assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
  assert stream_lib.center_crop_box(256, 512, 256, 224) == (144.0, 16.0, 368.0, 240.0)
  img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  assert stream_lib.crop_resize(img, (0, 0, 6, 4), 5).shape == (5, 5, 3)
  sq = img[:4, :4]
  assert stream_lib.crop_resize(sq, (0, 0, 4, 4), 4) is sq


# ----------------------------------------------------------------------------- order, resume


@pytest.fixture(scope="module")
def folder_stream(tmp_path_factory):
  root = _folder(tmp_path_factory.mktemp("fs") / "f")
  return data.open_stream("folder", root, data.LoadOptions(), _opts(), global_batch=4)


def test_order_is_a_function_of_the_seed(folder_stream):
  s = folder_stream.stream
  with s.iterator(5) as a, s.iterator(5) as b, s.iterator(6) as c:
    ba, bb, bc = _take(a, 4), _take(b, 4), _take(c, 4)
  assert _same(ba, bb)
  assert not any(np.array_equal(x[0], y[0]) for x, y in zip(ba, bc))
  # augmentation: the same example differs between epochs, the labels of a step are a set
  assert not np.array_equal(ba[0][0], ba[1][0])


def test_exact_resume_mid_epoch(folder_stream):
  s = folder_stream.stream
  spe = s.steps_per_epoch
  with s.iterator(7) as it:
    _take(it, spe - 2)  # mid-epoch
    state = json.loads(json.dumps(it.get_state()))
    after = _take(it, 5)  # crosses into the next epoch
  assert state["next_step"] == spe - 2
  with s.iterator(7, state=state) as again:
    assert _same(_take(again, 5), after)
  with s.iterator(7, start_step=spe - 2) as fresh:  # the order is a pure function of the step
    assert _same(_take(fresh, 5), after)
  with pytest.raises(DataError, match="seed"):
    s.iterator(8, state=state)


@pytest.mark.slow  # worker processes start slowly on 2 cores (~40 s)
def test_worker_processes_give_the_same_batches_and_resume(folder_stream):
  s0 = folder_stream.stream
  s2 = dataclasses.replace(s0, options=dataclasses.replace(s0.options, workers=2))
  with s0.iterator(1) as it:
    want = _take(it, 6)
  with s2.iterator(1) as it:
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 3)
  assert _same(got, want)
  assert state["workers"] == 2 and "iterators_in_use_states" in state["grain"]
  with s2.iterator(1, state=state) as it:
    assert _same(_take(it, 3), want[3:])
  with s0.iterator(1, state=state) as it:  # another worker count: restarts at the step
    assert _same(_take(it, 3), want[3:])


# ----------------------------------------------------------------------------- hosts


def test_per_host_shards_are_disjoint_and_complete(tmp_path):
  npy = _npy(tmp_path / "n", n=70)
  so = _opts(crop_size=8, resize_size=8, augment=False)
  one = data.open_stream("npy", npy, data.LoadOptions(), so, global_batch=8).stream
  hosts = [dataclasses.replace(one, shard=stream_lib.Shard(p, 2)) for p in range(2)]
  with one.iterator(2) as a, hosts[0].iterator(2) as h0, hosts[1].iterator(2) as h1:
    for _ in range(one.steps_per_epoch + 2):
      (x, y), (x0, y0), (x1, y1) = next(a), next(h0), next(h1)
      assert x0.shape[0] == x1.shape[0] == 4
      np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
      np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
  # over an epoch, the hosts' slots cover the permutation's full batches exactly once
  perm = data.epoch_permutation([2, 0], 0, len(one))
  slots = [
    stream_lib.step_slots(perm, b, 8, stream_lib.Shard(p, 2))
    for b in range(one.steps_per_epoch)
    for p in range(2)
  ]
  flat = np.concatenate(slots)
  assert len(set(flat.tolist())) == len(flat) == one.steps_per_epoch * 8
  assert set(flat.tolist()) == set(perm[: len(flat)].tolist())


_HOST = textwrap.dedent(
  """
  import sys, numpy as np, jax
  port, pid, root, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  from cimjax import data
  so = data.StreamOptions(crop_size=8, resize_size=8, augment=False, workers=0, prefetch=1)
  sd = data.open_stream("npy", root, data.LoadOptions(), so, global_batch=8)
  assert sd.stream.shard.index == pid and sd.stream.shard.count == 2
  with sd.stream.iterator(4) as it:
    xs = [next(it) for _ in range(6)]
  np.savez(out, x=np.stack([x for x, _ in xs]), y=np.stack([y for _, y in xs]))
  jax.distributed.shutdown()
  """
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_jax_distributed(tmp_path):
  npy = _npy(tmp_path / "n", n=70)
  script = tmp_path / "host.py"
  script.write_text(_HOST)
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(p), str(npy), str(tmp_path / f"h{p}.npz")],
      env=env,
    )
    for p in range(2)
  ]
  assert all(p.wait(timeout=240) == 0 for p in procs)
  so = _opts(crop_size=8, resize_size=8, augment=False)
  one = data.open_stream("npy", npy, data.LoadOptions(), so, global_batch=8).stream
  with one.iterator(4) as it:
    want = _take(it, 6)
  h = [np.load(tmp_path / f"h{p}.npz") for p in range(2)]
  for s, (x, y) in enumerate(want):
    np.testing.assert_array_equal(np.concatenate([h[0]["x"][s], h[1]["x"][s]]), x)
    np.testing.assert_array_equal(np.concatenate([h[0]["y"][s], h[1]["y"][s]]), y)


# ----------------------------------------------------------------------------- bad data


def test_corrupt_images_skipped_and_counted_or_refused(tmp_path):
  root = _folder(tmp_path / "f", (10, 10), bad=2)
  lo = data.LoadOptions(val_fraction=0.0, test_fraction=0.0)  # the bad files stream
  sd = data.open_stream("folder", root, lo, _opts(stats_images=1), global_batch=4)
  with sd.stream.iterator(0) as it:
    for _ in range(sd.stream.steps_per_epoch):
      x, _ = next(it)
      assert np.isfinite(x).all()
    bad = sorted(sd.stream.source.describe(i) for i in it.skipped)
  assert [Path(b).name for b in bad] == ["zz_bad0.jpg", "zz_bad1.jpg"]
  strict = data.open_stream(
    "folder", root, lo, _opts(stats_images=1, on_bad_image="error"), global_batch=4
  )
  with strict.stream.iterator(0) as it, pytest.raises(data.BadImageError, match="zz_bad"):
    for _ in range(strict.stream.steps_per_epoch):
      next(it)


def test_bad_options_are_one_line(tmp_path):
  npy = _npy(tmp_path / "n")
  for kw, field in (
    (dict(workers=-1), "workers"),
    (dict(crop_size=0), "crop_size"),
    (dict(crop_size=20, resize_size=10), "resize_size"),
    (dict(normalize="z"), "normalize"),
    (dict(on_bad_image="ignore"), "on_bad_image"),
  ):
    with pytest.raises(DataError, match=f"train.data.{field}") as e:
      data.open_stream("npy", npy, data.LoadOptions(), _opts(**kw), global_batch=4)
    assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="multiple of 3"):
    data.open_stream("npy", npy, data.LoadOptions(), _opts(), global_batch=4, local_devices=3)
  with pytest.raises(DataError, match="cannot stream"):
    data.open_stream("hf", npy, data.LoadOptions(), _opts(), global_batch=4)


def test_config_switch_validation():
  for kw, field in (
    (dict(stream=True), "config.data.source"),
    (dict(stream=True, source="npy", path="x", workers=-2), "config.data.workers"),
    (dict(stream=True, source="npy", path="x", normalize="x"), "config.data.normalize"),
    (dict(stream=True, source="folder", path="x", resize_size=8), "config.data.resize_size"),
  ):
    c = train.default_config()
    c.data.update(kw)
    with pytest.raises(ConfigError, match=field) as e:
      train.validate_config(c)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- training


def _tiny_run(tmp_path, root: Path):
  spec = importlib.util.spec_from_file_location("tiny_cfg", REPO / "train" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config().train
  c.data.update(
    source="folder", path=str(root), stream=True, crop_size=8, resize_size=10, stats_images=16
  )
  c.data.update(val_fraction=0.1, test_fraction=0.1)
  c.batch_size = 8
  c.checkpoint_every = 3
  c.log_every = 3
  c.calib_images = 16
  c.bn_recal_batches = 1
  c.fp32.steps = 6
  return c


@pytest.mark.slow  # the fit-level resume test stays in the default suite
def test_runner_resumes_a_stream_bit_identically(tmp_path, caplog):
  root = _folder(tmp_path / "f", (15, 15, 15))
  c = _tiny_run(tmp_path, root)
  wd = tmp_path / "w"
  first = train.run_stage(c, "fp32", wd)
  spe = first["steps"] / first["epochs"]
  assert first["train_images"] == 37 and spe == 4  # step 3 is mid-epoch
  ck = wd / "fp32" / "checkpoints"
  with checkpoint.Checkpointer(ck) as cp:
    assert cp.has_data(3) and cp.all_steps() == [3, 6]
    meta = cp.restore_meta(3)
    assert meta["_data_sha256"] and meta["step"] == 3
    digest = cp.restore_meta(6)["_state_sha256"]  # params, optimizer state, step, key
  # "kill" the run after step 3: drop its last checkpoint and the result, then resume
  shutil.rmtree(ck / "6")
  (wd / "fp32" / "result.json").unlink()
  caplog.set_level("INFO")
  again = train.run_stage(c, "fp32", wd)
  assert "resuming from step 3" in caplog.text
  with checkpoint.Checkpointer(ck) as cp:
    assert cp.restore_meta(6)["_state_sha256"] == digest
  assert again["eval"] == first["eval"] and again["steps"] == 6


def test_fit_stopped_mid_epoch_resumes_bit_identically(tmp_path, folder_stream):
  """fit on a stream, stopped after 3 steps (mid-epoch), resumed from the orbax checkpoint with
  the iterator state: the same parameters, bit for bit, as the uninterrupted run."""
  s = folder_stream.stream
  model = dataclasses.replace(
    get_model("small_cnn", channels=(4, 8, 8), hidden=16, num_classes=3),
    input_shape=s.input_shape,
  )
  tx = train.make_optimizer("adamw", 1e-3, 8)
  trainer = train.Trainer(model, tx, fast_compile=True)
  v = init_variables(model, jax.random.PRNGKey(0))
  fresh = train.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(1))
  step = lambda st, b: trainer.train_step(st, b, None)
  kw = dict(num_steps=8, batch_size=4, data_seed=[9, 0], progress=False, log_every=4)
  full, _ = train.fit(step, fresh, s, **kw)
  cp = checkpoint.Checkpointer(tmp_path / "ck")
  saved = []

  def save(state, done, data_state):
    cp.save(int(state.step), state, {"done": done}, data=data_state)
    saved.append(int(state.step))

  train.fit(step, fresh, s, save_fn=save, checkpoint_every=1, stop_after=3, **kw)
  assert saved == [1, 2, 3]
  target = jax.eval_shape(lambda: fresh)
  st, restored, meta = cp.restore_intact(target)
  assert st == 3 and meta["data_state"]["next_step"] == 3
  resumed, _ = train.fit(step, restored, s, data_state=meta["data_state"], **kw)
  cp.close()
  assert int(resumed.step) == 8
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_data_item_digest(tmp_path):
  state = {"w": np.arange(3, dtype=np.float32)}
  with checkpoint.Checkpointer(tmp_path) as cp:
    cp.save(1, state, {"a": 1})  # the format of every checkpoint before the stream
    cp.save(2, state, {"a": 2}, data={"next_step": 2, "grain": {"next_index": 2}})
    _, meta1 = cp.restore(state, 1)
    _, meta2 = cp.restore(state, 2)
    assert meta1 == {"a": 1} and not cp.has_data(1)
    assert meta2["data_state"] == {"next_step": 2, "grain": {"next_index": 2}}
  files = [p for p in (tmp_path / "2" / "data").rglob("*") if p.is_file()]
  text = files[0].read_text()
  files[0].write_text(text.replace("2", "3"))
  with (
    checkpoint.Checkpointer(tmp_path) as cp,
    pytest.raises(checkpoint.CorruptCheckpointError, match="data iterator state"),
  ):
    cp.restore(state, 2)


_DP = textwrap.dedent(
  """
  import dataclasses, sys, numpy as np, jax
  from cimjax import data, train
  from cimjax.models import get_model
  from cimjax.train import loop
  from cimjax.variables import init_variables
  assert jax.local_device_count() == 4
  ds = data.load_dataset("digits", train_size=256)
  model = dataclasses.replace(
    get_model("small_cnn", channels=(4, 8, 8), hidden=16), input_shape=(8, 8, 1)
  )
  tx = train.make_optimizer("adamw", 1e-3, 6)
  trainer = train.Trainer(model, tx, fast_compile=True)
  v = init_variables(model, jax.random.PRNGKey(0))
  out = {}
  for name, mesh in (("one", None), ("four", loop.data_mesh())):
    st = train.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(1))
    st, _ = train.fit(lambda s, b: trainer.train_step(s, b, None), st, ds.train, num_steps=6,
                      batch_size=32, data_seed=[0, 0], progress=False, mesh=mesh)
    out[name] = [np.asarray(a) for a in jax.tree.leaves(st.params)]
    ev = loop.evaluate_sharded(st.variables, model, ds.val, None, loop.data_mesh(), batch_size=50)
    ref = train.evaluate(st.variables, model, ds.val, None, batch_size=50, fast_compile=True)
    assert abs(ev["accuracy"] - ref["accuracy"]) < 1e-9 and abs(ev["loss"] - ref["loss"]) < 1e-4
    shard = st.params and jax.tree.leaves(st.params)[0].sharding
  worst = max(float(np.max(np.abs(a - b))) for a, b in zip(out["one"], out["four"]))
  print("max_abs_diff", worst, len(shard.device_set))
  for a, b in zip(out["one"], out["four"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  """
)


def test_four_devices_match_one_device(tmp_path):
  """Data-parallel over 4 host devices gives the 1-device parameters within float32 tolerance
  (rtol 1e-5, atol 1e-6: only the order of the batch-mean reduction differs)."""
  script = tmp_path / "dp.py"
  script.write_text(_DP)
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "PYTHONPATH": str(REPO),
  }
  r = subprocess.run(
    [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "max_abs_diff" in r.stdout and r.stdout.split()[-1] == "4"
