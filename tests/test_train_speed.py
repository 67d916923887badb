"""Speed work on training must not change numerics (no timings are asserted here).

* :func:`cimjax.train.fit` running the real fp32 stage step reaches bit-identical parameters to
  a plain reference loop written here (its own batch gather, a plain ``jax.jit`` of
  :func:`cimjax.train.steps.train_step`, one blocking step at a time);
* ``cimjax.models.pooling.max_pool_2x2`` (the faster max-pool gradient the benchmark
  measures) equals ``nn.max_pool`` and its ``select_and_scatter`` gradient bit for bit, and a
  CNN built with it trains to the same parameters as the zoo's ``small_cnn``;
* ``python -m launch.bench_train``: ``--help`` exits 0, a bad flag is one line and status 2.
"""

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimjax import data
from cimjax.models import ModelDef, get_model
from cimjax.train import steps as steps_lib
from cimjax.train.loop import fit
from cimjax.train.state import create_state, make_optimizer
from cimjax.variables import init_variables
from launch.bench_train import ReferenceCNN, max_pool_2x2

ROOT = Path(__file__).resolve().parent.parent


def _bits(tree):
  """Every leaf's raw bits (so -0.0 and 0.0, or two NaNs, are told apart)."""
  return [np.asarray(v).view(np.uint32) for v in jax.tree.leaves(tree)]


def _assert_same_bits(a, b):
  la, lb = _bits(a), _bits(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(u, v)


def _synthetic_split(n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 28, 28, 1), dtype=np.float32)
  return data.Dataset(x, rng.integers(0, 10, n).astype(np.int32), np.arange(n))


def _fp32_setup(model, num_steps, steps_per_epoch):
  # the default run's fp32 optimizer: AdamW, warmup + cosine, kernel-only weight decay
  tx = make_optimizer(
    "adamw", 3e-3, num_steps, warmup_steps=int(0.3 * steps_per_epoch), weight_decay=1e-4
  )
  key = jax.random.PRNGKey(0)
  v = init_variables(model, key)
  return tx, create_state(v["params"], v.get("batch_stats", {}), tx, key)


def test_fit_fp32_20_steps_bit_identical_to_reference_loop():
  model = get_model("small_cnn")
  ds, bs, num_steps, seed = _synthetic_split(512), 32, 20, [0, 0]
  spe = len(ds) // bs  # 16: the 20 steps cross an epoch boundary
  tx, state0 = _fp32_setup(model, num_steps, spe)
  trainer = steps_lib.Trainer(model, tx)

  fitted, stats = fit(
    lambda s, b: trainer.train_step(s, b, None),
    state0,
    ds,
    num_steps=num_steps,
    batch_size=bs,
    data_seed=seed,
    log_every=5,
    progress=False,
  )

  # the reference: its own batches (the documented order: a sorted slice of each epoch's
  # permutation), a plain jit, a blocking step at a time
  step = jax.jit(steps_lib.train_step, static_argnames="config")
  config = steps_lib.StepConfig.create(model, tx)
  state = state0
  for s in range(num_steps):
    epoch, i = divmod(s, spe)
    perm = data.epoch_permutation(np.asarray(seed, np.uint32), epoch, len(ds))
    idx = np.sort(perm[i * bs : (i + 1) * bs])
    state, metrics = step(state, (ds.images[idx], ds.labels[idx]), None, config=config)
    jax.block_until_ready(state)
  assert int(fitted.step) == int(state.step) == num_steps
  _assert_same_bits(fitted.params, state.params)
  _assert_same_bits(fitted.opt_state, state.opt_state)
  assert np.isfinite(stats["loss"]) and stats["step"] == num_steps


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 9, 4), (1, 2, 2, 1)])
def test_max_pool_2x2_equals_flax_max_pool_bit_for_bit(shape):
  k = jax.random.split(jax.random.key(3), 2)
  x = jnp.round(jax.random.normal(k[0], shape) * 2) / 2  # many ties in a window
  x = x.at[0, 0, 0, 0].set(-0.0)

  for pre in (lambda v: v, nn.relu):  # noqa: B023 (with and without the ReLU zeros)
    y_ref, vjp_ref = jax.vjp(lambda v, p=pre: nn.max_pool(p(v), (2, 2), (2, 2)), x)
    y_fast, vjp_fast = jax.vjp(lambda v, p=pre: max_pool_2x2(p(v)), x)
    _assert_same_bits(y_ref, y_fast)
    g = jax.random.normal(k[1], y_ref.shape)
    if g.size > 1:  # XLA's own gradient keeps a -0.0 cotangent for a lone window, not else
      g = g.at[0, 0, 0, 0].set(-0.0)
    _assert_same_bits(jax.jit(vjp_ref)(g), jax.jit(vjp_fast)(g))


