"""Tests for cimjax.quant: integer oracle, STE gradients, traced bits, vmap, no re-tracing."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import quant


def _ref_range(bits, signed, narrow):
  if not signed:
    return 0, 2**bits - 1, 2**bits - 1
  if narrow:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2 ** (bits - 1)


def _ref_codes(values, bits, signed, narrow, step):
  """Pure-Python oracle: clamp(round_half_even(x / step))."""
  lo, hi, _ = _ref_range(bits, signed, narrow)
  return [min(max(round(v / step), lo), hi) for v in values]


MODES = [(True, True), (True, False), (False, False)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed,narrow", MODES)
def test_exhaustive_integer_grid(bits, signed, narrow):
  if bits == 1 and signed and narrow:
    pytest.skip("1-bit narrow signed has no nonzero code")
  lo, hi, denom = _ref_range(bits, signed, narrow)
  step = 2.0**-3  # exact binary step: x / step is exact
  clip = step * denom
  # Every half-integer multiple of the step from below lo to above hi, plus quarter points.
  grid = np.arange(2 * (lo - 3), 2 * (hi + 3) + 1) / 2.0
  values = np.concatenate([grid, grid + 0.25]) * step
  q, s = quant.quantize(
    jnp.asarray(values, jnp.float32), jnp.float32(clip), bits, signed=signed, narrow=narrow
  )
  assert float(s) == step
  np.testing.assert_array_equal(
    np.asarray(q), _ref_codes(values.tolist(), bits, signed, narrow, step)
  )
  rng = quant.int_range(bits, signed=signed, narrow=narrow)
  assert (float(rng.lo), float(rng.hi), float(rng.denom)) == (lo, hi, denom)


def test_round_half_to_even():
  q, _ = quant.quantize(
    jnp.array([0.5, 1.5, 2.5, -0.5, -1.5]), jnp.float32(7.0), 4, signed=True, narrow=True
  )
  np.testing.assert_array_equal(q, [0.0, 2.0, 2.0, -0.0, -2.0])


@given(
  bits=st.integers(2, 8),
  mode=st.sampled_from(MODES),
  x=st.lists(
    st.floats(-4, 4, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=32
  ),
  clip=st.floats(0.0625, 3.0, allow_subnormal=False, width=32),
)
@settings(max_examples=60, deadline=None)
def test_codes_in_range_and_error_bounded(bits, mode, x, clip):
  signed, narrow = mode
  x = jnp.asarray(x, jnp.float32)
  q, step = quant.quantize(x, jnp.float32(clip), bits, signed=signed, narrow=narrow)
  lo, hi, _ = _ref_range(bits, signed, narrow)
  assert np.all(np.asarray(q) >= lo) and np.all(np.asarray(q) <= hi)
  np.testing.assert_array_equal(q, np.round(q))
  xr = np.asarray(x)
  inside = (xr >= lo * float(step)) & (xr <= hi * float(step))
  err = np.abs(np.asarray(q) * float(step) - xr)
  assert np.all(err[inside] <= float(step) / 2 * (1 + 1e-5))


def test_ste_gradients():
  clip, bits = jnp.float32(1.0), 3  # signed narrow: step 1/3, codes -3..3
  x = jnp.array([-2.0, -0.4, 0.1, 0.55, 2.0], jnp.float32)
  gx = jax.grad(lambda v: quant.fake_quant(v, clip, bits, signed=True, narrow=True).sum())(x)
  np.testing.assert_allclose(gx, [0.0, 1.0, 1.0, 1.0, 0.0])
  # LSQ/PACT gradient for the clip: (round(x/s) - x/s) / denom inside, +-hi/denom outside.
  gc = jax.vmap(
    jax.grad(lambda c, v: quant.fake_quant(v, c, bits, signed=True, narrow=True)), in_axes=(None, 0)
  )(clip, x)
  s = 1.0 / 3.0
  inside = np.round(np.asarray(x) / s) / 3.0 - np.asarray(x) / s / 3.0
  expected = np.where(np.asarray(x) > 1.0, 1.0, np.where(np.asarray(x) < -1.0, -1.0, inside))
  np.testing.assert_allclose(gc, expected, rtol=1e-5, atol=1e-6)


class TracedBitsTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*MODES)
  def test_traced_bits_match_static(self, signed, narrow):
    x = jax.random.normal(jax.random.key(0), (64,)) * 2
    fn = self.variant(
      lambda v, b: quant.fake_quant(v, jnp.float32(1.5), b, signed=signed, narrow=narrow)
    )
    for b in range(2, 9):
      np.testing.assert_array_equal(
        fn(x, jnp.int32(b)), quant.fake_quant(x, jnp.float32(1.5), b, signed=signed, narrow=narrow)
      )

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_bits_equals_loop(self):
    x = jax.random.normal(jax.random.key(1), (5, 16))
    clip = jnp.linspace(0.5, 2.0, 16)  # per-channel along the last axis
    bits = jnp.array([2, 3, 5, 7, 8], jnp.int32)
    f = self.variant(jax.vmap(lambda v, b: quant.quantize_weight(v, clip, b)[0]))
    out = f(x, bits)
    for i in range(5):
      np.testing.assert_array_equal(out[i], quant.quantize_weight(x[i], clip, int(bits[i]))[0])


def test_no_retrace_when_bits_change():
  traces = []

  @jax.jit
  def f(x, bits):
    traces.append(1)
    return quant.quantize_act(x, jnp.float32(2.0), bits, signed=False)[0]

  x = jnp.linspace(0, 3, 32)
  outs = {b: f(x, jnp.int32(b)) for b in range(1, 9)}
  assert len(traces) == 1
  assert len({tuple(np.asarray(o).tolist()) for o in outs.values()}) == 8


def test_gather_clip_per_bit_table():
  table = jnp.arange(1.0, 9.0)[:, None] * jnp.ones((8, 3))
  for b in range(1, 9):
    np.testing.assert_array_equal(quant.gather_clip(table, jnp.int32(b)), [b, b, b])
  bits = jnp.array([2, 8])
  np.testing.assert_array_equal(
    jax.vmap(lambda b: quant.gather_clip(table, b))(bits)[:, 0], [2.0, 8.0]
  )


@pytest.mark.parametrize("bits,signed,narrow", itertools.product([2, 4, 8], [True], [True]))
def test_mse_optimal_clip_beats_max(bits, signed, narrow):
  rng = np.random.default_rng(0)
  w = rng.standard_t(3, size=(200, 4)).astype(np.float32)
  best = quant.mse_optimal_clip(w, bits, signed=signed, narrow=narrow, axis=1)
  assert best.shape == (4,)
  amax = np.abs(w).max(0)
  for c in range(4):

    def mse(clip, c=c):
      q = quant.fake_quant(
        jnp.asarray(w[:, c]), jnp.float32(clip), bits, signed=signed, narrow=narrow
      )
      return float(jnp.mean((q - w[:, c]) ** 2))

    assert 0 < best[c] <= amax[c] * (1 + 1e-6)
    assert mse(best[c]) <= mse(amax[c]) + 1e-9
  if bits == 2:  # heavy tails: the optimal 2-bit clip is well inside the max
    assert np.all(best < 0.8 * amax)


def test_eager_jit_and_vmap_codes_identical():
  # XLA may rewrite x / (clip / denom) as (x * denom) / clip, which rounds differently at .5
  # ties; the quantizer must give the same codes eagerly, under jit and under vmap.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1_000_000,)), jnp.float32)
  clip = jnp.float32(3.7)
  jitted = jax.jit(lambda v, c, b: quant.quantize_weight(v, c, b)[0])
  for b in range(2, 9):
    eager = quant.quantize_weight(x, clip, b)[0]
    np.testing.assert_array_equal(jitted(x, clip, jnp.int32(b)), eager)
  bits = jnp.array([3, 6], jnp.int32)
  vm = jax.jit(jax.vmap(lambda bb: quant.quantize_weight(x[:1000], clip, bb)[0]))(bits)
  for i, b in enumerate([3, 6]):
    np.testing.assert_array_equal(vm[i], quant.quantize_weight(x[:1000], clip, b)[0])
