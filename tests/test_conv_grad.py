"""``cimjax.models.conv_grad.conv2d``: forward bit-identical to ``lax.conv_general_dilated``,
gradients equal to ``jax.grad`` of it (exactly on small integers, to rounding on floats)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax.models.conv_grad import MAX_CHUNKS, chunk_size, conv2d

# The primitive is not on the library's default path (BUILD_NOTES.md: not wired in yet).
pytestmark = pytest.mark.slow

DN = ("NHWC", "HWIO", "NHWC")

# (x shape, kernel shape, strides, padding, chunk): SAME / VALID / explicit, stride 1 and 2,
# chunks that divide the batch, that leave a remainder, one image, the whole batch, default
CONFIGS = [
  ((5, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", 2),
  ((4, 9, 7, 2), (3, 3, 2, 5), (2, 2), "SAME", 1),
  ((6, 8, 8, 3), (3, 3, 3, 4), (1, 1), "VALID", 4),
  ((3, 9, 9, 2), (3, 2, 2, 3), (2, 1), "VALID", 2),
  ((4, 7, 8, 2), (3, 3, 2, 3), (1, 2), ((1, 0), (2, 1)), 3),
  ((4, 10, 10, 1), (5, 5, 1, 2), (2, 2), ((2, 2), (2, 2)), 1),
  ((3, 6, 6, 4), (1, 1, 4, 4), (1, 1), "SAME", 8),
  ((2, 6, 6, 2), (3, 3, 2, 2), (1, 1), "SAME", None),
  ((16, 28, 28, 32), (3, 3, 32, 64), (1, 1), "SAME", None),  # default chunking: 4 chunks
]
CONFIG_IDS = [f"{c[0]}-{c[1]}-s{c[2]}-{c[3]}-c{c[4]}".replace(" ", "") for c in CONFIGS]
JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])


def _lax(x, w, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups
  )


def _mine(strides, padding, chunk, groups=1):
  return lambda a, b: conv2d(
    a, b, strides=strides, padding=padding, feature_group_count=groups, chunk=chunk
  )


def _grads(conv, x, w, g, jit):
  """``(dx, dw)`` of ``sum(conv(x, w) * g)``, jitted or eager."""
  f = jax.grad(lambda a, b, c: jnp.sum(conv(a, b) * c), argnums=(0, 1))
  return (jax.jit(f) if jit else f)(x, w, g)


def _ints(rng, shape, lo=-3, hi=4):
  return jnp.asarray(rng.integers(lo, hi, shape).astype(np.float32))


def _floats(rng, shape):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def _out_shape(x, w, strides, padding):
  return jax.eval_shape(lambda a, b: _lax(a, b, strides, padding), x, w).shape


def _assert_exact(conv, x, w, g, strides, padding, jit, groups=1):
  got = _grads(conv, x, w, g, jit)
  want = _grads(lambda a, b: _lax(a, b, strides, padding, groups), x, w, g, jit)
  for u, v in zip(got, want):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@JIT
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_integer_gradients_exact(cfg, jit):
  """Small integers: every partial sum is exact in float32, so the chunked sum is too."""
  xs, ws, strides, padding, chunk = cfg
  rng = np.random.default_rng(0)
  x, w = _ints(rng, xs), _ints(rng, ws)
  g = _ints(rng, _out_shape(x, w, strides, padding))
  _assert_exact(_mine(strides, padding, chunk), x, w, g, strides, padding, jit)


@JIT
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_float_gradients_close(cfg, jit):
  """Random floats: the input gradient is XLA's own (identical); the filter gradient differs
  by the order of its float32 sums only: within 1e-5 of the largest entry."""
  xs, ws, strides, padding, chunk = cfg
  rng = np.random.default_rng(1)
  x, w = _floats(rng, xs), _floats(rng, ws)
  g = _floats(rng, _out_shape(x, w, strides, padding))
  (dx, dw) = _grads(_mine(strides, padding, chunk), x, w, g, jit)
  (rx, rw) = _grads(lambda a, b: _lax(a, b, strides, padding), x, w, g, jit)
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(rx))
  scale = float(jnp.max(jnp.abs(rw)))
  np.testing.assert_allclose(np.asarray(dw), np.asarray(rw), rtol=1e-5, atol=1e-5 * scale)


@JIT
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_forward_bit_identical(cfg, jit):
  xs, ws, strides, padding, chunk = cfg
  rng = np.random.default_rng(2)
  x, w = _floats(rng, xs), _floats(rng, ws)
  mine = _mine(strides, padding, chunk)
  ref = lambda a, b: _lax(a, b, strides, padding)
  if jit:
    mine, ref = jax.jit(mine), jax.jit(ref)
  np.testing.assert_array_equal(np.asarray(mine(x, w)), np.asarray(ref(x, w)))


_PADDINGS = st.one_of(
  st.sampled_from(["SAME", "VALID"]),
  st.tuples(
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
  ),
)


@settings(max_examples=25, deadline=None)
@given(
  n=st.integers(1, 6),
  hw=st.tuples(st.integers(3, 9), st.integers(3, 9)),
  c=st.integers(1, 4),
  o=st.integers(1, 4),
  k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
  strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
  padding=_PADDINGS,
  chunk=st.one_of(st.none(), st.integers(1, 4)),
  seed=st.integers(0, 2**16),
)
def test_property_integer_gradients_exact(n, hw, c, o, k, strides, padding, chunk, seed):
  """Any shape, stride 1-2, padding, chunk: exact gradients on small integers (jitted)."""
  rng = np.random.default_rng(seed)
  x, w = _ints(rng, (n, *hw, c)), _ints(rng, (*k, c, o))
  g = _ints(rng, _out_shape(x, w, strides, padding))
  _assert_exact(_mine(strides, padding, chunk), x, w, g, strides, padding, jit=True)


@JIT
def test_groups_fall_back_to_lax(jit):
  """feature_group_count > 1 is the plain lax convolution and gradient: identical on floats."""
  rng = np.random.default_rng(3)
  x, w = _floats(rng, (4, 6, 6, 4)), _floats(rng, (3, 3, 2, 6))
  g = _floats(rng, (4, 6, 6, 6))
  mine = _mine((1, 1), "SAME", 1, groups=2)
  _assert_exact(mine, x, w, g, (1, 1), "SAME", jit, groups=2)


def test_vmap_and_precision():
  """vmap over a leading axis and precision=HIGHEST (the float path of cimjax.layers)."""
  rng = np.random.default_rng(4)
  x, w = _ints(rng, (2, 3, 6, 6, 2)), _ints(rng, (3, 3, 2, 3))
  g = _ints(rng, (2, 3, 6, 6, 3))

  def loss(conv):
    return lambda a, b: jnp.sum(jax.vmap(conv, in_axes=(0, None))(a, b) * g)

  mine = lambda a, b: conv2d(a, b, strides=(1, 1), padding="SAME", precision="highest", chunk=1)
  ref = lambda a, b: jax.lax.conv_general_dilated(
    a, b, (1, 1), "SAME", dimension_numbers=DN, precision="highest"
  )
  got = jax.jit(jax.grad(loss(mine), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
  for u, v in zip(got, want):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_chunk_size():
  # the reference CNN at batch 128: conv1 8 images, conv2 4, conv3 8 (the measured best)
  assert chunk_size((128, 28, 28, 1), (128, 28, 28, 32)) == 8
  assert chunk_size((128, 28, 28, 32), (128, 28, 28, 64)) == 4
  assert chunk_size((128, 14, 14, 64), (128, 14, 14, 128)) == 8
  assert chunk_size((1, 28, 28, 32), (1, 28, 28, 64)) == 1  # one image: XLA's own gradient
  assert chunk_size((7, 28, 28, 32), (7, 28, 28, 64)) == 4  # no divisor in [2, 4]: remainder
  n = 64 * MAX_CHUNKS
  assert chunk_size((n, 28, 28, 32), (n, 28, 28, 64)) == 64  # at most MAX_CHUNKS chunks
  assert chunk_size(*CONFIGS[-1][:1], (16, 28, 28, 64)) == 4  # the default-chunk config
  big = (4, 512, 512, 64)
  assert chunk_size(big, big) == 1


@pytest.mark.parametrize("chunk, convs", [(1, 6), (2, 4), (5, 2), (None, 2)])
def test_filter_gradient_is_chunked(chunk, convs):
  """The compiled gradient has one input-gradient conv and one filter-gradient conv a chunk
  (the forward is dead code here: the loss is linear)."""
  f = lambda a, b: jnp.sum(conv2d(a, b, strides=(1, 1), padding="SAME", chunk=chunk))
  grad = jax.jit(jax.grad(f, argnums=(0, 1)))
  hlo = grad.lower(jnp.ones((5, 8, 8, 3)), jnp.ones((3, 3, 3, 4))).compile().as_text()
  assert hlo.count(" convolution(") == convs
