"""Lazy candidate evaluation: the sequential test's error rate, the exact bound, the counters."""

import itertools
import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import pipeline, stages
from cimjax import policy as policy_lib
from cimjax.errors import ConfigError
from cimjax.search import accuracy as acc_lib
from cimjax.search import env as env_lib
from cimjax.search import lazy, runner
from cimjax.search import reward as reward_lib
from cimjax.search import space as space_lib
from cimjax.search.state import LoopState, SearchCheckpointer

# ----------------------------------------------------------------------------------------------
# The test's tail and its error rate


def _exhaustive_cdf(num, successes, draws):
  """P(K <= k) by enumerating every draw of ``draws`` of ``num`` items (the first
  ``successes`` are successes)."""
  hits = np.zeros(draws + 1)
  combos = list(itertools.combinations(range(num), draws))
  for c in combos:
    hits[sum(1 for i in c if i < successes)] += 1
  return np.cumsum(hits) / len(combos)


@pytest.mark.parametrize("num, successes, draws", [(7, 0, 3), (7, 4, 3), (8, 5, 6), (9, 9, 4)])
def test_hypergeom_cdf_equals_exhaustive_enumeration(num, successes, draws):
  np.testing.assert_allclose(
    lazy.hypergeom_cdf(num, successes, draws), _exhaustive_cdf(num, successes, draws), atol=1e-12
  )


def _sequences(num, ones):
  """Every distinct 0/1 order of a population with ``ones`` correct images (equally likely
  under a uniformly shuffled split)."""
  for pos in itertools.combinations(range(num), ones):
    s = np.zeros(num, bool)
    s[list(pos)] = True
    yield s


def _stop_rate(plan, target, seqs):
  """Fraction of the orders in which the test stops the candidate (no bound: threshold -inf)."""
  seqs = np.stack(list(seqs))
  count = lambda idx_pols, a, b: seqs[idx_pols[:, 0, 0], a:b].sum(axis=1)  # noqa: E731
  pols = np.zeros((len(seqs), 1, 2), np.int32)
  pols[:, 0, 0] = np.arange(len(seqs))
  ratio = np.ones(len(seqs))
  out = lazy.evaluate_lazily(count, pols, plan, target, ratio, ratio, float("-inf"))
  assert np.all((out.reason == lazy.BY_TEST) == ~out.exact)
  return float(np.mean(out.reason == lazy.BY_TEST)), out, seqs


def test_test_error_rate_holds_on_every_order_of_a_finite_population():
  """Exhaustive: N = 12 images, looks every 3; for each population that meets the target the
  share of the C(12, M) equally likely orders in which the test stops it is <= alpha."""
  num, target, alpha = 12, 70.0, 0.2  # M* = 9 correct images (75 %)
  plan = lazy.make_plan(num, target, lazy.LazyConfig(chunk=3, alpha=alpha, top_k=1), budget=1)
  assert plan.min_correct == 9 and plan.alpha_look == pytest.approx(alpha / 3)
  for ones in range(num + 1):
    rate, out, seqs = _stop_rate(plan, target, _sequences(num, ones))
    if ones >= plan.min_correct:
      assert rate <= alpha, (ones, rate)
    # a stopped candidate is recorded infeasible (its estimate is below the target)
    est = lazy.accuracy_of(out.correct, out.images)
    assert np.all(est[~out.exact] < target)
    # an exact one has its population's count
    np.testing.assert_array_equal(out.correct[out.exact], seqs[out.exact].sum(axis=1))
  rate_low, _, _ = _stop_rate(plan, target, _sequences(num, 2))
  assert rate_low > 0.9  # and it has power: a 17 % population is nearly always stopped


@settings(max_examples=40, deadline=None)
@given(
  num=st.integers(20, 3000),
  target=st.floats(1.0, 99.9),
  chunk=st.integers(1, 400),
  alpha=st.floats(1e-6, 0.5),
  budget=st.integers(1, 5000),
)
def test_plan_stops_only_inside_the_tail(num, target, chunk, alpha, budget):
  plan = lazy.make_plan(num, target, lazy.LazyConfig(chunk, alpha, 5), budget)
  assert plan.looks[-1] == num and plan.max_correct[-1] == -1
  assert np.all(np.diff(plan.looks) > 0) and np.all(np.diff(plan.looks)[:-1] == chunk)
  m = plan.min_correct
  # M* is the first count that is feasible (as the reward or the float32 history compares)
  acc = lazy.accuracy_of(np.arange(num + 1), num)
  feas = (acc >= target) | (acc.astype(np.float32) >= np.float32(target))
  assert m == (int(np.argmax(feas)) if feas.any() else num + 1)
  for n, k in zip(plan.looks[:-1], plan.max_correct[:-1]):
    if k < 0:
      continue
    assert lazy.accuracy_of(k, n) < target  # the estimate is infeasible
    if m <= num:  # a population meeting the target is stopped with probability <= alpha_look
      assert lazy.hypergeom_cdf(num, m, int(n))[k] <= plan.alpha_look
      assert plan.alpha_look <= alpha / (budget * (len(plan.looks) - 1)) * (1 + 1e-12)


