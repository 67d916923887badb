"""Strategy "shard" on a (cand, data) mesh: splitting images over devices changes nothing.

The checks run in a subprocess with 4 host CPU devices (``XLA_FLAGS`` must be set before jax
is imported; the same pattern as ``tests/test_data_stream.py``), so they do not depend on the
device count of the test process. The argument errors are checked here.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cimjax import evaluate, models

_SCRIPT = textwrap.dedent(
  """
  import json, numpy as np, jax, jax.numpy as jnp
  from cimjax import evaluate, models, search
  assert jax.local_device_count() == 4, jax.devices()
  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = models.init(md, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(301, 28, 28, 1)).astype(np.float32)  # 301: not a multiple of the batch
  logits, _ = jax.jit(lambda a: models.forward(md.module, v, a))(x)
  y = np.array(jnp.argmax(logits, -1))
  y[::5] = (y[::5] + 1) % 10  # labels from the float model, some wrong: counts differ
  pols = np.array(rng.integers(2, 9, (7, 5, 2)), np.int32)  # 7: not a multiple of 4 or 2
  pols[0] = 8
  pols[1] = 2
  kw = dict(chunk=3, batch_size=50)  # 50: rounded up to 52 for data_parallel = 4
  ref = evaluate.make_evaluator(md, v, x, y, strategy="loop", **kw)(pols)
  out = {"ref": ref.correct.tolist(), "ref_loss": ref.loss.tolist(), "dp": {}}
  for dp in (1, 2, 4):
    ev = evaluate.make_evaluator(md, v, x, y, strategy="shard", data_parallel=dp, **kw)
    r, one = ev(pols), ev(pols[3])  # one candidate: fewer than the "cand" devices
    out["dp"][dp] = {"correct": r.correct.tolist(), "loss": r.loss.tolist(),
                     "one": int(one.correct[0]), "batch": ev.batch_size,
                     "attrs": [ev.strategy, ev.data_parallel]}
  src = search.DataAccuracy(md, v, x, y, chunk=2, batch_size=64, data_parallel=2)
  out["describe"] = src.describe()
  out["src_acc"] = src(pols).tolist()
  print("RESULT " + json.dumps(out))
  """
)


@pytest.fixture(scope="module")
def mesh_run(repo_root, tmp_path_factory):
  script = tmp_path_factory.mktemp("mesh") / "mesh.py"
  script.write_text(_SCRIPT)
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "PYTHONPATH": repo_root,
  }
  r = subprocess.run(
    [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
  )
  assert r.returncode == 0, r.stderr[-3000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_data_parallel_counts_equal_loop_exactly(mesh_run, dp):
  ref, got = mesh_run["ref"], mesh_run["dp"][str(dp)]
  assert got["correct"] == ref  # integers: exact
  assert got["one"] == ref[3]
  np.testing.assert_allclose(got["loss"], mesh_run["ref_loss"], rtol=1e-5)
  assert got["attrs"] == ["shard", dp]
  assert got["batch"] == (52 if dp == 4 else 50)
  assert ref[0] > ref[1]  # 8/8 beats 2/2: the policies are really applied


def test_data_accuracy_data_parallel(mesh_run):
  d = mesh_run["describe"]
  assert d["kind"] == "DataAccuracy" and d["images"] == 301
  assert d["strategy"] == "shard" and d["data_parallel"] == 2  # "auto" resolves to "shard"
  np.testing.assert_allclose(mesh_run["src_acc"], 100.0 * np.asarray(mesh_run["ref"]) / 301)


def test_data_parallel_errors():
  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = models.init(md, jax.random.key(0))
  x, y = np.zeros((10, 28, 28, 1), np.float32), np.zeros((10,), np.int32)
  for strategy in ("loop", "vmap", "map"):
    with pytest.raises(ValueError, match=rf"data_parallel = 2 needs strategy 'shard'.*{strategy}"):
      evaluate.make_evaluator(md, v, x, y, strategy=strategy, data_parallel=2)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=r"data_parallel = .*; allowed: an int >= 1"):
      evaluate.make_evaluator(md, v, x, y, strategy="shard", data_parallel=bad)
  one = jax.devices()[:1]
  with pytest.raises(ValueError, match=r"data_parallel = 2 must divide the 1 device\(s\)"):
    evaluate.make_evaluator(md, v, x, y, strategy="shard", devices=one, data_parallel=2)
  with pytest.raises(ValueError, match=r"must divide the 1 device\(s\).*allowed: 1"):
    evaluate.make_evaluator(md, v, x, y, devices=one, data_parallel=2)  # "auto" -> "shard"
  assert evaluate.default_strategy(data_parallel=2) == "shard"
  assert evaluate.eval_mesh(one).shape == {"cand": 1, "data": 1}


def test_evaluate_splits_data_parallel_equals_one_device():
  """``train.data.data_parallel`` with several local devices (the test process has 8): the
  final evaluations split each batch over them; the accuracies are the one-device ones."""
  import ml_collections

  from cimjax import data, train

  assert jax.local_device_count() > 1
  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = models.init(md, jax.random.key(1))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(203, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, 203).astype(np.int32)
  ds = data.Dataset(x, y, np.arange(203))
  test = data.Dataset(x[:37], y[:37], np.arange(37))
  splits = data.Splits("t", ds, ds, test, 10, np.zeros(1), np.ones(1))
  cfg = ml_collections.ConfigDict(
    dict(eval_batch_size=50, fast_compile=True, bn_recal_batches=0, data={"data_parallel": False})
  )
  pol = np.full((5, 2), 4, np.int32)
  one = train.evaluate_splits(v, md, splits, cfg, pol, recal=False)
  cfg.data.data_parallel = True
  many = train.evaluate_splits(v, md, splits, cfg, pol, recal=False)
  assert {k: one[k] for k in ("val", "test")} == {k: many[k] for k in ("val", "test")}
  np.testing.assert_allclose(many["val_loss"], one["val_loss"], rtol=1e-5)


def test_search_data_parallel_field_is_checked():
  """``search.data_parallel`` must divide the local devices (8 here): one line naming it."""
  from cimjax import pipeline
  from cimjax.errors import ConfigError

  c = pipeline.default_config()
  c.train.data.update(name="digits", train_size=-1, val_size=300)
  c.search.search_images = 100
  c.search.data_parallel = 3
  with pytest.raises(ConfigError, match=r"search\.data_parallel") as info:
    pipeline.validate_run(c, stages=["search"])
  msg = str(info.value)
  assert "\n" not in msg and "1, 2, 4, 8" in msg
  c.search.data_parallel = 4
  pipeline.validate_run(c, stages=["search"])
