"""Tests of cimjax.checkpoint and of resuming a killed training run."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cimjax import checkpoint, train

REPO = Path(__file__).resolve().parents[1]


def _tree():
  params = {
    "conv": {
      "kernel": jnp.arange(6.0).reshape(2, 3),
      "w_clip": jnp.ones((8, 3)),
      "bias": jnp.zeros(3),
    },
    "bn": {"scale": jnp.ones(3, jnp.bfloat16)},
  }
  tx = optax.chain(optax.add_decayed_weights(1e-4, mask=train.decay_mask), optax.sgd(0.1, 0.9))
  return train.create_state(params, {}, tx, jax.random.PRNGKey(3))


def test_round_trip_exact(tmp_path):
  state = _tree()
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  with checkpoint.Checkpointer(tmp_path / "ck") as ck:
    assert ck.latest_step() is None
    ck.save(7, state, {"stage": "fp32", "config": {"lr": 0.1, "channels": [1, 2]}})
    restored, meta = ck.restore(state)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert isinstance(restored, train.TrainState)
  assert meta == {"stage": "fp32", "config": {"lr": 0.1, "channels": [1, 2]}}
  # A fresh manager on the same directory sees it (what a restarted process does).
  with checkpoint.Checkpointer(tmp_path / "ck") as ck:
    assert ck.latest_step() == 7
    assert ck.restore_meta()["stage"] == "fp32"


def test_max_to_keep_and_latest(tmp_path):
  state = _tree()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ck:
    for s in (5, 10, 15):
      ck.save(s, state.replace(step=jnp.asarray(s, jnp.int32)), {"s": s})
    assert ck.all_steps() == [10, 15] and ck.latest_step() == 15
    restored, meta = ck.restore(state, step=10)
  assert int(restored.step) == 10 and meta == {"s": 10}


def test_restore_mismatch_and_missing(tmp_path):
  state = _tree()
  with checkpoint.Checkpointer(tmp_path / "a") as ck:
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
      ck.restore(state)
    ck.save(1, state)
    other = state.replace(params={"conv": {"kernel": jnp.zeros((4, 4))}})
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
      ck.restore(other)


def test_write_json_atomic(tmp_path):
  p = checkpoint.write_json_atomic(tmp_path / "d" / "r.json", {"a": np.float32(1.5), "b": (1, 2)})
  assert json.loads(p.read_text()) == {"a": 1.5, "b": [1, 2]}
  assert [f.name for f in p.parent.iterdir()] == ["r.json"]  # no temporaries left


# ---------------------------------------------------------------------------------- kill test


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_cfg", REPO / "train" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config().train


_OVERRIDES = ["--config.checkpoint_every=5"]  # 40 steps


def test_sigkill_then_resume_identical(tmp_path):
  """SIGKILL the launcher right after its first checkpoint; the rerun matches a clean run."""
  wd = tmp_path / "killed"
  cmd = [
    sys.executable,
    "-m",
    "launch.train",
    "--config=train/tiny.py",
    f"--workdir={wd}",
    "--stage=fp32",
    *_OVERRIDES,
  ]
  # The resumed process reuses the killed one's compiled programs (same binaries, so the same
  # numerics): a persistent compilation cache shared by the two subprocesses.
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  proc = subprocess.Popen(
    cmd + ["--config.throttle_s=0.2"],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckdir = wd / "fp32" / "checkpoints"
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      if ckdir.is_dir() and any(p.name.isdigit() for p in ckdir.iterdir()):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 40 and not (wd / "fp32" / "result.json").exists()

  # Rerun to completion: resumes from the checkpoint.
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resuming from step" in out.stderr
  resumed = json.loads(out.stdout.strip().splitlines()[-1])

  # Uninterrupted run with the same seed (in this process; the other tests running the tiny
  # fp32 stage share its compiled step).
  config = _tiny_config()
  clean = train.run_stage(config, "fp32", tmp_path / "clean")
  model = train.build_model(config, train.load_splits(config))
  a = train.load_variables(wd / "fp32", model)
  b = train.load_variables(tmp_path / "clean" / "fp32", model)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert resumed["eval"] == clean["eval"]


def test_variables_saved_on_another_device_topology_load(tmp_path, repo_root):
  """Saved here (8 host devices, arrays on device 3), loaded in a 1-device process: what a
  model trained on one machine and searched or compiled on another (CPU -> GPU) does."""
  from cimjax import models

  assert len(jax.devices()) == 8
  model = models.get_model("small_cnn")
  abstract = train.abstract_variables(model)
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)
  train.save_variables(
    tmp_path / "variables", jax.tree.map(lambda a: jax.device_put(a, jax.devices()[3]), host)
  )
  np.savez(tmp_path / "expected.npz", *jax.tree.leaves(host))
  code = (
    "import sys, numpy as np, jax\n"
    "from cimjax import models, train, compile as cc\n"
    "assert len(jax.devices()) == 1\n"
    "m = models.get_model('small_cnn')\n"
    "exp = np.load(sys.argv[1] + '/expected.npz')\n"
    "for v in (train.load_variables(sys.argv[1], m), train.load_variables(sys.argv[1]),\n"
    "          cc.restore_variables(sys.argv[1], m)):\n"
    "  got = jax.tree.leaves(v)\n"
    "  assert len(got) == len(exp.files)\n"
    "  for i, g in enumerate(got):\n"
    "    np.testing.assert_array_equal(np.asarray(g), exp[f'arr_{i}'])\n"
    "print('ok')\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