# ----------------------------------------------------------------------------------------------
# The deterministic bound


@settings(max_examples=60, deadline=None)
@given(
  num=st.integers(10, 500),
  frac=st.floats(0.0, 1.0),
  seen_frac=st.floats(0.0, 1.0),
  ratio=st.floats(0.2, 1.5),
  target=st.floats(50.0, 99.0),
)
def test_reward_upper_bound_bounds_every_completion(num, frac, seen_frac, ratio, target):
  seen = max(1, int(seen_frac * num))
  c = int(frac * seen)
  final = np.arange(c, c + num - seen + 1)  # every possible full-split count
  rew = reward_lib.reward(lazy.accuracy_of(final, num), ratio, target, xp=np, speedup=1 / ratio)
  ub = lazy.reward_upper_bound([c], [seen], num, [ratio], target, [1 / ratio])[0]
  assert np.max(rew) <= ub
  assert np.max(rew) == ub or ub == 0.0  # tight (0: the infeasible branch's supremum)


# ----------------------------------------------------------------------------------------------
# An oracle with controlled per-image correctness


def _specs():
  from tests.test_search_env import toy_specs

  return toy_specs(4)


def _table(specs):
  from cimjax import cost as cost_lib
  from cimjax import hw as hw_lib

  return cost_lib.cost_tables(specs, hw_lib.load_hw("rram_64_c2"), xp=np).latency_us


def _oracle(specs, num=400, seed=1):
  syn = acc_lib.SyntheticAccuracy(specs, seed=3, kind="saturating", drop44=6.0)
  return lazy.synthetic_per_image(syn, num, seed=seed)


def _env(specs, src, lazy_cfg, budget=200, acc_drop=1.0):
  sp = space_lib.make_space(len(specs), "io")
  return env_lib.SearchEnv(
    sp, _table(specs), src, acc_drop=acc_drop, budget=budget, acc_ref=90.0, lazy=lazy_cfg
  )


def _batches(specs, n_batches=6, size=40, seed=0):
  sp = space_lib.make_space(len(specs), "io")
  keys = [jax.random.PRNGKey(seed + i) for i in range(n_batches)]
  return [np.asarray(policy_lib.random_policies(k, sp.mask, size)) for k in keys]


def test_stopped_candidates_are_below_target_or_cannot_win_and_winners_are_exact():
  specs = _specs()
  full_src, lazy_src = _oracle(specs), _oracle(specs)
  cfg = lazy.LazyConfig(chunk=50, alpha=1e-3, top_k=3)
  ref, env = _env(specs, full_src, None), _env(specs, lazy_src, cfg)
  for it, b in enumerate(_batches(specs)):
    ref.evaluate(b, it)
    env.evaluate(b, it)
  n = env.used
  h, r = env.history, ref.history
  np.testing.assert_array_equal(h.policies[:n], r.policies[:n])  # same candidates, same rows
  exact = h.exact[:n]
  assert 0 < exact.sum() < n and env.stops["test"] > 0 and env.stops["bound"] > 0
  # the candidates that can still matter are exact, bit for bit as without lazy evaluation
  for f in ("accuracy", "reward", "cost_ratio"):
    np.testing.assert_array_equal(getattr(h, f)[:n][exact], getattr(r, f)[:n][exact], err_msg=f)
  assert np.all(h.images[:n][exact] == 400) and np.all(h.images[:n][~exact] < 400)
  assert np.all(h.images[:n] % 50 == 0)
  # every stopped one is truly infeasible, or its true reward is below the final top-k line
  true_acc, true_rew = r.accuracy[:n], r.reward[:n]
  kth = np.sort(true_rew)[-cfg.top_k]
  stopped = ~exact
  assert np.all((true_acc[stopped] < env.acc_target) | (true_rew[stopped] < kth))
  # the top-k by recorded reward (what the runner re-evaluates) and the winner are unchanged
  top = lambda x: set(np.argsort(-x, kind="stable")[: cfg.top_k].tolist())  # noqa: E731
  assert top(h.reward[:n]) == top(r.reward[:n])
  assert env_lib.best_index(h) == env_lib.best_index(r)
  assert np.all(exact[list(top(h.reward[:n]))])
  # image passes: what the source really scored for the search
  assert env.image_passes == int(h.images[:n].sum()) == lazy_src.image_passes  # acc_ref given
  assert ref.image_passes == n * 400


