"""Tests of cimjax.train: steps, optimizer masks, calibration, BN recalibration, stages."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cimjax import data, train
from cimjax import policy as policy_lib
from cimjax.layers import QuantConv, QuantDense
from cimjax.models import ModelDef, forward, get_model
from cimjax.trace import trace_specs
from cimjax.variables import FAST_COMPILE as FAST

REPO = Path(__file__).resolve().parents[1]


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_cfg", REPO / "train" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  return config.train if "train" in config else config  # a run config's training part


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


@pytest.fixture(scope="module")
def cnn():
  return dataclasses.replace(
    get_model("small_cnn", channels=(8, 16, 16), hidden=32), input_shape=(8, 8, 1)
  )


class _ConvBN(nn.Module):
  """conv - BN - relu - conv - BN - relu - mean - dense: the smallest batch-norm model."""

  @nn.compact
  def __call__(self, x, ctx):
    for i, c in enumerate((4, 8)):
      x = QuantConv(c, (3, 3), use_bias=False, signed_input=(i == 0), name=f"conv{i}")(x, ctx)
      x = nn.relu(nn.BatchNorm(use_running_average=not ctx.train, momentum=0.9, name=f"bn{i}")(x))
    return QuantDense(10, name="fc")(jnp.mean(x, axis=(1, 2)), ctx)


@pytest.fixture(scope="module")
def tiny_resnet():
  return ModelDef("conv_bn", _ConvBN(), (6, 6, 3), 10)


def _state(model, tx, seed=0):
  v = train.init_variables(model, jax.random.PRNGKey(seed))
  return train.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(1))


def _batch(ds, n=64):
  return ds.images[:n], ds.labels[:n]


# ---------------------------------------------------------------------------------- optimizer


def test_decay_and_clip_masks(cnn):
  v = train.init_variables(cnn, jax.random.PRNGKey(0))
  dm = train.decay_mask(v["params"])
  cm = train.clip_mask(v["params"])
  assert dm["conv1"]["kernel"] and not dm["conv1"]["bias"] and not dm["conv1"]["w_clip"]
  assert cm["fc2"]["a_clip"] and cm["fc2"]["w_clip"] and not cm["fc2"]["kernel"]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_weight_decay_skips_clip_tables_and_biases(cnn, opt):
  """With zero gradients only the kernels move (decay); clip tables and biases stay."""
  tx = train.make_optimizer(opt, 0.1, 10, weight_decay=0.5)
  state = _state(cnn, tx)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = jax.jit(tx.update, compiler_options=FAST)(zeros, state.opt_state, state.params)
  assert float(jnp.abs(updates["conv1"]["kernel"]).sum()) > 0
  for leaf in ("bias", "w_clip", "a_clip"):
    assert float(jnp.abs(updates["conv1"][leaf]).sum()) == 0


def test_schedule_warmup_then_cosine():
  s = train.make_schedule(1.0, 100, warmup_steps=10, end_lr_frac=0.1)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(0.1)
  assert float(train.make_schedule(1.0, 100)(0)) == 1.0


def test_unknown_optimizer():
  with pytest.raises(train.ConfigError, match="sgd, adamw"):
    train.make_optimizer("adam", 0.1, 10)


# ---------------------------------------------------------------------------------- steps


def test_train_step_lowers_loss_on_fixed_batch(cnn, digits):
  tx = optax.sgd(0.05, momentum=0.9)
  trainer = train.Trainer(cnn, tx, fast_compile=True)
  state = _state(cnn, tx)
  params0 = state.params
  pol = policy_lib.uniform_policy(5, 8, 8)  # QAT; the fp32 stage below runs the float path
  batch = _batch(digits.train)
  losses = []
  for _ in range(3):  # the loss reported by step k+1 is the loss after step k
    state, m = trainer.train_step(state, batch, pol)
    losses.append(float(m["loss"]))
  chex.assert_trees_all_equal_shapes(state.params, params0)
  assert int(state.step) == 3
  assert losses[1] < losses[0] and losses[2] < losses[0]


def test_anyprec_step_traced_policies_no_retrace(cnn, digits):
  tx = optax.adamw(1e-3)
  config = train.Trainer(cnn, tx, fast_compile=True).config
  # Jitted as the library jits it, traced at most once (a second trace raises).
  step = train.jit_step(chex.assert_max_traces(train.anyprec_step, n=1), fast_compile=True)
  state = _state(cnn, tx)
  batch = _batch(digits.train)
  mask = train.bits_mask(5)
  for i in range(3):
    pols = policy_lib.random_policies(jax.random.PRNGKey(i), mask, 1)  # + the max-bits policy
    state, m = step(state, batch, pols, config=config)
  assert set(m) >= {"loss", "loss_max", "accuracy", "loss_policies", "accuracy_policies"}
  assert np.isfinite(float(m["loss"])) and int(state.step) == 3
  # A pure function of its inputs: the same state, batch and policies give the same result.
  again = step(state, batch, pols, config=config)
  chex.assert_trees_all_equal(again, step(state, batch, pols, config=config))


def test_anyprec_without_sandwich_averages_bn_stats(tiny_resnet):
  tx = optax.adamw(1e-3)
  trainer = train.Trainer(
    tiny_resnet, tx, fast_compile=True, anyprec=train.AnyPrecConfig(sandwich=False, distill=False)
  )
  state = _state(tiny_resnet, tx)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 6, 6, 3))
  batch = (x, jnp.arange(16, dtype=jnp.int32) % 10)
  pols = jnp.stack([policy_lib.uniform_policy(3, 8, 8), policy_lib.uniform_policy(3, 2, 2)])
  new, m = trainer.anyprec_step(state, batch, pols)
  assert "loss_max" not in m and np.isfinite(float(m["loss"]))
  # Running statistics: the mean of the two policies' updates.
  one = [train.recalibrate_bn(state, tiny_resnet, p, [x], fast_compile=True) for p in pols]
  mom = 0.9
  expect = jax.tree.map(
    lambda old, a, b: mom * old + (1 - mom) * (a + b) / 2,
    state.batch_stats,
    one[0].batch_stats,
    one[1].batch_stats,
  )
  chex.assert_trees_all_close(new.batch_stats, expect, atol=1e-4, rtol=1e-4)


def test_sample_policies_respect_mask_and_distribution():
  mask = train.bits_mask(4, min_bits=2, max_bits=8, constraint="weight", cell_bits=2)
  sample = policy_lib.random_policies  # jitted, n static
  pols = np.asarray(sample(jax.random.PRNGKey(0), mask, 2000))
  chex.assert_shape(pols, (2000, 4, 2))
  assert set(np.unique(pols[..., 0])) == {2, 4, 6, 8}
  assert set(np.unique(pols[..., 1])) == set(range(2, 9))
  counts = np.bincount(pols[:, 0, 1], minlength=9)[2:]
  assert counts.min() > 2000 / 7 * 0.7  # roughly uniform
  probs = np.zeros((4, 8, 8))
  probs[:, 3, 1] = 1.0  # always (4, 2)
  pols = np.asarray(sample(jax.random.PRNGKey(1), probs, 10))
  assert (pols == [4, 2]).all()
  np.testing.assert_array_equal(train.extreme_policy(mask, "min"), [[2, 2]] * 4)
  np.testing.assert_array_equal(train.extreme_policy(mask, "max"), [[8, 8]] * 4)


# ---------------------------------------------------------------------------------- calibration


def test_calibrate_clips_finite_positive(cnn, digits):
  v = train.init_variables(cnn, jax.random.PRNGKey(0))
  params = train.calibrate_clips(v, cnn, digits.train.images[:128])
  for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
    w, a = np.asarray(params[name]["w_clip"]), np.asarray(params[name]["a_clip"])
    chex.assert_shape(w, v["params"][name]["w_clip"].shape)
    chex.assert_shape(a, (8,))
    assert np.isfinite(w).all() and (w > 0).all() and np.isfinite(a).all() and (a > 0).all()
    # MSE-optimal clips shrink with fewer bits (more clipping pays off).
    assert w[1].mean() < w[7].mean() and a[1] <= a[7]
    np.testing.assert_array_equal(w[0], w[1])  # 1-bit narrow weights reuse the 2-bit row
  np.testing.assert_array_equal(params["conv1"]["kernel"], v["params"]["conv1"]["kernel"])
  # Only the requested rows change.
  only8 = train.calibrate_clips(v, cnn, digits.train.images[:128], bits=[8])
  np.testing.assert_array_equal(only8["fc1"]["w_clip"][:7], v["params"]["fc1"]["w_clip"][:7])
  np.testing.assert_allclose(only8["fc1"]["w_clip"][7], params["fc1"]["w_clip"][7])


# ---------------------------------------------------------------------------------- BN, evaluate


def test_recalibrate_bn_matches_batch_statistics(tiny_resnet):
  """After recalibration on one batch, eval mode reproduces train mode on that batch."""
  v = train.init_variables(tiny_resnet, jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 6, 6, 3))
  fwd = jax.jit(
    lambda v, x, p, t: forward(tiny_resnet.module, v, x, p, train=t)[0],
    static_argnums=3,
    compiler_options=FAST,
  )
  num_layers = len(trace_specs(tiny_resnet))
  for policy in (policy_lib.uniform_policy(num_layers, 4, 4),):
    new = train.recalibrate_bn(v, tiny_resnet, policy, [x], fast_compile=True)
    assert not np.allclose(new["batch_stats"]["bn1"]["var"], v["batch_stats"]["bn1"]["var"])
    assert not np.allclose(new["batch_stats"]["bn0"]["mean"], 0.0)
    np.testing.assert_allclose(
      fwd(new, x, policy, False), fwd(v, x, policy, True), atol=2e-4, rtol=1e-4
    )
    # Two copies of the batch give the same population statistics as one.
    twice = train.recalibrate_bn(v, tiny_resnet, policy, [x, x], fast_compile=True)
    chex.assert_trees_all_close(twice["batch_stats"], new["batch_stats"], atol=1e-5)
  # State in, state out; models without batch norm are returned unchanged.
  tx = optax.sgd(0.1)
  st = train.recalibrate_bn(_state(tiny_resnet, tx), tiny_resnet, None, [x], fast_compile=True)
  assert isinstance(st, train.TrainState)


def test_evaluate_independent_of_batch_size(cnn, digits):
  v = train.init_variables(cnn, jax.random.PRNGKey(0))
  pol = policy_lib.uniform_policy(5, 4, 4)
  a = train.evaluate(v, cnn, digits.test, pol, batch_size=100, fast_compile=True)
  b = train.evaluate(
    v,
    cnn,
    digits.test,
    pol,
    batch_size=512,  # = tiny's
    fast_compile=True,
  )
  assert a["count"] == b["count"] == len(digits.test)
  assert a["accuracy"] == pytest.approx(b["accuracy"])
  assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
  assert 0.0 <= a["accuracy"] / 100 <= 1.0  # percent


# ---------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """fp32 -> int8 -> anyprec -> finetune on the tiny config (digits), once for the module."""
  wd = tmp_path_factory.mktemp("pipeline")
  config = tiny_config()
  splits = train.load_splits(config)
  results = {}
  for stage in ("fp32", "int8", "anyprec"):
    results[stage] = train.run_stage(config, stage, wd, splits=splits)
  pol = np.array([[8, 8], [4, 4], [3, 2], [4, 4], [8, 8]])
  results["finetune"] = train.run_stage(
    config, "finetune", wd, policy=pol, policy_name="p", splits=splits
  )
  return wd, config, splits, results


def test_stages_produce_results(pipeline):
  wd, _, _, results = pipeline
  for stage in ("fp32", "int8", "anyprec", "finetune/p"):
    d = wd / stage
    assert (d / "result.json").is_file() and (d / "variables").is_dir()
    assert (d / "metrics.jsonl").is_file() and (d / "checkpoints").is_dir()
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "train" and "images_per_s" in r for r in lines)
  assert results["fp32"]["eval"]["float"]["test"] / 100 > 0.3  # 40 steps of digits (percent)
  assert results["int8"]["ptq_val_w8a8"] / 100 > 0.2
  assert set(results["anyprec"]["eval"]) == {"w8a8", "w6a6", "w4a4", "w3a3", "w2a2"}
  assert results["finetune"]["source"] == "anyprec"
  assert results["finetune"]["policy"][2] == [3, 2]


def test_finished_stage_not_redone(pipeline):
  wd, config, splits, results = pipeline
  before = sorted(p.name for p in (wd / "int8" / "checkpoints").iterdir())
  mtime = (wd / "int8" / "result.json").stat().st_mtime
  again = train.run_stage(config, "int8", wd, splits=splits)
  assert again == json.loads((wd / "int8" / "result.json").read_text())
  assert (wd / "int8" / "result.json").stat().st_mtime == mtime
  assert sorted(p.name for p in (wd / "int8" / "checkpoints").iterdir()) == before


def test_int8_starts_from_fp32_variables(pipeline):
  wd, config, splits, _ = pipeline
  model = train.build_model(config, splits)
  fp32 = train.load_variables(wd / "fp32", model)
  int8 = train.load_variables(wd / "int8", model)
  assert not np.array_equal(fp32["params"]["fc1"]["a_clip"], int8["params"]["fc1"]["a_clip"])
  acc = train.evaluate(
    int8, model, splits.test, policy_lib.uniform_policy(5, 8, 8), batch_size=512, fast_compile=True
  )["accuracy"]
  assert acc == pytest.approx(
    json.loads((wd / "int8" / "result.json").read_text())["eval"]["w8a8"]["test"]
  )


def test_missing_prerequisite(tmp_path):
  config = tiny_config()
  with pytest.raises(train.StageError, match="run --stage=fp32 first"):
    train.run_stage(config, "int8", tmp_path)
  with pytest.raises(train.StageError, match="needs a policy"):
    train.run_stage(config, "finetune", tmp_path)


def test_bad_config_values():
  config = tiny_config()
  config.anyprec.optimizer = "adam"
  with pytest.raises(train.ConfigError, match="anyprec.optimizer"):
    train.validate_config(config)
  config = tiny_config()
  config.bits.constraint = "weight"
  with pytest.raises(train.ConfigError, match="cell_bits"):
    train.validate_config(config)


class _Crash(Exception):
  pass


@pytest.mark.parametrize("stage", ["fp32", "anyprec"])
def test_resume_in_process_identical(pipeline, tmp_path, monkeypatch, stage):
  """Crash after 7 steps (checkpoint at 5), resume: parameters equal an uninterrupted run.

  The stage setup equals the pipeline's, so the compiled steps are reused.
  """
  src_wd, config, splits, _ = pipeline
  config.checkpoint_every = 5
  if stage == "anyprec":  # start from the pipeline's finished int8 stage
    for d in ("fp32", "int8"):
      for wd in (tmp_path / "a", tmp_path / "b"):
        (wd / d).parent.mkdir(parents=True, exist_ok=True)
        (wd / d).symlink_to(src_wd / d)
  ref = train.run_stage(config, stage, tmp_path / "a", splits=splits)

  real_fit = train.fit

  def crashing_fit(step_fn, state, *args, **kwargs):
    def step(s, b):
      if int(s.step) == 7:
        raise _Crash
      return step_fn(s, b)

    return real_fit(step, state, *args, **kwargs)

  monkeypatch.setattr(train.runner, "fit", crashing_fit)  # run_stage's loop
  with pytest.raises(_Crash):
    train.run_stage(config, stage, tmp_path / "b", splits=splits)
  monkeypatch.undo()
  assert not train.is_done(tmp_path / "b" / stage)
  ck = sorted(
    int(p.name) for p in (tmp_path / "b" / stage / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert ck[-1] == 5
  res = train.run_stage(config, stage, tmp_path / "b", splits=splits)
  model = train.build_model(config, splits)
  a = train.load_variables(tmp_path / "a" / stage, model)
  b = train.load_variables(tmp_path / "b" / stage, model)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert res["eval"] == ref["eval"]
  steps = [
    json.loads(l)["step"]
    for l in (tmp_path / "b" / stage / "metrics.jsonl").read_text().splitlines()
    if json.loads(l).get("kind") == "train"
  ]
  assert steps == sorted(set(steps))  # records past the checkpoint were replaced, not doubled


def test_resume_with_other_config_refused(pipeline, tmp_path, monkeypatch):
  _, config, splits, _ = pipeline
  config.fp32.steps = 12
  config.checkpoint_every = 5

  def crashing_fit(step_fn, state, *args, **kwargs):
    kwargs["num_steps"] = 6
    return real_fit(step_fn, state, *args, **kwargs)

  real_fit = train.fit
  monkeypatch.setattr(train.runner, "fit", crashing_fit)  # run_stage's loop and saver
  monkeypatch.setattr(train.runner, "save_variables", lambda *a: (_ for _ in ()).throw(_Crash()))
  with pytest.raises(_Crash):
    train.run_stage(config, "fp32", tmp_path, splits=splits)
  monkeypatch.undo()
  config.fp32.lr = 0.5
  with pytest.raises(train.StageError, match="different config.*fp32"):
    train.run_stage(config, "fp32", tmp_path, splits=splits)
