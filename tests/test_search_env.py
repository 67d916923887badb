"""Search space, policy keys, and the environment's cache and budget-counter semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimjax import cost as cost_lib
from cimjax import policy as policy_lib
from cimjax.search import accuracy as acc_lib
from cimjax.search import env as env_lib
from cimjax.search import space as space_lib
from cimjax.spec import LayerSpec


def toy_specs(num=4):
  return [
    LayerSpec(
      name=f"l{i}",
      kind="Conv2D" if i < num - 1 else "Dense",
      m=16 * (i + 1),
      n=9 * (i + 2),
      invocations=max(1, 64 // (i + 1)),
      in_channels=4,
      out_channels=16 * (i + 1),
      kernel=(3, 3),
      stride=1,
      input_size=64,
      signed_input=(i == 0),
    )
    for i in range(num)
  ]


class CountingSource(acc_lib.AccuracySource):
  """A synthetic source that records every policy it is asked about."""

  def __init__(self, specs):
    self.inner = acc_lib.SyntheticAccuracy(specs, seed=3)
    self.fn = self.inner.fn
    self.name = "counting"
    self.seen = []

  def __call__(self, policies):
    p = np.asarray(policies)
    self.seen.extend(space_lib.policy_bytes(x) for x in p)
    return self.inner(p)


@pytest.mark.parametrize(
  "constraint, cell, expected_size",
  [
    ("none", None, 49**4),
    ("io", None, 49**2),
    ("weight", 4, 14**4),
    ("both", 4, 14**2),
    ("both", 2, 28**2),
  ],
)
def test_space_sizes_and_forced_layers(constraint, cell, expected_size):
  sp = space_lib.make_space(4, constraint, cell)
  assert sp.size == expected_size
  assert sp.mask.shape == (4, 8, 8)
  if constraint in ("io", "both"):
    for l in (0, 3):
      assert sp.options_per_layer[l] == 1 and sp.mask[l, 7, 7]
    assert sp.free_layers.tolist() == [1, 2]
  if constraint in ("weight", "both"):
    assert sp.w_options[1].tolist() == [b for b in range(2, 9) if b % cell == 0]


def test_check_names_candidate_and_layer():
  sp = space_lib.make_space(4, "both", 4)
  pol = np.full((4, 2), 8, np.int32)
  sp.check(pol)
  pol[0] = (4, 8)  # a forced layer at 4 bits
  with pytest.raises(policy_lib.PolicyError, match="candidate 0, layer 0"):
    sp.check(pol)
  pol[0] = (8, 8)
  pol[2] = (3, 8)  # not a multiple of the 4-bit cell
  with pytest.raises(policy_lib.PolicyError, match="layer 2"):
    sp.check(pol[None])


def test_policy_keys_exact_and_enumeration_roundtrip():
  sp = space_lib.make_space(7, "weight", 2, min_bits=2, max_bits=8)
  pols = space_lib.enumerate_policies(sp, 12345, 500)
  keys = space_lib.policy_keys(pols, np)
  assert keys.shape == (500, 2)
  assert len({k.tobytes() for k in keys}) == 500  # distinct
  np.testing.assert_array_equal(np.asarray(space_lib.policy_keys(jnp.asarray(pols))), keys)
  idx = space_lib.option_indices(sp, pols, np)
  np.testing.assert_array_equal(idx, np.arange(12345, 12845))
  np.testing.assert_array_equal(
    np.asarray(space_lib.enumerate_policies_jnp(sp, jnp.arange(12345, 12845, dtype=jnp.int32))),
    pols,
  )


def _batch(sp, key, n):
  return np.array(policy_lib.random_policies(key, sp.mask, n))


def test_host_cache_and_budget_counter():
  specs = toy_specs()
  sp = space_lib.make_space(4, "both", 4)  # 196 policies
  table = cost_lib.cost_tables(specs, _hw(), xp=np).latency_us
  src = CountingSource(specs)
  env = env_lib.SearchEnv(sp, table, src, acc_drop=0.5, budget=10)
  assert env.used == 0 and len(src.seen) == 1  # the reference, not counted
  a = space_lib.enumerate_policies(sp, 0, 6)  # 6 distinct policies
  a[3] = a[1]  # repeat within the batch
  out = env.evaluate(a)
  assert env.used == 5 and out.new.sum() == 5 and out.valid.all()
  assert out.slot[3] == out.slot[1] and not out.new[3]
  assert out.reward[3] == out.reward[1]
  n_seen = len(src.seen)
  out2 = env.evaluate(a)  # all cached: free
  assert env.used == 5 and not out2.new.any() and out2.valid.all()
  assert len(src.seen) == n_seen  # never evaluated twice
  np.testing.assert_array_equal(out2.reward, out.reward)
  b = space_lib.enumerate_policies(sp, 100, 8)  # 8 new distinct policies
  out3 = env.evaluate(b)  # 5 left in the budget
  assert env.used == 10 and env.exhausted
  assert out3.new.tolist() == [True] * 5 + [False] * 3
  assert out3.valid.tolist() == [True] * 5 + [False] * 3
  assert (out3.reward[5:] == 0).all()
  # the history holds each policy once, in evaluation order
  h = env.history
  keys = {space_lib.policy_bytes(p) for p in h.policies[:10]}
  assert len(keys) == 10
  # the recorded reward is the formula's
  from cimjax.search import reward as reward_lib

  np.testing.assert_allclose(
    h.reward[:10],
    reward_lib.reward(
      h.accuracy[:10].astype(np.float64),
      h.cost_ratio[:10].astype(np.float64),
      env.acc_target,
      xp=np,
    ),
    rtol=1e-5,
    atol=1e-4,
  )


def _hw():
  from cimjax import hw as hw_lib

  return hw_lib.load_hw("rram_64_c2")


def test_in_graph_env_matches_host_env():
  specs = toy_specs()
  sp = space_lib.make_space(4, "none", None)
  table = cost_lib.cost_tables(specs, _hw(), xp=np).latency_us
  src = acc_lib.SyntheticAccuracy(specs, seed=1)
  host = env_lib.SearchEnv(sp, table, src, acc_drop=0.5, budget=20)
  params = host.params
  hist = env_lib.empty_history(20, 4)
  step = jax.jit(lambda h, p, i: env_lib.evaluate_in_graph(params, h, p, src.fn, i))
  for i in range(4):
    pols = _batch(sp, jax.random.PRNGKey(i % 3), 8)  # keys 0,1,2,0: a full repeat
    pols[-1] = pols[0]
    out_h = host.evaluate(pols, i)
    hist, out_g = step(hist, jnp.asarray(pols), i)
    for f in ("valid", "new", "slot"):
      np.testing.assert_array_equal(np.asarray(getattr(out_g, f)), getattr(out_h, f), err_msg=f)
    np.testing.assert_allclose(np.asarray(out_g.reward), out_h.reward, rtol=1e-5, atol=1e-4)
  assert int(hist.count) == host.used == 20
  np.testing.assert_array_equal(np.asarray(hist.policies), host.history.policies)
  np.testing.assert_array_equal(np.asarray(hist.iteration), host.history.iteration)


def test_pareto_front():
  c = np.asarray([0.5, 0.4, 0.6, 0.4, 0.9])
  a = np.asarray([88.0, 87.0, 89.0, 86.0, 88.5])
  assert env_lib.pareto_front(c, a).tolist() == [1, 0, 2]