def test_single_look_and_lazy_off_equal_the_plain_environment():
  """A chunk covering the whole split cannot stop anything: identical to lazy off, which
  records exactly what the source returns."""
  specs = _specs()
  envs = [_env(specs, _oracle(specs), c) for c in (None, lazy.LazyConfig(chunk=400))]
  direct = _oracle(specs)
  for it, b in enumerate(_batches(specs, 3)):
    outs = [e.evaluate(b, it) for e in envs]
    for f in env_lib.EvalOut._fields:
      np.testing.assert_array_equal(getattr(outs[0], f), getattr(outs[1], f), err_msg=f)
  for f in env_lib.History._fields:
    np.testing.assert_array_equal(getattr(envs[0].history, f), getattr(envs[1].history, f))
  # lazy off records what the source returns with the reward of that accuracy, as before
  from cimjax import cost as cost_lib

  h, env = envs[0].history, envs[0]
  n = env.used
  pols = h.policies[:n].astype(np.int32)
  acc = direct(pols)
  cost = cost_lib.policy_cost(env.table, pols)
  rew = reward_lib.reward(
    acc, cost / env.baseline, env.acc_target, xp=np, speedup=env.baseline / cost
  )
  np.testing.assert_array_equal(h.accuracy[:n], acc.astype(np.float32))
  np.testing.assert_array_equal(h.reward[:n], np.asarray(rew).astype(np.float32))
  assert h.exact[:n].all() and env.image_passes == n * 400


def test_image_pass_counter_in_a_constructed_case():
  """N = 400, looks of 100. Batch 1: all correct (exact, 400), all wrong (test, 100), 95 %
  (exact, 400). Batch 2, top-1 line set: a slow all-correct policy (bound after 100)."""
  specs = _specs()
  num = 400
  masks = {}

  def correct(pols):
    return np.stack([masks[space_lib.policy_bytes(p)] for p in pols])

  src = lazy.PerImageAccuracy(correct, num)
  sp = space_lib.make_space(len(specs), "io")
  fast = np.asarray([[8, 8], [2, 2], [2, 2], [8, 8]], np.int32)
  bad = np.asarray([[8, 8], [2, 3], [2, 2], [8, 8]], np.int32)
  good = np.asarray([[8, 8], [4, 4], [3, 3], [8, 8]], np.int32)
  slow = sp.reference_policy()
  rng = np.random.default_rng(0)
  masks[space_lib.policy_bytes(fast)] = np.ones(num, bool)
  masks[space_lib.policy_bytes(bad)] = np.zeros(num, bool)
  masks[space_lib.policy_bytes(good)] = rng.permutation(np.arange(num) < 380)
  masks[space_lib.policy_bytes(slow)] = np.ones(num, bool)
  env = env_lib.SearchEnv(
    sp, _table(specs), src, acc_drop=0.5, budget=4, acc_ref=90.0,
    lazy=lazy.LazyConfig(chunk=100, alpha=0.1, top_k=1),
  )  # fmt: skip
  env.evaluate(np.stack([fast, bad, good]), 0)
  assert env.image_passes == 400 + 100 + 400 and env.stops == {"test": 1, "bound": 0}
  out = env.evaluate(slow[None], 1)
  assert env.image_passes == 1000 and env.stops == {"test": 1, "bound": 1}
  h = env.history
  np.testing.assert_array_equal(h.exact[:4], [True, False, True, False])
  np.testing.assert_array_equal(h.images[:4], [400, 100, 400, 100])
  # what the agent receives for stopped candidates: the estimate on the images seen
  assert h.accuracy[1] == 0.0 and h.reward[1] == np.float32(-10 * 89.5)
  assert out.accuracy[0] == 100.0 and out.reward[0] == pytest.approx(0.1 * 10.5, abs=1e-6)
  assert src.image_passes == 1000  # the reference accuracy was given
  # a repeat of a stopped policy costs nothing and gets its recorded values
  again = env.evaluate(bad[None], 2)
  assert env.image_passes == 1000 and again.reward[0] == h.reward[1] and not again.new[0]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_data_accuracy_chunks_add_up_to_the_full_split(strategy, random_small_cnn):
  m, var, x, y = random_small_cnn(60)
  src = acc_lib.DataAccuracy(m, var, x, y, batch_size=32, strategy=strategy, chunk=2)
  memo = acc_lib.MemoAccuracy(src)
  pols = np.asarray(
    [
      [[8, 8]] * 5,
      [[8, 8], [3, 2], [2, 2], [4, 3], [8, 8]],
      [[8, 8], [2, 2], [2, 2], [2, 2], [8, 8]],
    ],
    np.int32,
  )  # three candidates: the vmapped path pads the last chunk
  full = src(pols)
  parts = sum(memo.chunk_correct(pols, a, min(a + 25, 60)) for a in range(0, 60, 25))
  np.testing.assert_array_equal(lazy.accuracy_of(parts, 60), full)  # bit for bit
  assert lazy.supports_chunks(memo) and not lazy.supports_chunks(
    acc_lib.SyntheticAccuracy(_specs())
  )
  before = src.image_passes
  memo.chunk_correct(pols, 0, 25)  # memoised: not scored again
  assert src.image_passes == before


