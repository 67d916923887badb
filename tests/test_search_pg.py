"""PG internals: the accuracy model's host fit (against a least-squares oracle), its features,
the success-rule mutation rate and the configuration's errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax.search import env as env_lib
from cimjax.search import pg as pg_lib
from cimjax.search import space as space_lib


def _random_policies(rng, n, num):
  return rng.integers(1, 9, size=(n, num, 2)).astype(np.int32)


def test_model_features_layout():
  pols = np.asarray([[[8, 8], [2, 5]], [[3, 8], [8, 1]]], np.int32)
  x = pg_lib.model_features(pols)
  assert x.shape == (2, 16 * 2 + 17)
  per = x[:, :32].reshape(2, 2, 16)
  assert per[0, 0].sum() == 0.0  # 8/8: the reference
  assert per[0, 1, 1] == 1.0 and per[0, 1, 8 + 4] == 1.0 and per[0, 1].sum() == 2.0
  assert per[1, 0, 2] == 1.0 and per[1, 0].sum() == 1.0
  assert per[1, 1, 8] == 1.0 and per[1, 1].sum() == 1.0
  assert (per[..., 7] == 0).all() and (per[..., 15] == 0).all()
  np.testing.assert_array_equal(x[:, 32:48], per.sum(axis=1))  # shared counts
  np.testing.assert_array_equal(x[:, -1], 1.0)  # intercept


@settings(max_examples=15, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  n1=st.integers(1, 40),
  n2=st.integers(1, 40),
  num=st.integers(1, 4),
  ridge=st.floats(0.01, 3.0),
  tau=st.floats(0.5, 50.0),
)
def test_model_update_is_the_weighted_ridge_solution(seed, n1, n2, num, ridge, tau):
  """Two incremental updates give the weighted ridge regression of all new candidates,
  computed independently by least squares on the augmented system."""
  rng = np.random.default_rng(seed)
  p1, p2 = _random_policies(rng, n1, num), _random_policies(rng, n2, num)
  y1, y2 = rng.normal(0, 2, n1), rng.normal(0, 2, n2)
  new1, new2 = rng.random(n1) < 0.8, rng.random(n2) < 0.8
  d = 16 * num + 17
  g, m, yy, ws = np.zeros((d, d)), np.zeros(d), 0.0, 0.0
  g, m, yy, ws, _, _ = pg_lib.model_update(g, m, yy, ws, p1, y1, new1, ridge, tau)
  g, m, yy, ws, coef, sd = pg_lib.model_update(g, m, yy, ws, p2, y2, new2, ridge, tau)
  x = pg_lib.model_features(np.concatenate([p1, p2]))[np.concatenate([new1, new2])]
  y = np.concatenate([y1, y2])[np.concatenate([new1, new2])]
  w = np.exp(-np.maximum(-y, 0.0) / tau)
  reg = pg_lib.model_ridge_penalty(num, ridge)
  a = np.concatenate([x * np.sqrt(w)[:, None], np.diag(np.sqrt(reg))])
  b = np.concatenate([y * np.sqrt(w), np.zeros(d)])
  ref = np.linalg.lstsq(a, b, rcond=None)[0]
  np.testing.assert_allclose(coef, ref, rtol=2e-3, atol=2e-3)
  assert ws == pytest.approx(w.sum(), rel=1e-5)
  rss = np.sum(w * (x @ ref - y) ** 2)
  assert sd == pytest.approx(np.sqrt(rss / max(w.sum() - 1.0, 1.0)), rel=2e-2, abs=2e-3)


def test_model_update_recovers_an_additive_model():
  """Noise-free additive accuracies are fitted almost exactly (small ridge, many samples)."""
  rng = np.random.default_rng(0)
  num = 3
  true_w, true_a = rng.uniform(-3, 0, (num, 8)), rng.uniform(-3, 0, (num, 8))
  true_w[:, 7] = true_a[:, 7] = 0.0
  pols = _random_policies(rng, 2000, num)
  idx = np.arange(num)
  y = 1.0 + (true_w[idx, pols[..., 0] - 1] + true_a[idx, pols[..., 1] - 1]).sum(axis=1)
  d = 16 * num + 17
  out = pg_lib.model_update(
    np.zeros((d, d)), np.zeros(d), 0.0, 0.0, pols, y, np.ones(len(y), bool), 1e-4, 1e9
  )
  pred = pg_lib.model_features(pols) @ out[4].astype(np.float64)
  np.testing.assert_allclose(pred, y, atol=2e-2)
  assert out[5] < 2e-2


@settings(max_examples=25, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  num=st.integers(1, 6),
  sd=st.floats(0.01, 3.0),
  misfit=st.floats(0.0, 5.0),
)
def test_thompson_std_adds_the_misfit_floor_in_quadrature(seed, num, sd, misfit):
  """Per-layer effects: ``sqrt(sd^2 / diag + (misfit sd)^2 / 2L)``; shared effects and the
  intercept fixed; a policy with all 2L operands below 8 bits spreads by at least misfit sd."""
  rng = np.random.default_rng(seed)
  d = 16 * num + 17
  diag = rng.uniform(0.1, 500.0, d)
  post = pg_lib.thompson_std(diag, sd, num, misfit)
  fit_only = pg_lib.thompson_std(diag, sd, num, 0.0)
  k = 16 * num
  np.testing.assert_allclose(fit_only[:k], sd / np.sqrt(diag[:k]), rtol=1e-12)
  np.testing.assert_allclose(
    post[:k], np.sqrt(sd**2 / diag[:k] + misfit**2 * sd**2 / (2 * num)), rtol=1e-12
  )
  assert (post[k:] == 0.0).all() and (fit_only[k:] == 0.0).all()
  assert (post >= fit_only).all()
  pol = np.stack([rng.integers(1, 8, num), rng.integers(1, 8, num)], axis=-1)[None]
  x = pg_lib.model_features(pol.astype(np.int32))[0]
  assert x[:k].sum() == 2 * num
  assert np.sum(x * post**2) >= (misfit * sd) ** 2 * (1 - 1e-12)


@pytest.fixture(scope="module")
def pg_agent(small_cnn_rram_64_c2):
  _, specs, hw, t = small_cnn_rram_64_c2
  space = space_lib.make_space(len(specs), "both", hw.cell_bits)
  cfg = pg_lib.PGConfig(population=16, plan=4, plan_thompson=1)
  return space, pg_lib.make_pg(space, specs, t.latency_us, cfg, acc_target=90.0), cfg


def _out(n, new, rng):
  acc = jnp.asarray(rng.uniform(85, 95, n), jnp.float32)
  return env_lib.EvalOut(
    accuracy=acc,
    cost_ratio=jnp.full((n,), 0.5, jnp.float32),
    reward=acc - 90.0,
    valid=jnp.ones((n,), bool),
    new=jnp.asarray(new),
    slot=jnp.arange(n, dtype=jnp.int32),
  )


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_mutation_rate_follows_the_success_rule(pg_agent, jit):
  """No new policy among the samples: the rate starts at mutation_min and grows by
  mutation_gain up to 1; all new: it shrinks by the gain and drops to 0 below the minimum."""
  space, agent, cfg = pg_agent
  tell = jax.jit(agent.tell) if jit else agent.tell
  ask = jax.jit(agent.ask) if jit else agent.ask
  rng = np.random.default_rng(0)
  st_ = agent.init(jax.random.PRNGKey(0))
  assert float(st_.mutation) == 0.0
  rates = []
  for i in range(12):
    pols, aux = ask(st_, jax.random.PRNGKey(i))
    st_, _ = tell(
      st_,
      pols,
      _out(cfg.population, np.zeros(cfg.population, bool), rng),
      aux,
      jax.random.PRNGKey(100 + i),
    )
    rates.append(float(st_.mutation))
  expect = [min(cfg.mutation_min * cfg.mutation_gain**k, 1.0) for k in range(12)]
  np.testing.assert_allclose(rates, expect, rtol=1e-5)
  # at rate 1 every sampled layer is redrawn (forced layers stay 8/8), and those samples are
  # off-policy
  pols, aux = ask(st_, jax.random.PRNGKey(99))
  assert space.contains(np.asarray(pols)).all()
  n_sample = cfg.population - cfg.plan
  assert not np.asarray(aux)[:n_sample].all()
  for i in range(40):
    pols, aux = ask(st_, jax.random.PRNGKey(200 + i))
    st_, _ = tell(
      st_,
      pols,
      _out(cfg.population, np.ones(cfg.population, bool), rng),
      aux,
      jax.random.PRNGKey(300 + i),
    )
  assert float(st_.mutation) == 0.0
  pols, aux = ask(st_, jax.random.PRNGKey(7))
  assert np.asarray(aux)[:n_sample].all()  # no mutation: on-policy


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("mutation_target", 1.5, "0 .. 1"),
    ("mutation_gain", 1.0, "> 1"),
    ("mutation_min", 0.0, "(0, 1]"),
    ("population", 1, ">= 2"),
    ("head", "x", "factored"),
    ("plan_ts_misfit", -1.0, ">= 0"),
  ],
)
def test_config_errors_name_the_field(field, value, allowed):
  with pytest.raises(ValueError, match=field) as e:
    dataclasses.replace(pg_lib.PGConfig(), **{field: value})
  assert allowed in str(e.value)
