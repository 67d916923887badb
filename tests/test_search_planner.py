"""The search agents' pieces on their own: the planner's Pareto DP against brute force, the
REINFORCE log-probabilities against a NumPy oracle, mutation, and DDPG's replay buffer and
episode rollout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cimjax.search import ddpg as ddpg_lib
from cimjax.search import mutation as mutation_lib
from cimjax.search import pg as pg_lib
from cimjax.search import planner, reinforce
from cimjax.search import space as space_lib
from cimjax.search.agent import standard_promotion

# ----------------------------------------------------------------------------------------------
# Planner


@pytest.fixture(scope="module")
def tiny():
  """A 3-layer space of 9 pairs a layer (729 policies), a random cost table and model."""
  rng = np.random.default_rng(0)
  space = space_lib.make_space(3, "none", min_bits=6, max_bits=8)
  table = rng.uniform(1.0, 2.0, (3, 8, 8))
  coef = rng.normal(0.0, 1.0, planner.model_dim(3))
  pols = space_lib.enumerate_policies(space, 0, space.size)
  cost = table[np.arange(3), pols[..., 0] - 1, pols[..., 1] - 1].sum(axis=1)
  rel = planner.model_features(pols) @ coef
  return space, table, coef, pols, cost, rel


def _planner_config(**changes):
  return dataclasses.replace(pg_lib.PGConfig().planner(), **changes)


def _brute_force(cost, rel, margin):
  """Cost and predicted accuracy of the cheapest policy predicted ``margin`` above the target
  (none: the most accurate)."""
  ok = np.flatnonzero(rel >= margin)
  i = ok[np.argmin(cost[ok])] if ok.size else int(np.argmax(rel))
  return cost[i], rel[i]


def _cost_rel(table, coef, pol):
  pol = np.asarray(pol)[None]
  cost = table[np.arange(pol.shape[1]), pol[0, :, 0] - 1, pol[0, :, 1] - 1].sum()
  return cost, (planner.model_features(pol) @ coef)[0]


def test_pareto_dp_plan_is_the_brute_force_optimum(tiny):
  space, table, coef, pols, cost, rel = tiny
  assert pols.shape[0] == 729
  front, front_rel = planner.model_front(space, table, coef)
  # the front's predictions are the model's
  for i in range(len(front.cost)):
    c, r = _cost_rel(table, coef, front.policy(i))
    assert c == pytest.approx(front.cost[i], rel=1e-12)
    assert r == pytest.approx(front_rel[i], abs=1e-9)
  margins = list(np.quantile(rel, [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])) + [rel.max() + 1.0]
  for m in margins:
    got = planner.cheapest_feasible(front, front_rel, float(m))
    want_cost, want_rel = _brute_force(cost, rel, m)
    c, r = _cost_rel(table, coef, got)
    assert space.contains(got[None]).all()
    assert c == pytest.approx(want_cost, rel=1e-12), m
    assert r == pytest.approx(want_rel, abs=1e-9), m


def test_plan_front_gives_the_full_fronts_plans(tiny):
  """The pruned front (cimjax.search.pareto) answers every margin it is asked about with the
  full front's policy, including margins no policy meets (the most accurate)."""
  space, table, coef, _, _, rel = tiny
  full, full_rel = planner.model_front(space, table, coef)
  margins = np.concatenate([np.quantile(rel, [0.0, 0.2, 0.5, 0.8, 1.0]), [rel.max() + 1.0]])
  for ask in (margins, margins[2:3], margins[-1:]):
    front, front_rel = planner.plan_front(space, table, coef, ask)
    assert len(front.cost) <= len(full.cost)
    for m in ask:
      got = planner.cheapest_feasible(front, front_rel, float(m))
      np.testing.assert_array_equal(got, planner.cheapest_feasible(full, full_rel, float(m)))