# ----------------------------------------------------------------------------------------------
# The runner


@pytest.fixture(scope="module")
def task(small_cnn_rram_64_c2):
  m, specs, hw, tables = small_cnn_rram_64_c2
  syn = acc_lib.SyntheticAccuracy(specs, seed=5, drop44=3.0)
  return m, specs, hw, tables, syn


def test_random_search_finds_the_same_best_with_and_without_lazy(task, tmp_path):
  m, specs, hw, tables, syn = task
  res = {}
  for lz in (False, True):
    src = lazy.synthetic_per_image(syn, 500, seed=2)
    final = lazy.synthetic_per_image(syn, 500, seed=3)
    cfg = runner.SearchConfig(
      agent="random", budget=192, constraint="both", seed=1, lazy=lz, lazy_chunk=50, final_top_k=4
    )
    res[lz] = runner.run_search(
      m, specs, tables, src, cfg, hw=hw, final_accuracy=final, workdir=tmp_path / str(lz),
      plots=False,
    )  # fmt: skip
  off, on = res[False], res[True]
  np.testing.assert_array_equal(off.best_policy, on.best_policy)
  assert off.best_reward == on.best_reward
  assert [c["policy"] for c in off.final["candidates"]] == [
    c["policy"] for c in on.final["candidates"]
  ]  # the same top-k re-evaluated, exactly
  assert off.image_passes == 192 * 500 and off.lazy is None
  assert on.image_passes < off.image_passes and on.lazy["image_passes_full"] == 192 * 500
  assert on.lazy["exact"] + on.lazy["stopped_by_test"] + on.lazy["stopped_by_bound"] == 192
  rep = json.loads((tmp_path / "True" / "report.json").read_text())
  assert rep["image_passes"] == on.image_passes and rep["lazy"]["chunk"] == 50
  h = np.load(tmp_path / "True" / "history.npz")
  assert int(h["images"].sum()) == on.image_passes and h["exact"].sum() == on.lazy["exact"]


def test_lazy_search_resumes_exactly(task, tmp_path):
  m, specs, hw, tables, syn = task
  cfg = runner.SearchConfig(
    agent="random", budget=96, constraint="both", seed=3, population=16, checkpoint_every=2,
    lazy=True, lazy_chunk=100,
  )  # fmt: skip
  src = lambda: lazy.synthetic_per_image(syn, 400, seed=4)  # noqa: E731
  full = runner.run_search(m, specs, tables, src(), cfg, hw=hw, workdir=tmp_path / "a", plots=False)
  runner.run_search(
    m, specs, tables, src(), cfg, hw=hw, workdir=tmp_path / "b", stop_after=3, plots=False
  )
  again = runner.run_search(
    m, specs, tables, src(), cfg, hw=hw, workdir=tmp_path / "b", plots=False
  )
  n = full.evals_used
  for f in env_lib.History._fields:
    np.testing.assert_array_equal(
      np.asarray(getattr(full.history, f)), np.asarray(getattr(again.history, f)), err_msg=f
    )
  assert again.lazy == full.lazy and again.image_passes == full.image_passes
  assert n == 96 and full.lazy["exact"] < n


