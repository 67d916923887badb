"""The planner's pruned Pareto DP (cimjax.search.pareto) against the full DP it replaces
(baselines.pareto_dp, kept as the reference) and against brute force.

Small random instances, many with tied costs and damages (small integers), where the
representative policy of a front point is decided by the full DP's tie-break: the pruned DP
must keep the same points, in the same order, with the same policies."""

import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import cost as cost_lib
from cimjax import hw as hw_lib
from cimjax import models, search, trace
from cimjax.search import baselines, pareto, planner
from cimjax.search import pg as pg_lib
from cimjax.search import space as space_lib


def _space_of(mask):
  """A :class:`SearchSpace` with an arbitrary allowed-pair mask ``[L, 8, 8]``."""
  return space_lib.SearchSpace(
    num_layers=mask.shape[0],
    constraint="none",
    cell_bits=None,
    min_bits=1,
    max_bits=8,
    io_bits=8,
    mask=mask,
    w_mask=mask.any(axis=2),
    a_mask=mask.any(axis=1),
  )


def _instance(seed, num, max_opts, ties):
  """A random space (1..max_opts pairs a layer), cost table and damage table."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((num, 8, 8), bool)
  for l in range(num):
    k = int(rng.integers(1, max_opts + 1))
    mask[l].reshape(-1)[rng.choice(64, k, replace=False)] = True
  if ties:  # small integers: many exact ties in cost, damage and both
    table = rng.integers(0, 4, (num, 8, 8)).astype(np.float64)
    damage = rng.integers(-2, 4, (num, 8, 8)).astype(np.float64)
  else:
    table = rng.uniform(1.0, 3.0, (num, 8, 8))
    damage = rng.normal(0.0, 1.0, (num, 8, 8))
  return _space_of(mask), table, damage


def _all_values(space, table, damage):
  """Every policy of a tiny space with its float64 cost and damage summed in layer order
  (as the DP sums them)."""
  pols = space_lib.enumerate_policies(space, 0, space.size)
  l_idx = np.arange(space.num_layers)
  c = table[l_idx, pols[..., 0] - 1, pols[..., 1] - 1]
  d = damage[l_idx, pols[..., 0] - 1, pols[..., 1] - 1]
  cost, dam = np.zeros(len(pols)), np.zeros(len(pols))
  for l in range(space.num_layers):
    cost, dam = cost + c[:, l], dam + d[:, l]
  return pols, cost, dam


def _answer(front, limit):
  """Index of the cheapest point with damage <= limit (none: the least damaging, the last)."""
  ok = np.flatnonzero(front.damage <= limit)
  return int(ok[0]) if ok.size else len(front.cost) - 1


def _limits(rng, dam, n):
  lo, hi = float(dam.min()), float(dam.max())
  inside = list(rng.uniform(lo, hi, n)) + list(rng.choice(dam, n))  # exact values included
  return np.asarray(inside + [lo - 1.0, hi + 1.0, lo, hi])


@settings(max_examples=200, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  num=st.integers(1, 5),
  max_opts=st.integers(1, 6),
  ties=st.booleans(),
  n_limits=st.integers(1, 4),
  beam=st.sampled_from([0, 1, 3, 16]),
)
def test_constrained_front_answers_like_the_full_dp(seed, num, max_opts, ties, n_limits, beam):
  """Same answers (cost, damage and policy) as baselines.pareto_dp for every limit, and the
  kept points are full-front points in the full front's order."""
  space, table, damage = _instance(seed, num, max_opts, ties)
  _, _, dam = _all_values(space, table, damage)
  limits = _limits(np.random.default_rng(seed + 1), dam, n_limits)
  full = baselines.pareto_dp(space, table, damage)
  for lim in [limits, limits[:1], limits[-2:-1]]:  # many limits, one, one below everything
    got = pareto.constrained_front(space, table, damage, lim, beam=beam)
    pos = {(c, d): i for i, (c, d) in enumerate(zip(full.cost, full.damage))}
    where = [pos.get((c, d), -1) for c, d in zip(got.cost, got.damage)]
    assert min(where) >= 0, "a pruned front point is not on the full front"
    assert where == sorted(where) and len(set(where)) == len(where)
    for t in lim:
      i, j = _answer(got, t), _answer(full, t)
      assert (got.cost[i], got.damage[i]) == (full.cost[j], full.damage[j]), t
      np.testing.assert_array_equal(got.policy(i), full.policy(j))


