"""The batched evaluator equals a plain single-policy evaluation exactly, for every strategy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimjax import evaluate, models, trace


@pytest.fixture(scope="module")
def setup():
  md = models.get_model("small_cnn")
  v = models.init(md, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(150, 28, 28, 1)).astype(np.float32)
  # Labels from the float model so accuracies are far from chance and differ across policies.
  logits, _ = jax.jit(lambda a: models.forward(md.module, v, a))(x)
  y = np.array(jnp.argmax(logits, -1))
  y[::7] = (y[::7] + 1) % 10
  pols = np.array(jax.random.randint(jax.random.key(1), (7, 5, 2), 2, 9), np.int32)
  pols[0] = 8
  pols[1] = 2
  return md, v, x, y, pols


def _reference(md, v, x, y, policy, batch):
  """Plain Python loop over batches, argmax and cross-entropy in numpy float64."""
  f = jax.jit(lambda a, p: models.forward(md.module, v, a, p)[0])
  correct, loss = 0, 0.0
  for s in range(0, len(x), batch):
    logits = np.asarray(f(x[s : s + batch], jnp.asarray(policy)), np.float64)
    correct += int(np.sum(np.argmax(logits, -1) == y[s : s + batch]))
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss -= float(logp[np.arange(len(logits)), y[s : s + batch]].sum())
  return correct, loss / len(x)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "map", "shard"])
def test_strategies_equal_single_policy_reference(setup, strategy):
  md, v, x, y, pols = setup
  ev = evaluate.make_evaluator(md, v, x, y, strategy=strategy, chunk=3, batch_size=64)
  res = ev(pols)
  assert ev.strategy == strategy and res.accuracy.shape == (7,)
  for i, p in enumerate(pols):
    correct, loss = _reference(md, v, x, y, p, 64)
    assert res.correct[i] == correct, (strategy, i)
    np.testing.assert_allclose(res.loss[i], loss, rtol=2e-5)
  np.testing.assert_allclose(res.accuracy, 100.0 * res.correct / len(x))
  assert res.accuracy[0] > res.accuracy[1]  # 8/8 beats 2/2 on labels from the float model


def test_single_policy_and_helper(setup):
  md, v, x, y, pols = setup
  ev = evaluate.make_evaluator(md, v, x, y, strategy="loop", batch_size=50)
  one = ev(pols[2])
  acc, loss = evaluate.evaluate_policy(md, v, x, y, pols[2], batch_size=40)
  assert one.correct.shape == (1,) and acc == one.accuracy[0]
  np.testing.assert_allclose(loss, one.loss[0], rtol=2e-5)


def test_map_is_one_compiled_call_for_any_n(setup):
  md, v, x, y, pols = setup
  ev = evaluate.make_evaluator(md, v, x, y, strategy="map", chunk=4, batch_size=150)
  a = ev(pols[:4])
  b = ev(pols[4:])  # 3 candidates, padded to one chunk: same shapes, no recompilation
  assert a.correct.shape == (4,) and b.correct.shape == (3,)
  ref = evaluate.make_evaluator(md, v, x, y, strategy="loop", batch_size=150)(pols)
  np.testing.assert_array_equal(np.concatenate([a.correct, b.correct]), ref.correct)


def test_auto_strategy_and_errors(setup):
  md, v, x, y, _ = setup
  assert evaluate.default_strategy() == "loop"  # CPU
  assert evaluate.make_evaluator(md, v, x, y).strategy == "loop"
  with pytest.raises(ValueError, match="strategy = 'fast'; allowed: auto, loop"):
    evaluate.make_evaluator(md, v, x, y, strategy="fast")
  with pytest.raises(ValueError, match="chunk = 0"):
    evaluate.make_evaluator(md, v, x, y, chunk=0)
  ev = evaluate.make_evaluator(md, v, x, y)
  with pytest.raises(ValueError, match=r"\[N, L, 2\]"):
    ev(np.zeros((2, 5, 3), np.int32))


def test_memory_formula():
  specs = trace.trace_specs(models.get_model("small_cnn"))
  a = evaluate.activation_floats(specs)
  assert a == sum((s.n + s.m) * s.invocations * s.repeat for s in specs)
  assert evaluate.chunk_bytes(specs, 1000, chunk=8, batch_size=100) == 4 * 8 * (100 * a + 1000)
  assert evaluate.chunk_bytes(specs, 1000, 16, 100) == 2 * evaluate.chunk_bytes(specs, 1000, 8, 100)
