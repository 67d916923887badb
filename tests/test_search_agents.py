"""Agents: masks respected, PG beats random, DDPG's action-to-bits mapping, utilities."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimjax import cost as cost_lib
from cimjax import hw as hw_lib
from cimjax import models, trace
from cimjax.search import accuracy as acc_lib
from cimjax.search import ddpg as ddpg_lib
from cimjax.search import env as env_lib
from cimjax.search import pg as pg_lib
from cimjax.search import runner
from cimjax.search import space as space_lib


@pytest.fixture(scope="module")
def small_cnn():
  m = models.get_model("small_cnn")
  return m, trace.trace_specs(m)


@pytest.mark.parametrize("agent_name", ["pg", "ddpg", "random", "exhaustive"])
def test_every_agent_respects_the_mask(small_cnn, agent_name):
  """Forced layers are only ever 8/8 and weights multiples of the cell; the host environment
  checks every batch against the space (it raises otherwise)."""
  _, specs = small_cnn
  hw = hw_lib.load_hw("rram_256_c4")
  tables = cost_lib.cost_tables(specs, hw, xp=np)
  space = space_lib.make_space(len(specs), "both", hw.cell_bits)
  src = acc_lib.SyntheticAccuracy(specs, seed=0)
  budget = 60 if agent_name != "exhaustive" else space.size
  cfg = runner.SearchConfig(
    agent=agent_name,
    budget=budget,
    constraint="both",
    mode="loop",
    ddpg=dataclasses.replace(ddpg_lib.DDPGConfig(), warmup=5),
    max_iters=80,
  )
  env = env_lib.SearchEnv(space, tables.latency_us, src, acc_drop=0.5, budget=budget)
  agent = runner.make_agent(
    agent_name, space, specs, tables.latency_us, cfg, acc_target=env.acc_target
  )
  runner.search_loop(agent, env, seed=1, mode="loop", max_iters=cfg.max_iters)
  n = env.used
  assert n > 0
  p = env.history.policies[:n].astype(int)
  assert (p[:, 0] == 8).all() and (p[:, -1] == 8).all()  # forced first/last 8/8
  assert (p[:, 1:-1, 0] % 4 == 0).all()  # cell-resolution weights
  assert ((p[:, :, 1] >= 2) & (p[:, :, 1] <= 8)).all()
  assert space.contains(p).all()
  if agent_name == "exhaustive":
    assert n == space.size == 2744  # every policy exactly once


def test_pg_beats_random_on_a_synthetic_task():
  m = models.get_model("resnet18")
  specs = trace.trace_specs(m)
  hw = hw_lib.load_hw("rram_256_c4")
  tables = cost_lib.cost_tables(specs, hw, xp=np)
  src = acc_lib.SyntheticAccuracy(specs, seed=7)
  out = {}
  for name in ("pg", "random"):
    cfg = runner.SearchConfig(agent=name, budget=320, constraint="both", seed=0)
    out[name] = runner.run_search(m, specs, tables, src, cfg, hw=hw)
  assert out["pg"].feasible
  assert out["pg"].best_reward > out["random"].best_reward + 40.0
  assert out["pg"].best_speedup > 1.15 * out["random"].best_speedup


def test_ddpg_action_to_bits_matches_cim_aq():
  """HAQ binning round((hi - lo + 1) a + lo - 0.5) (NumPy rounding) for contiguous ranges;
  valid[min(floor(a |valid|), |valid| - 1)] for cell-resolution weight lists."""
  acts = np.concatenate([np.linspace(0.0, 1.0, 1001), np.arange(8) / 7.0])
  opts = np.asarray([2, 3, 4, 5, 6, 7, 8, 8], np.int32)
  got = np.asarray(
    ddpg_lib.action_to_bits(
      jnp.asarray(acts, jnp.float32),
      jnp.broadcast_to(jnp.asarray(opts), (len(acts), 8)),
      jnp.full((len(acts),), 7, jnp.int32),
      jnp.ones((len(acts),), bool),
    )
  )
  ref = np.asarray(
    [
      int(np.round(np.float32(7.0) * np.float32(a) + np.float32(1.5)))
      for a in acts.astype(np.float32)
    ]
  )
  np.testing.assert_array_equal(got, np.clip(ref, 2, 8))
  # equal-width bins: every bit-width gets ~1/7 of [0, 1]
  counts = np.bincount(got[:1001], minlength=9)[2:9]
  assert counts.min() >= 135 and counts.max() <= 150
  for valid in ([4, 8], [2, 4, 6, 8]):
    o = np.asarray(valid + [valid[-1]] * (8 - len(valid)), np.int32)
    got = np.asarray(
      ddpg_lib.action_to_bits(
        jnp.asarray(acts, jnp.float32),
        jnp.broadcast_to(jnp.asarray(o), (len(acts), 8)),
        jnp.full((len(acts),), len(valid), jnp.int32),
        jnp.zeros((len(acts),), bool),
      )
    )
    ref = [
      valid[min(int(np.floor(np.float32(a) * len(valid))), len(valid) - 1)]
      for a in acts.astype(np.float32)
    ]
    np.testing.assert_array_equal(got, ref)


def test_ddpg_episode_skips_forced_layers(small_cnn):
  _, specs = small_cnn
  space = space_lib.make_space(len(specs), "both", 2)
  agent = ddpg_lib.make_ddpg(space, specs)
  assert agent.config["steps"] == 2 * (len(specs) - 2)  # forced layers: no steps
  st = agent.init(jax.random.PRNGKey(0))
  pols, (states, actions) = agent.ask(st, jax.random.PRNGKey(1))
  assert pols.shape == (1, len(specs), 2) and states.shape == (6, 10)
  assert np.asarray(states)[:, 9].tolist() == [1, 0] * 3  # weight step, activation step
  assert space.contains(np.asarray(pols)).all()


def test_utilities_rank_zero_mean_ties_and_invalid():
  r = jnp.asarray([3.0, 1.0, 3.0, -5.0, 100.0, 7.0])
  v = jnp.asarray([True, True, True, True, False, True])
  u = np.asarray(pg_lib.utilities(r, v, "rank"))
  assert u[4] == 0.0
  assert u[0] == u[2]  # ties
  assert abs(u[np.asarray(v)].sum()) < 1e-6
  assert u[5] == pytest.approx(0.5) and u[3] == pytest.approx(-0.5)
  e = np.asarray(pg_lib.utilities(r, v, "elite", 0.2))
  assert e[5] > 0 and abs(e[np.asarray(v)].sum()) < 1e-6


def test_pg_samples_only_allowed_bits(small_cnn):
  _, specs = small_cnn
  hw = hw_lib.load_hw("rram_64_c2")
  t = cost_lib.cost_tables(specs, hw, xp=np)
  space = space_lib.make_space(len(specs), "weight", 2, min_bits=3, max_bits=6)
  for head in ("joint",):  # the factored head is covered by the mask test
    agent = pg_lib.make_pg(
      space, specs, t.latency_us, pg_lib.PGConfig(population=256, head=head, plan=0)
    )
    pols, _ = agent.ask(agent.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    p = np.asarray(pols)
    assert space.contains(p).all()
    assert set(np.unique(p[..., 0])) == {4, 6} and set(np.unique(p[..., 1])) == {3, 4, 5, 6}