@settings(max_examples=100, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  num=st.integers(1, 4),
  max_opts=st.integers(1, 6),
  ties=st.booleans(),
)
def test_constrained_front_against_brute_force(seed, num, max_opts, ties):
  """The answer to each limit is the cheapest of all policies meeting it (none: the least
  damaging, cheapest among those), and its policy has that cost and damage."""
  space, table, damage = _instance(seed, num, max_opts, ties)
  pols, cost, dam = _all_values(space, table, damage)
  limits = _limits(np.random.default_rng(seed + 2), dam, 3)
  front = pareto.constrained_front(space, table, damage, limits)
  l_idx = np.arange(num)
  for t in limits:
    ok = dam <= t
    if ok.any():
      want_c = cost[ok].min()
      want_d = dam[ok & (cost == want_c)].min()
    else:
      want_d = dam.min()
      want_c = cost[dam == want_d].min()
    i = _answer(front, t)
    assert (front.cost[i], front.damage[i]) == (want_c, want_d), t
    pol = front.policy(i)
    assert space.contains(pol[None]).all()
    np.testing.assert_allclose(table[l_idx, pol[:, 0] - 1, pol[:, 1] - 1].sum(), want_c)
    np.testing.assert_allclose(damage[l_idx, pol[:, 0] - 1, pol[:, 1] - 1].sum(), want_d)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 12), ties=st.booleans())
def test_lower_hull_is_convex_and_below_every_option(seed, k, ties):
  rng = np.random.default_rng(seed)
  if ties:
    c, d = rng.integers(0, 4, k).astype(float), rng.integers(0, 4, k).astype(float)
  else:
    c, d = rng.uniform(0, 1, k), rng.uniform(0, 1, k)
  h = pareto.lower_hull(c, d)
  hc, hd = c[h], d[h]
  assert hc[0] == c.min() and hd[0] == d[c == c.min()].min()  # cheapest, then least damage
  assert hd[-1] == d.min() and hc[-1] == c[d == d.min()].min()  # least damage, then cheapest
  assert (np.diff(hd) < 0).all() and (np.diff(hc) >= 0).all()
  slopes = np.diff(hc) / -np.diff(hd)
  assert (np.diff(slopes) > -1e-12).all()  # convex
  # every option lies on or above the hull's piecewise-linear cost-of-damage function
  below = d <= hd[0]
  f = np.interp(-d[below], -hd, hc)
  assert (c[below] >= f - 1e-12).all()


@settings(max_examples=100, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  num=st.integers(1, 4),
  max_opts=st.integers(1, 6),
  ties=st.booleans(),
)
def test_suffix_lp_is_a_lower_bound_reached_at_its_vertices(seed, num, max_opts, ties):
  """``LP_l(b + slack)`` never exceeds the cheapest integer completion with damage <= b,
  ``LP_l(b)`` is +inf below the least damage, and the greedy vertices are real policies."""
  space, table, damage = _instance(seed, num, max_opts, ties)
  opts = pareto.layer_options(space, table, damage)
  bounds = pareto.suffix_bounds(opts)
  rng = np.random.default_rng(seed + 3)
  for l in range(-1, num):
    layers = range(l + 1, num)
    combos = list(itertools.product(*[range(len(opts.cost[j])) for j in layers]))
    cc = np.asarray([sum(opts.cost[j][o] for j, o in zip(layers, cb)) for cb in combos])
    dd = np.asarray([sum(opts.damage[j][o] for j, o in zip(layers, cb)) for cb in combos])
    budgets = np.concatenate([dd, rng.uniform(dd.min() - 1, dd.max() + 1, 20)])
    lp = pareto.lp_cost(bounds, l, budgets)
    lp_slack = pareto.lp_cost(bounds, l, budgets + 1e-9)  # as the DP calls it: with slack
    for b, v, v_slack in zip(budgets, lp, lp_slack):
      ok = dd <= b
      if ok.any():
        assert v_slack <= cc[ok].min() + 1e-9
      if b < dd.min() - 1e-9:
        assert v == np.inf
    if l == -1:  # each vertex is (cost, damage) of some policy
      for bc, bd in zip(bounds.cost[-1], bounds.damage[-1]):
        assert np.any(np.isclose(cc, bc, atol=1e-9) & np.isclose(dd, bd, atol=1e-9))


def test_dropping_dominated_options_keeps_ties_and_order():
  """An option no better than an earlier one goes; a later one that only ties it stays out
  too (the full DP keeps the first of equal points); a later strictly better one stays."""
  opts = pareto.LayerOptions(
    codes=[np.asarray([3, 5, 9, 12, 20])],
    cost=[np.asarray([1.0, 1.0, 2.0, 0.5, 3.0])],
    damage=[np.asarray([2.0, 2.0, 1.0, 2.0, 1.0])],
  )
  out = pareto.drop_dominated_options(opts, 1e-9, 1e-9)
  # 5 ties 3 (later: out); 3 is beaten by 12 (cheaper: out); 20 is beaten by 9 (out)
  np.testing.assert_array_equal(out.codes[0], [9, 12])