def test_plan_policies_margins_and_a_collapsed_thompson_draw(tiny):
  """Deterministic plans at ``margin * max(sigma, min_sigma)``; a Thompson draw whose posterior
  has collapsed (huge Gram diagonal, no misfit floor) is the plan at margin 0."""
  space, table, coef, _, cost, rel = tiny
  cfg = _planner_config(plan=5, margins=(-1.0, 2.0), thompson=1, min_sigma=0.02, ts_misfit=0.0)
  sigma = 0.5
  out = planner.plan_policies(
    coef,
    np.float32(sigma),
    np.full(coef.shape, 1e12),
    np.int32(3),
    space=space,
    cost_table=table,
    config=cfg,
  )
  assert out.shape == (5, 3, 2) and out.dtype == np.int32
  np.testing.assert_allclose(cfg.deterministic_margins(), [-1.0, 0.0, 1.0, 2.0])
  for k, m in enumerate([-1.0, 0.0, 1.0, 2.0, 0.0]):  # the last: the Thompson draw
    want_cost, _ = _brute_force(cost, rel, m * sigma)
    assert _cost_rel(table, coef, out[k])[0] == pytest.approx(want_cost, rel=1e-12), k
  # the margin unit is floored at min_sigma
  low = planner.plan_policies(
    coef,
    np.float32(0.0),
    np.ones(coef.shape),
    np.int32(0),
    space=space,
    cost_table=table,
    config=cfg,
  )
  want_cost, _ = _brute_force(cost, rel, 2.0 * cfg.min_sigma)
  assert _cost_rel(table, coef, low[3])[0] == pytest.approx(want_cost, rel=1e-12)


def test_refit_host_tracks_the_planned_over_prediction():
  """``plan_err`` moves by ``err_rate`` towards the mean over-prediction of the planned
  candidates (under-predictions count 0); only new candidates enter the fit."""
  rng = np.random.default_rng(1)
  num = 2
  dim = planner.model_dim(num)
  cfg = _planner_config(plan=2, err_rate=0.25)
  coef = rng.normal(0.0, 1.0, dim).astype(np.float32)
  model = jax.tree.map(np.asarray, planner.model_init(dim))._replace(
    coef=coef, plan_err=np.float32(0.4)
  )
  pols = rng.integers(1, 9, (6, num, 2)).astype(np.int32)
  pred = planner.model_features(pols) @ coef.astype(np.float64)
  acc = 90.0 + pred + np.asarray([-1.0, 0.5, -0.25, 2.0, 0.0, 0.0])  # target 90
  planned = np.asarray([True, True, True, False, False, False])
  new = np.asarray([True, True, False, True, False, False])
  out = planner.refit_host(model, pols, acc, new, planned, acc_target=90.0, config=cfg)
  err = np.mean([1.0, 0.0, 0.25])
  assert float(out.plan_err) == pytest.approx(0.75 * 0.4 + 0.25 * err, rel=1e-6)
  w = np.exp(-np.maximum(-(acc - 90.0), 0.0) / cfg.tau)
  assert float(out.wsum) == pytest.approx(w[new].sum(), rel=1e-6)
  assert isinstance(out, planner.ModelState) and out.gram.shape == (dim, dim)


# ----------------------------------------------------------------------------------------------
# REINFORCE


def _np_mlp(layers, x):
  x = np.asarray(x, np.float64)
  for i, p in enumerate(layers):
    x = x @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64)
    if i < len(layers) - 1:
      x = np.maximum(x, 0.0)
  return x[..., 0]


def _np_log_softmax(x):
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _random_pdef(rng, head, num=4, feats=5):
  w_mask = rng.random((num, 8)) < 0.5
  a_mask = rng.random((num, 8)) < 0.5
  w_mask[:, 7] = a_mask[:, 7] = True  # 8 bits always allowed
  j_mask = (w_mask[:, :, None] & a_mask[:, None, :]).reshape(num, 64)
  x = lambda k: jnp.asarray(rng.normal(0, 1, (num, k, feats)), jnp.float32)
  return reinforce.PolicyDef(
    head=head,
    prior=True,
    w_mask=jnp.asarray(w_mask),
    a_mask=jnp.asarray(a_mask),
    j_mask=jnp.asarray(j_mask),
    x_w=x(8),
    x_a=x(8),
    x_j=x(64),
    ratio_table=jnp.asarray(rng.uniform(0.1, 1.0, (num, 8, 8)), jnp.float32),
  )