def test_fast_pool_cnn_trains_like_the_zoo_small_cnn():
  kw = dict(channels=(4, 8, 8), hidden=16)
  zoo = get_model("small_cnn", **kw)
  fast = ModelDef(
    "fast", ReferenceCNN(pools=(True, True, True), fast_pool=True, **kw), (28, 28, 1), 10
  )
  ds, bs, n = _synthetic_split(128, seed=1), 32, 6
  out = []
  for model in (zoo, fast):
    tx, state = _fp32_setup(model, n, len(ds) // bs)
    trainer = steps_lib.Trainer(model, tx, fast_compile=True)
    state, _ = fit(
      lambda s, b, t=trainer: t.train_step(s, b, None),
      state,
      ds,
      num_steps=n,
      batch_size=bs,
      data_seed=0,
      progress=False,
    )
    out.append(state.params)
  assert jax.tree.structure(out[0]) == jax.tree.structure(out[1])
  _assert_same_bits(out[0], out[1])


def test_bench_train_cli_help_and_bad_flag():
  run = lambda *a: subprocess.run(  # noqa: E731
    [sys.executable, "-m", "launch.bench_train", *a], cwd=ROOT, capture_output=True, text=True
  )
  h = run("--help")
  assert h.returncode == 0 and "--batch_size" in h.stdout and "--arch" in h.stdout
  bad = run("--parts=nope")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
    "launch.bench_train: error: flag --parts=['nope']: allowed values are train, breakdown, stages"
  ]


def test_bench_summary_has_a_row_for_every_training_stage():
  """``launch.bench``'s summary carries bench_train's img/s of each stage of the default run."""
  from launch import bench

  tr = {
    "model": "small_cnn",
    "batch_size": 128,
    "stages": {s: {"img_s": v} for s, v in (("fp32", 300.0), ("int8", 250.5), ("anyprec", 90.0))},
  }
  rows = bench.summarize({"train": tr})
  assert rows == [
    ("training", "fp32 step, small_cnn, batch 128", "300.0 img/s"),
    ("training", "int8 step, small_cnn, batch 128", "250.5 img/s"),
    ("training", "anyprec step, small_cnn, batch 128", "90.0 img/s"),
  ]
  assert (
    "train" in bench.PARTS
    and "launch.bench_train"
    in bench._commands(__import__("pathlib").Path("/tmp/w"), True, "none")["train"]
  )


@pytest.mark.torch
def test_bench_train_compares_the_same_ops_with_pytorch():
  """The benchmark's per-op table is like for like: each PyTorch op, on the same operands,
  returns what the cimjax op it is paired with returns (float32 rounding apart)."""
  pytest.importorskip("torch")
  from launch import bench_train as bt

  ours = bt._op_fns("reference", 4)
  theirs = bt._torch_op_fns("reference", 4, 1)
  pairs = bt.op_pairs({k: 1.0 for k in (*ours, *theirs)})
  # 3 forwards, 3 filter and 2 input gradients (conv1 has none), 2 pools, fc1
  assert len(pairs) == 3 + 3 + 2 + 2 + 1 and "conv1 input gradient" not in pairs
  for op in pairs:
    f, args = ours.get(f"op: {op}") or ours[f"op: {op}, max_pool_2x2"]
    got = jax.tree.leaves(theirs[f"torch op: {op}"]())
    want = jax.tree.leaves(jax.device_get(f(*args)))
    assert len(got) == len(want), op
    for u, v in zip(got, want):
      assert u.shape == v.shape, op
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4 * float(np.abs(v).max()), err_msg=op)


def test_op_pairs_and_the_table():
  from launch import bench_train as bt

  ms = {
    "op: conv2 filter gradient": 30.0,
    "torch op: conv2 filter gradient": 15.0,
    "op: relu+pool2 gradient, nn.max_pool": 70.0,
    "op: relu+pool2 gradient, max_pool_2x2": 5.0,
    "torch op: relu+pool2 gradient": 10.0,
    "torch op: unmatched": 1.0,
  }
  assert bt.op_pairs(ms) == {
    "conv2 filter gradient": (30.0, 15.0),
    "relu+pool2 gradient": (5.0, 10.0),
  }
  r = {
    "arch": "reference",
    "model": "m",
    "batch_size": 128,
    "backend": "cpu",
    "jax": "x",
    "load_start": 0,
    "load_end": 0,
    "repeats": 1,
    "xla_flags": "",
    "breakdown": {"ms": ms, "img_s": {k: 128 / v for k, v in ms.items()}},
  }
  table = bt.format_table(r)
  assert "  conv2 filter gradient" in table and "0.50x" in table and "2.00x" in table
  assert "torch op:" not in table
