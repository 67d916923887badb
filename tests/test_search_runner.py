"""Search loop: resume equality, outputs, sharded == unsharded, loop == scan."""

import json

import jax
import numpy as np
import pytest

from cimjax.search import accuracy as acc_lib
from cimjax.search import env as env_lib
from cimjax.search import runner
from cimjax.search import space as space_lib


@pytest.fixture(scope="module")
def task(small_cnn_rram_64_c2):
  m, specs, hw, tables = small_cnn_rram_64_c2
  return m, specs, hw, tables, acc_lib.SyntheticAccuracy(specs, seed=5, drop44=3.0)


def _histories_equal(a, b, rtol=0.0, atol=0.0):
  assert int(a.count) == int(b.count)
  n = int(a.count)
  for f in ("policies", "accuracy", "iteration"):
    np.testing.assert_array_equal(
      np.asarray(getattr(a, f))[:n], np.asarray(getattr(b, f))[:n], err_msg=f
    )
  for f in ("cost_ratio", "reward"):
    np.testing.assert_allclose(
      np.asarray(getattr(a, f))[:n], np.asarray(getattr(b, f))[:n], rtol=rtol, atol=atol, err_msg=f
    )


@pytest.mark.parametrize(
  "mode, agent",
  [
    ("scan", "pg"),
    pytest.param("loop", "pg", marks=pytest.mark.slow),
    pytest.param("scan", "ddpg", marks=pytest.mark.slow),
  ],
)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, task, mode, agent):
  m, specs, hw, tables, src = task
  cfg = runner.SearchConfig(
    agent=agent,
    budget=150 if agent == "pg" else 40,
    constraint="none",
    seed=3,
    mode=mode,
    population=16,
    checkpoint_every=2,
    scan_chunk=2,
  )
  if agent == "ddpg":
    import dataclasses

    from cimjax.search import ddpg as ddpg_lib

    cfg = dataclasses.replace(
      cfg, ddpg=dataclasses.replace(ddpg_lib.DDPGConfig(), warmup=8, hidden=32)
    )
  full = runner.run_search(
    m, specs, tables, src, cfg, hw=hw, workdir=tmp_path / "full", plots=False
  )
  part = runner.run_search(
    m, specs, tables, src, cfg, hw=hw, workdir=tmp_path / "cut", stop_after=4, plots=False
  )
  assert part.iterations == 4 and not (tmp_path / "cut" / "report.json").exists()
  resumed = runner.run_search(
    m, specs, tables, src, cfg, hw=hw, workdir=tmp_path / "cut", plots=False
  )
  assert resumed.iterations == full.iterations
  _histories_equal(resumed.history, full.history)
  np.testing.assert_array_equal(resumed.best_policy, full.best_policy)
  assert resumed.best_reward == full.best_reward


def test_outputs_written(tmp_path, task):
  m, specs, hw, tables, src = task
  final = acc_lib.SyntheticAccuracy(specs, seed=6, drop44=3.0)  # a "second split"
  cfg = runner.SearchConfig(agent="random", budget=96, constraint="both", seed=0, population=16)
  res = runner.run_search(m, specs, tables, src, cfg, hw=hw, final_accuracy=final, workdir=tmp_path)
  for f in (
    "best_policy.npy",
    "report.json",
    "pareto.json",
    "history.npz",
    "pareto.png",
    "bits.png",
    "latency.png",
  ):
    assert (tmp_path / f).is_file(), f
  assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave nothing
  from cimjax import policy as policy_lib

  pol = policy_lib.load_policy(tmp_path / "best_policy.npy", len(specs))
  np.testing.assert_array_equal(pol, res.best_policy)
  assert np.load(tmp_path / "best_policy.npy").dtype == np.int64  # CIM-AQ's format
  rep = json.loads((tmp_path / "report.json").read_text())
  for k in (
    "best_accuracy",
    "latency_us",
    "energy_pj",
    "latency_speedup",
    "evals_used",
    "wall_s",
    "final",
    "acc_ref",
    "acc_target",
  ):
    assert k in rep, k
  assert rep["evals_used"] <= 96
  assert rep["latency_speedup"] == pytest.approx(res.best_speedup, rel=1e-5)
  assert rep["final"]["best"]["policy"] == res.best_policy.tolist()
  front = json.loads((tmp_path / "pareto.json").read_text())["points"]
  c = [p["cost_ratio"] for p in front]
  a = [p["accuracy"] for p in front]
  assert c == sorted(c) and a == sorted(a)  # non-dominated, by cost
  h = np.load(tmp_path / "history.npz")
  assert h["policies"].shape == (res.evals_used, len(specs), 2)


def test_sharded_population_equals_unsharded(task):
  """The population's accuracy evaluated sharded over 8 devices gives the same search."""
  m, specs, hw, tables, src = task
  assert len(jax.devices()) == 8
  mesh = jax.sharding.Mesh(
    np.asarray(jax.devices()), ("cand",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("cand"))
  cfg = runner.SearchConfig(agent="pg", budget=200, constraint="none", seed=2, mode="scan")
  one = runner.run_search(m, specs, tables, src, cfg, hw=hw)
  many = runner.run_search(m, specs, tables, src, cfg, hw=hw, sharding=shard)
  # the same candidates, accuracies and best policy; the reward's float32 arithmetic may be
  # fused differently in the partitioned program (1 ulp)
  _histories_equal(one.history, many.history, rtol=1e-6, atol=1e-4)
  np.testing.assert_array_equal(one.best_policy, many.best_policy)


def test_loop_and_scan_agree(task):
  m, specs, hw, tables, src = task
  res = {}
  for mode in ("loop", "scan"):
    cfg = runner.SearchConfig(agent="random", budget=100, constraint="io", seed=4, mode=mode)
    res[mode] = runner.run_search(m, specs, tables, src, cfg, hw=hw)
  a, b = res["loop"].history, res["scan"].history
  n = int(a.count)
  np.testing.assert_array_equal(a.policies[:n], np.asarray(b.policies)[:n])
  np.testing.assert_allclose(a.reward[:n], np.asarray(b.reward)[:n], rtol=1e-5, atol=1e-4)


def test_evals_to_reach_and_best_within(task):
  m, specs, hw, tables, src = task
  sp = space_lib.make_space(len(specs), "both", hw.cell_bits)
  env = env_lib.SearchEnv(sp, tables.latency_us, src, acc_drop=0.5, budget=50)
  env.evaluate(space_lib.enumerate_policies(sp, 0, 50))
  curve = env_lib.best_so_far(env.history)
  k = runner.evals_to_reach(env.history, env.acc_target, reward=float(curve[-1]))
  assert curve[k - 1] == curve[-1] and (k == 1 or curve[k - 2] < curve[-1])
  b = runner.best_within(env.history, 10, env.acc_target)
  assert b["reward"] == pytest.approx(curve[9]) and b["evals"] == 10