def _randomise(params, key):
  """Random values for every leaf (the zero-initialised last prior layers included)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    tree, [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  )


@pytest.mark.parametrize("head", ["factored", "joint"])
def test_log_prob_and_entropy_match_a_numpy_oracle(head):
  rng = np.random.default_rng(2)
  pdef = _random_pdef(rng, head)
  params = _randomise(reinforce.init_params(pdef, jax.random.PRNGKey(0), 6), jax.random.PRNGKey(1))
  pols = np.asarray(reinforce.sample(pdef, params, jax.random.PRNGKey(2), 64))
  num = pdef.num_layers
  l_idx = np.arange(num)
  if head == "factored":
    assert np.asarray(pdef.w_mask)[l_idx, pols[..., 0] - 1].all()
    assert np.asarray(pdef.a_mask)[l_idx, pols[..., 1] - 1].all()
    groups = []
    for name in ("w", "a"):
      lg = np.asarray(params[f"theta_{name}"], np.float64) + _np_mlp(
        params[f"prior_{name}"], getattr(pdef, f"x_{name}")
      )
      groups.append(_np_log_softmax(np.where(getattr(pdef, f"{name}_mask"), lg, -1e9)))
    want = (groups[0][l_idx, pols[..., 0] - 1] + groups[1][l_idx, pols[..., 1] - 1]).sum(axis=1)
  else:
    code = (pols[..., 0] - 1) * 8 + pols[..., 1] - 1
    assert np.asarray(pdef.j_mask)[l_idx, code].all()
    lg = np.asarray(params["theta"], np.float64) + _np_mlp(params["prior"], pdef.x_j)
    groups = [_np_log_softmax(np.where(pdef.j_mask, lg, -1e9))]
    want = groups[0][l_idx, code].sum(axis=1)
  got = np.asarray(reinforce.log_prob(pdef, params, jnp.asarray(pols)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  ent = sum(-(np.exp(g) * g).sum(axis=-1) for g in groups).mean()
  assert float(reinforce.entropy(pdef, params)) == pytest.approx(ent, rel=1e-4)


@pytest.mark.slow  # default-suite time
def test_update_raises_the_best_candidate_and_ignores_invalid_batches():
  rng = np.random.default_rng(3)
  pdef = _random_pdef(rng, "factored")
  tx = standard_promotion(optax.adam(0.1))
  state = reinforce.init(pdef, tx, jax.random.PRNGKey(0), 6)
  pols = reinforce.sample(pdef, state.params, jax.random.PRNGKey(1), 16)
  reward = jnp.arange(16, dtype=jnp.float32)
  kw = dict(entropy_coef=0.0)
  same, _ = reinforce.update(pdef, tx, state, pols, reward, jnp.zeros(16, bool), **kw)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  new, metrics = reinforce.update(pdef, tx, state, pols, reward, jnp.ones(16, bool), **kw)
  before = reinforce.log_prob(pdef, state.params, pols)
  after = reinforce.log_prob(pdef, new.params, pols)
  assert float(after[15] - before[15]) > 0.0  # the best candidate became more likely
  assert float(after[0] - before[0]) < float(after[15] - before[15])
  assert set(metrics) == {"loss", "entropy", "expected_cost_ratio"}


# ----------------------------------------------------------------------------------------------
# Mutation


def test_mutate_rate_zero_keeps_rate_one_redraws_within_the_mask():
  space = space_lib.make_space(5, "both", 2)
  mask = jnp.asarray(space.mask)
  pols = jnp.asarray(np.broadcast_to(space.reference_policy(), (64, 5, 2)), jnp.int32)
  same, changed = mutation_lib.mutate(pols, jax.random.PRNGKey(0), jnp.float32(0.0), mask)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(pols))
  assert not np.asarray(changed).any()
  out, changed = mutation_lib.mutate(pols, jax.random.PRNGKey(0), jnp.float32(1.0), mask)
  out, changed = np.asarray(out), np.asarray(changed)
  assert space.contains(out).all()
  np.testing.assert_array_equal(changed, (out != np.asarray(pols)).any(axis=(1, 2)))
  assert changed.mean() > 0.9


# ----------------------------------------------------------------------------------------------
# DDPG


def _transition(i, nf=3):
  f = jnp.float32
  return jnp.full((nf,), i, f), f(i), f(10 + i), jnp.full((nf,), i + 0.5, f), f(i % 2)


def test_replay_buffer_wraps_around_and_samples_filled_rows():
  buf = ddpg_lib.replay_init(5, 3)
  buf = ddpg_lib.replay_add(buf, *_transition(0))
  buf = ddpg_lib.replay_add(buf, *_transition(1))
  assert int(buf.ptr) == 2 and int(buf.size) == 2
  _, a, _, _, _ = ddpg_lib.replay_sample(buf, jax.random.PRNGKey(0), 200)
  assert set(np.asarray(a).tolist()) == {0.0, 1.0}  # never an empty row
  for i in range(2, 8):
    buf = ddpg_lib.replay_add(buf, *_transition(i))
  assert int(buf.ptr) == 3 and int(buf.size) == 5
  np.testing.assert_array_equal(np.asarray(buf.a), [5, 6, 7, 3, 4])  # oldest overwritten
  np.testing.assert_array_equal(np.asarray(buf.r), [15, 16, 17, 13, 14])
  np.testing.assert_array_equal(np.asarray(buf.s)[:, 0], [5, 6, 7, 3, 4])
  np.testing.assert_array_equal(np.asarray(buf.s1)[:, 1], [5.5, 6.5, 7.5, 3.5, 4.5])
  np.testing.assert_array_equal(np.asarray(buf.done), [1, 0, 1, 1, 0])
  s, a, r, s1, done = (
    np.asarray(x) for x in ddpg_lib.replay_sample(buf, jax.random.PRNGKey(1), 200)
  )
  assert set(a.tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0}
  np.testing.assert_array_equal(r, a + 10)  # rows stay whole
  np.testing.assert_array_equal(s[:, 2], a)
  np.testing.assert_array_equal(s1[:, 0], a + 0.5)
  np.testing.assert_array_equal(done, a % 2)


def test_rollout_feeds_the_previous_bits_and_builds_the_policy(small_cnn_rram_64_c2):
  _, specs, hw, _ = small_cnn_rram_64_c2
  space = space_lib.make_space(len(specs), "both", hw.cell_bits)
  ep = ddpg_lib.make_episode(space, specs)
  actor = ddpg_lib.actor_init(jax.random.PRNGKey(0), 10, 8, 3e-3)
  pol, states, actions = ddpg_lib.rollout(
    actor, ep, jax.random.PRNGKey(1), jnp.asarray(False), jnp.float32(0.3), 8.0
  )
  pol, states, actions = np.asarray(pol), np.asarray(states), np.asarray(actions)
  layer, kind = np.asarray(ep.layer), np.asarray(ep.kind)
  bits = pol[layer, kind]
  assert states[0, 8] == 0.0
  np.testing.assert_allclose(states[1:, 8], bits[:-1] / 8.0)
  np.testing.assert_array_equal(np.delete(states, 8, axis=1), np.delete(np.asarray(ep.feats), 8, 1))
  assert ((actions >= 0.0) & (actions <= 1.0)).all()
  assert space.contains(pol[None]).all()
  forced = np.ones(pol.shape, bool)
  forced[layer, kind] = False
  np.testing.assert_array_equal(pol[forced], np.asarray(ep.base_policy)[forced])