def test_checkpoint_without_lazy_fields_is_read_as_all_exact(tmp_path):
  specs = _specs()
  h = env_lib.empty_history(4, len(specs), np)
  h.accuracy[:2] = [90.0, 80.0]
  old = LoopState(
    agent={"w": np.zeros(2, np.float32)},
    history=env_lib.HistoryV1(*h[:7])._replace(count=np.asarray(2, np.int32)),
    iteration=np.asarray(1, np.int32),
    stall=np.asarray(0, np.int32),
    done=np.asarray(False),
    key=np.zeros(2, np.uint32),
  )
  ck = SearchCheckpointer(tmp_path / "ck")
  ck.save(old, {"search": {"agent": "pg"}})
  target = old._replace(history=h)
  state, _ = runner._restore(ck, target, num_images=300)  # pylint: disable=protected-access
  ck.close()
  np.testing.assert_array_equal(state.history.exact, [True, True, False, False])
  np.testing.assert_array_equal(state.history.images, [300, 300, 0, 0])
  np.testing.assert_array_equal(state.history.accuracy, h.accuracy)


def test_bad_lazy_settings_are_refused_in_one_line(task):
  m, specs, hw, tables, syn = task
  c = pipeline.default_config()
  stages.validate_search(c)  # the default run: lazy off
  assert stages.search_config(c).lazy is False
  del c.search["lazy"]  # a config file from before the fields: their defaults
  stages.validate_search(c)
  assert stages.search_config(c).lazy is False
  for field, value, word in (
    ("lazy", 1, "search.lazy"),
    ("lazy_chunk", 0, "search.lazy_chunk"),
    ("lazy_alpha", 1.5, "search.lazy_alpha"),
  ):
    bad = pipeline.default_config()
    del bad.search[field]  # typed fields refuse another type on assignment; a file may not
    bad.search[field] = value
    with pytest.raises(ConfigError, match=word):
      stages.validate_search(bad)
  scan = pipeline.default_config()
  scan.search.lazy, scan.search.mode = True, "scan"
  with pytest.raises(ConfigError, match="search.mode"):
    stages.validate_search(scan)
  with pytest.raises(ConfigError, match="chunks of images"):
    runner.make_env(specs, tables.latency_us, syn, runner.SearchConfig(lazy=True), hw=hw)
  src = lazy.synthetic_per_image(syn, 100)
  with pytest.raises(ConfigError, match="mode"):
    runner.run_search(
      m, specs, tables, src, runner.SearchConfig(lazy=True, mode="scan", budget=8), hw=hw
    )
  assert math.isfinite(runner.SearchConfig(lazy=True).lazy_config().alpha)


def test_search_cli_flags_reach_the_run_config():
  """``launch.search --lazy --lazy_chunk=50 --lazy_alpha=0.01``: the run config's search section."""
  from cimjax.cli import search as search_cli

  search_cli.FLAGS.unparse_flags()
  try:
    fv = search_cli.parse_args(
      ["launch.search", "--workdir=/tmp/x", "--lazy", "--lazy_chunk=50", "--lazy_alpha=0.01"]
    )
    sc = search_cli.run_config(fv).search
    assert (sc.lazy, sc.lazy_chunk, sc.lazy_alpha) == (True, 50, 0.01)
  finally:
    search_cli.FLAGS.unparse_flags()
  from cimjax import pipeline

  d = pipeline.default_config().search
  assert (d.lazy, d.lazy_chunk, d.lazy_alpha) == (False, 250, 1e-3)


def test_run_report_shows_image_passes():
  """The run report's search section carries the passes and what lazy evaluation saved."""
  from cimjax import report

  lazy = {"chunk": 25, "image_passes_full": 4800, "stopped_by_bound": 3, "stopped_by_test": 14}
  res = {"summary": {"image_passes": 4000, "lazy": lazy}}
  s = report._search(res)
  assert s["image_passes"] == 4000 and s["lazy"] == lazy
  text = report._passes_text(s)
  assert "4,000" in text and "1.20x fewer" in text and "test 14" in text and "bound 3" in text
  plain = report._passes_text(report._search({"summary": {"image_passes": 4800, "lazy": None}}))
  assert plain == " Image-forward passes: 4,800."