# ----------------------------------------------------------------------------------------------
# The planner: pruned vs full front, same candidates


def _plan_both(space, table, coef, sigma, diag, seed, cfg):
  kw = dict(space=space, cost_table=table, config=cfg)
  got = planner.plan_policies(coef, sigma, diag, seed, **kw)
  want = planner.plan_policies(coef, sigma, diag, seed, **kw, pruned=False)
  return got, want


@settings(max_examples=60, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  num=st.integers(2, 5),
  constraint=st.sampled_from(["none", "io", "both"]),
  min_bits=st.integers(2, 6),
  scale=st.sampled_from([0.01, 0.3, 3.0]),
  integer_costs=st.booleans(),
)
def test_plan_policies_pruned_equals_the_full_front(
  seed, num, constraint, min_bits, scale, integer_costs
):
  rng = np.random.default_rng(seed)
  space = space_lib.make_space(num, constraint, 2, min_bits=min_bits)
  if integer_costs:
    table = rng.integers(1, 6, (num, 8, 8)).astype(np.float64)
  else:
    table = rng.uniform(1.0, 2.0, (num, 8, 8))
  dim = planner.model_dim(num)
  coef = rng.normal(0.0, scale, dim)
  coef[rng.random(dim) < 0.3] = 0.0  # untested bit-widths: exact zeros, tied damages
  cfg = planner.PlannerConfig(
    plan=6,
    margins=(-1.0, 2.0),
    thompson=2,
    min_sigma=0.02,
    err_rate=0.3,
    ts_scale=1.0,
    ts_misfit=2.0,
    ridge=0.1,
    tau=20.0,
  )
  sigma = np.float32(rng.uniform(0.0, 2.0) * scale)
  diag = rng.uniform(0.5, 50.0, dim)
  got, want = _plan_both(space, table, coef, sigma, diag, np.int32(seed % 1000), cfg)
  np.testing.assert_array_equal(got, want)


def test_plan_policies_pruned_equals_full_on_the_default_run_tables(small_cnn_rram_64_c2):
  """The default run's search (small CNN, rram_64_c2, both constraints): the same planned
  candidates from models fitted to random evaluations, as the search fits them."""
  _, specs, hw, tables = small_cnn_rram_64_c2
  num = len(specs)
  space = space_lib.make_space(num, "both", hw.cell_bits)
  table = np.asarray(tables.latency_us, np.float64)
  cfg = pg_lib.PGConfig().planner()
  dim = planner.model_dim(num)
  rng = np.random.default_rng(0)
  pols = space_lib.enumerate_policies(space, 0, space.size)
  truth = rng.normal(0.0, 0.5, dim)
  for it in range(12):
    pick = pols[rng.choice(len(pols), 8 * (it + 1), replace=False)]
    rel = planner.model_features(pick) @ truth + rng.normal(0.0, 0.2, len(pick))
    g, m, _, _, coef, sd = planner.model_update(
      np.zeros((dim, dim)), np.zeros(dim), 0.0, 0.0, pick, rel, np.ones(len(pick), bool), 0.1, 20
    )
    diag = np.diagonal(g) + planner.model_ridge_penalty(num, cfg.ridge)
    got, want = _plan_both(space, table, coef, sd, diag, np.int32(it), cfg)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  "model_name", ["small_cnn", pytest.param("resnet20", marks=pytest.mark.slow)]
)
def test_a_pg_search_is_identical_with_the_full_front(monkeypatch, model_name):
  """A whole synthetic PG search (scan mode) on rram_64_c2 evaluates exactly the same
  candidates whether the planner uses the pruned or the full front (the small CNN: the default
  run's model and target)."""
  model = models.get_model(model_name)
  specs = trace.trace_specs(model)
  hw = hw_lib.load_hw("rram_64_c2")
  tables = cost_lib.cost_tables(specs, hw, xp=np)
  src = search.SyntheticAccuracy(specs, seed=0)
  cfg = search.SearchConfig(agent="pg", budget=320, seed=3)

  def run():
    res = search.run_search(model, specs, tables, src, cfg, hw=hw, acc_ref=90.0, plots=False)
    return res.history.policies[: res.evals_used], res.best_speedup

  got, best = run()
  monkeypatch.setattr(
    planner, "plan_policies", functools.partial(planner.plan_policies, pruned=False)
  )
  want, best_ref = run()
  assert len(got) > 100
  np.testing.assert_array_equal(got, want)
  assert best == best_ref


@pytest.mark.parametrize("beam", [0, 16])
def test_constrained_front_guards(beam):
  space, table, damage = _instance(0, 3, 4, False)
  with pytest.raises(RuntimeError, match="max_front"):
    pareto.constrained_front(space, table, damage, [np.inf], beam=beam, max_front=0)
