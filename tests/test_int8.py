"""Tests of the int8 integer products: exactness against int64 oracles, bit-identity with the
float32 path (products, layers, whole models, jit and eager), gradients, mode selection."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import evaluate, layers, models, quant, trace
from cimjax.errors import ConfigError
from cimjax.train import state as state_lib
from cimjax.train import steps

HIGHEST = jax.lax.Precision.HIGHEST
DN = ("NHWC", "HWIO", "NHWC")
BITS = range(1, 9)


# ----------------------------------------------------------------------------------------------
# Oracles (NumPy int64)


def _pads(x_shape, w_shape, strides, padding):
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
  return padding


def np_conv(x, w, strides, padding, groups):
  """int64 NHWC/HWIO grouped convolution with zero padding, by kernel taps."""
  x = np.asarray(x, np.int64)
  w = np.asarray(w, np.int64)
  (pt, pb), (pl, pr) = _pads(x.shape, w.shape, strides, padding)
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw, cg, o = w.shape
  og = o // groups
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  out = np.zeros((x.shape[0], ho, wo, o), np.int64)
  for i, j in itertools.product(range(kh), range(kw)):
    patch = xp[:, i : i + strides[0] * ho : strides[0], j : j + strides[1] * wo : strides[1]]
    for g in range(groups):
      xs = patch[..., g * cg : (g + 1) * cg]
      out[..., g * og : (g + 1) * og] += xs @ w[i, j, :, g * og : (g + 1) * og]
  return out


def _conv(strides, padding, groups, **kw):
  return lambda a, b: jax.lax.conv_general_dilated(
    a, b, strides, padding, dimension_numbers=DN, feature_group_count=groups, **kw
  )


def _codes(key, shape, bits, *, signed, narrow):
  lo, hi, _ = quant.int_range(bits, signed=signed, narrow=narrow)
  return jax.random.randint(key, shape, int(lo), int(hi) + 1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Products on codes: every (w, a) bit pair, signed and unsigned activations


CONVS = [
  ((1, 1), "SAME", 1),
  ((1, 1), "VALID", 1),
  ((2, 2), "SAME", 1),
  ((2, 1), ((1, 0), (2, 1)), 2),
  ((2, 2), "SAME", 4),
]


@pytest.mark.parametrize("strides,padding,groups", CONVS)
def test_conv_int8_exact_all_bits(strides, padding, groups):
  f8 = jax.jit(
    lambda x, w, unsigned: layers.int8_product(
      x, w, _conv(strides, padding, groups, preferred_element_type=jnp.int32), unsigned_x=unsigned
    ),
    static_argnums=2,
  )
  ff = jax.jit(_conv(strides, padding, groups, precision=HIGHEST))
  for wb, ab, signed in itertools.product(BITS, BITS, (True, False)):
    k1, k2 = jax.random.split(jax.random.key(100 * wb + 10 * ab + signed))
    x = _codes(k1, (2, 7, 6, 8), ab, signed=signed, narrow=False)
    w = _codes(k2, (3, 3, 8 // groups, 8), wb, signed=True, narrow=True)
    got = f8(x, w, not signed)
    assert got.dtype == jnp.int32
    ref = np_conv(x, w, strides, padding, groups)
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref, err_msg=f"w{wb} a{ab} {signed}")
    np.testing.assert_array_equal(np.asarray(got, np.float32), ff(x, w))  # float path exact here


def test_conv_int8_exact_at_full_8bit_range():
  """Extreme codes (all 255 x all -127 and +127) with padding: the correction must be exact."""
  x = jnp.full((2, 5, 5, 4), 255.0)
  w = jnp.concatenate([jnp.full((3, 3, 4, 1), -127.0), jnp.full((3, 3, 4, 1), 127.0)], axis=-1)
  for padding in ("SAME", "VALID"):
    prod = _conv((1, 1), padding, 1, preferred_element_type=jnp.int32)
    got = layers.int8_product(x, w, prod, unsigned_x=True)
    np.testing.assert_array_equal(np.asarray(got), np_conv(x, w, (1, 1), padding, 1))


def test_dense_int8_exact_all_bits():
  dense8 = lambda a, b: jnp.einsum("...n,nm->...m", a, b, preferred_element_type=jnp.int32)  # noqa: E731
  f8 = jax.jit(lambda x, w, u: layers.int8_product(x, w, dense8, unsigned_x=u), static_argnums=2)
  for wb, ab, signed in itertools.product(BITS, BITS, (True, False)):
    k1, k2 = jax.random.split(jax.random.key(7 * wb + ab + 100 * signed))
    x = _codes(k1, (3, 4, 37), ab, signed=signed, narrow=False)  # batch, tokens, n
    w = _codes(k2, (37, 5), wb, signed=True, narrow=True)
    ref = np.einsum("btn,nm->btm", np.asarray(x, np.int64), np.asarray(w, np.int64))
    np.testing.assert_array_equal(np.asarray(f8(x, w, not signed), np.int64), ref)


@pytest.mark.parametrize("ux,uw", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_int8_exact_all_bits(ux, uw):
  f8 = jax.jit(lambda x, w: layers.int8_matmul(x, w, unsigned_x=ux, unsigned_w=uw))
  for xb, wb in itertools.product(BITS, BITS):
    k1, k2 = jax.random.split(jax.random.key(10 * xb + wb))
    x = _codes(k1, (2, 3, 6, 19), xb, signed=not ux, narrow=False)
    w = _codes(k2, (2, 3, 19, 4), wb, signed=not uw, narrow=not uw)
    ref = np.einsum("brtn,brnm->brtm", np.asarray(x, np.int64), np.asarray(w, np.int64))
    np.testing.assert_array_equal(np.asarray(f8(x, w), np.int64), ref)


@settings(max_examples=40, deadline=None)
@given(
  batch=st.integers(1, 3),
  h=st.integers(1, 9),
  w_=st.integers(1, 9),
  cg=st.integers(1, 3),
  groups=st.sampled_from([1, 2, 3]),
  og=st.integers(1, 3),
  k=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
  strides=st.sampled_from([(1, 1), (2, 2), (1, 3)]),
  padding=st.sampled_from(["SAME", "VALID", ((2, 0), (1, 3))]),
  seed=st.integers(0, 2**16),
)
@pytest.mark.slow  # tens of seconds on 2 cores; the all-bits exactness tests stay
def test_offset_correction_property_conv(batch, h, w_, cg, groups, og, k, strides, padding, seed):
  """conv(x) = conv(x - 128) + 128 * conv(ones) for every geometry, codes at the extremes too."""
  if padding == "VALID" and (h < k[0] or w_ < k[1]):
    return
  rng = np.random.default_rng(seed)
  x = rng.choice([0, 1, 127, 128, 254, 255], (batch, h, w_, cg * groups)).astype(np.float32)
  w = rng.integers(-127, 128, (*k, cg, og * groups)).astype(np.float32)
  prod = _conv(strides, padding, groups, preferred_element_type=jnp.int32)
  got = layers.int8_product(jnp.asarray(x), jnp.asarray(w), prod, unsigned_x=True)
  np.testing.assert_array_equal(np.asarray(got), np_conv(x, w, strides, padding, groups))


@settings(max_examples=40, deadline=None)
@given(
  t=st.integers(1, 6),
  n=st.integers(1, 40),
  m=st.integers(1, 5),
  ux=st.booleans(),
  uw=st.booleans(),
  seed=st.integers(0, 2**16),
)
@pytest.mark.slow  # tens of seconds on 2 cores; the all-bits exactness tests stay
def test_offset_correction_property_matmul(t, n, m, ux, uw, seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (2, t, n)) if ux else rng.integers(-128, 128, (2, t, n))
  w = rng.integers(0, 256, (2, n, m)) if uw else rng.integers(-128, 128, (2, n, m))
  got = layers.int8_matmul(
    jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), unsigned_x=ux, unsigned_w=uw
  )
  np.testing.assert_array_equal(np.asarray(got, np.int64), np.einsum("btn,bnm->btm", x, w))


def test_int32_sums_beyond_float32_exactness():
  """Where float32 sums are inexact (> 2^24), the int8 path still equals the int64 oracle."""
  x = jnp.full((1, 2048), 255.0)
  w = jnp.full((2048, 1), 127.0) - jnp.arange(2048.0)[:, None] % 2
  dense8 = lambda a, b: jnp.einsum("...n,nm->...m", a, b, preferred_element_type=jnp.int32)  # noqa: E731
  got = layers.int8_product(x, w, dense8, unsigned_x=True)
  ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
  assert ref[0, 0] > 2**24
  np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


# ----------------------------------------------------------------------------------------------
# Layers and models: int8 mode equals float32 mode bit for bit


class _Net(nn.Module):
  """Signed conv (SAME), unsigned conv (stride 2, VALID, 2 groups), attention-style matmuls."""

  @nn.compact
  def __call__(self, x, ctx):
    h = layers.QuantConv(8, signed_input=True, name="c1")(x, ctx)
    h = nn.relu(h)
    h = layers.QuantConv(8, strides=(2, 2), padding="VALID", groups=2, name="c2")(h, ctx)
    h = nn.relu(h)
    b, hh, ww, c = h.shape
    q = h.reshape(b, 1, hh * ww, c)
    s = layers.QuantMatMul(signed_input=False, name="qk")(q, jnp.swapaxes(q, -1, -2), ctx)
    p = jax.nn.softmax(s, axis=-1)
    o = layers.QuantMatMul(signed_input=False, name="av")(p, q, ctx)
    return layers.QuantDense(3, name="fc")(o.reshape(b, -1), ctx)


def _net():
  net = _Net()
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  v = net.init(jax.random.key(1), x, layers.QuantContext())
  return net, v, x


def _all_pairs(num_layers):
  pairs = list(itertools.product(range(2, 9), range(2, 9)))
  return [jnp.asarray([p] * num_layers, jnp.int32) for p in pairs]


@pytest.mark.slow  # tens of seconds on 2 cores; the all-bits exactness tests stay
def test_layers_int8_equal_float_all_bit_pairs():
  net, v, x = _net()
  run = jax.jit(
    lambda p, dt: models.forward(net, v, x, p, int_dtype=dt, capture=True), static_argnums=1
  )
  for pol in _all_pairs(5):
    y_f, st_f = run(pol, "float32")
    y_8, st_8 = run(pol, "int8")
    np.testing.assert_array_equal(y_8, y_f, err_msg=str(pol[0]))
    chex.assert_trees_all_equal(st_8["cim"], st_f["cim"])


class ModelTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("small_cnn", {}))
  def test_model_logits_bit_identical(self, name, kw):
    _model_logits_bit_identical(self.variant, name, kw)

  @chex.variants(with_jit=True, without_jit=True)
  def test_layer_net_bit_identical(self):
    net, v, x = _net()
    pol = jnp.asarray([[8, 8], [5, 8], [3, 7], [8, 3], [2, 2]], jnp.int32)
    f8 = self.variant(lambda p: models.forward(net, v, x, p, int_dtype=jnp.int8)[0])
    ff = self.variant(lambda p: models.forward(net, v, x, p, int_dtype=jnp.float32)[0])
    np.testing.assert_array_equal(f8(pol), ff(pol))


@pytest.mark.slow  # ~70 s on 2 cores
@pytest.mark.parametrize("use_jit", [True, False])
def test_resnet20_logits_bit_identical(use_jit):
  _model_logits_bit_identical(jax.jit if use_jit else (lambda f: f), "resnet20", {"image_size": 8})


def _model_logits_bit_identical(variant, name, kw):
  """A zoo model's logits at a random mixed policy: int8 mode equals float32 mode."""
  md = models.get_model(name, **kw)
  v = models.init(md, jax.random.key(0), batch=2)
  x = jax.random.normal(jax.random.key(1), (2, *md.input_shape))
  n = len(trace.trace_specs(md))
  pol = jax.random.randint(jax.random.key(2), (n, 2), 2, 9)
  f8 = variant(lambda p: models.forward(md.module, v, x, p, int_dtype="int8")[0])
  ff = variant(lambda p: models.forward(md.module, v, x, p, int_dtype="float32")[0])
  out8 = f8(pol)
  assert np.all(np.isfinite(out8))
  np.testing.assert_array_equal(out8, ff(pol))  # same variant: the same float ops around


@pytest.mark.slow  # minutes of eager gradients / ResNet-18 compiles on 2 cores
def test_resnet18_logits_bit_identical():
  md = models.get_model("resnet18", image_size=32, num_classes=10)
  v = models.init(md, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, *md.input_shape))
  n = len(trace.trace_specs(md))
  pol = jax.random.randint(jax.random.key(3), (n, 2), 2, 9)
  run = jax.jit(lambda p, dt: models.forward(md.module, v, x, p, int_dtype=dt)[0], static_argnums=1)
  out8, out32 = run(pol, "int8"), run(pol, "float32")
  assert np.all(np.isfinite(out8))
  np.testing.assert_array_equal(out8, out32)


def test_vmap_over_policies_int8_equals_float():
  md = models.get_model("small_cnn")
  v = models.init(md, jax.random.key(0), batch=2)
  x = jax.random.normal(jax.random.key(1), (3, *md.input_shape))
  pols = jax.random.randint(jax.random.key(4), (4, 5, 2), 2, 9)
  f = lambda dt: jax.jit(jax.vmap(lambda p: models.forward(md.module, v, x, p, int_dtype=dt)[0]))  # noqa: E731
  np.testing.assert_array_equal(f("int8")(pols), f("float32")(pols))


def test_bits_above_8_poison_in_int8_mode():
  """A policy wider than int8 (outside the clip tables) gives NaN, never wrapped codes."""
  net, v, x = _net()
  pol = jnp.asarray([[8, 8], [8, 9], [8, 8], [8, 8], [8, 8]], jnp.int32)
  assert np.all(np.isfinite(models.forward(net, v, x, pol)[0]))
  assert np.all(np.isnan(models.forward(net, v, x, pol, int_dtype="int8")[0]))


def test_wide_tables_fall_back_to_float():
  """Layers whose clip tables allow > 8 bits run the float32 product in int8 mode."""

  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
      return layers.QuantDense(4, max_bits=12, signed_input=True)(x, ctx)

  m = Wide()
  x = jax.random.normal(jax.random.key(0), (3, 16))
  v = m.init(jax.random.key(1), x, layers.QuantContext())
  pol = jnp.asarray([[12, 11]], jnp.int32)
  y8 = models.forward(m, v, x, pol, int_dtype="int8")[0]
  np.testing.assert_array_equal(y8, models.forward(m, v, x, pol)[0])
  assert layers.int8_fits(8, None) and not layers.int8_fits(12, None)
  assert layers.int8_fits(12, (8, 8)) and not layers.int8_fits(8, (8, 9))


# ----------------------------------------------------------------------------------------------
# Gradients: the int8 forward keeps the float path's gradients exactly


def _resnet_loss():
  md = models.get_model("resnet20", image_size=8)
  v = models.init(md, jax.random.key(0), batch=2)
  x = jax.random.normal(jax.random.key(1), (4, *md.input_shape))
  y = jnp.asarray([0, 1, 2, 3])
  pol = jax.random.randint(jax.random.key(2), (len(trace.trace_specs(md)), 2), 2, 9)

  def loss(params, xin, dt):
    variables = {**v, "params": params}
    logits, _ = models.forward(md.module, variables, xin, pol, train=True, int_dtype=dt)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return loss, v["params"], x


@pytest.mark.slow  # minutes of eager gradients / ResNet-18 compiles on 2 cores
def test_grads_equal_float_path_eager():
  """Op by op (no XLA re-fusion), the int8 forward's gradients are the float path's exactly."""
  loss, params, x = _resnet_loss()
  g = jax.grad(loss, argnums=(0, 1))
  g8, gf = g(params, x, "int8"), g(params, x, "float32")
  chex.assert_trees_all_equal(g8, gf)
  assert float(jnp.abs(gf[1]).max()) > 0  # the STE gradient reaches the input


@pytest.mark.slow  # minutes of eager gradients / ResNet-18 compiles on 2 cores
def test_grads_jit_within_float_paths_own_compile_noise():
  """Jitted, XLA fuses the two programs differently (float reassociation in the backward), so
  the bound is the float path's own jit-vs-eager difference, or 0.5 % of the leaf's largest
  gradient (a clip table's gradient sums many terms), leaf by leaf."""
  loss, params, x = _resnet_loss()
  g = jax.grad(loss, argnums=(0, 1))
  gj = jax.jit(g, static_argnums=2)
  g8, gf, ge = gj(params, x, "int8"), gj(params, x, "float32"), g(params, x, "float32")
  for a, b, c in zip(jax.tree.leaves(g8), jax.tree.leaves(gf), jax.tree.leaves(ge)):
    own = float(jnp.abs(b - c).max())
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a - b).max()) <= max(2 * own, 5e-3 * scale) + 1e-12


@pytest.mark.slow  # minutes of eager gradients / ResNet-18 compiles on 2 cores
def test_grads_single_layer_net():
  net, v, x = _net()
  pol = jnp.asarray([[8, 8], [5, 8], [3, 7], [8, 3], [4, 2]], jnp.int32)

  def loss(params, dt):
    return jnp.sum(models.forward(net, {**v, "params": params}, x, pol, int_dtype=dt)[0] ** 2)

  g = jax.jit(jax.grad(loss), static_argnums=1)
  g8, gf = g(v["params"], "int8"), g(v["params"], "float32")
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(gf)):  # reassociated sums only
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.abs(b).max()) + 1e-12)
  eager = jax.grad(loss)
  chex.assert_trees_all_equal(eager(v["params"], "int8"), eager(v["params"], "float32"))


@pytest.mark.slow  # minutes of eager gradients / ResNet-18 compiles on 2 cores
def test_train_step_int8_equals_float32():
  md = models.get_model("small_cnn")
  v = models.init(md, jax.random.key(0), batch=2)
  tx = optax.sgd(0.1)
  x = jax.random.normal(jax.random.key(1), (4, *md.input_shape))
  y = jnp.asarray([0, 1, 2, 3])
  pol = jnp.asarray([[8, 8], [4, 3], [6, 2], [3, 8], [8, 8]], jnp.int32)
  outs = []
  for mode in ("float32", "int8"):
    cfg = steps.StepConfig.create(md, tx, int_mode=mode)
    st0 = state_lib.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(9))
    new, metrics = steps.train_step(st0, (x, y), pol, config=cfg)  # eager: op for op
    outs.append((new.params, metrics["loss"]))
  chex.assert_trees_all_equal(outs[0], outs[1])
  with pytest.raises(ConfigError):
    steps.StepConfig.create(md, tx, int_mode="int4")


# ----------------------------------------------------------------------------------------------
# Mode selection


def test_resolve_modes(monkeypatch):
  assert layers.resolve_int_dtype("auto", "cpu") == np.float32
  assert layers.resolve_int_dtype("auto") == np.float32  # tests run on CPU
  assert layers.resolve_int_dtype("int8") == np.int8
  assert layers.resolve_int_dtype("int32") == np.int32
  assert layers.resolve_int_dtype(jnp.int32) == np.int32
  assert layers.resolve_int_dtype(np.dtype("float32")) == np.float32
  for bad in ("int4", "fp16"):
    with pytest.raises(ConfigError, match="allowed: auto, float32, int32, int8"):
      layers.resolve_int_dtype(bad)
  with pytest.raises(ConfigError, match="int_dtype"):
    layers.resolve_int_dtype(jnp.float16)
  monkeypatch.setattr(layers, "int8_self_check", lambda platform: platform == "gpu")
  assert layers.resolve_int_dtype("auto", "gpu") == np.int8
  assert layers.resolve_int_dtype("auto", "tpu") == np.float32  # self-check failed


def test_self_check_passes_on_cpu():
  assert layers.int8_self_check("cpu")


@pytest.mark.slow  # tens of seconds on 2 cores; the all-bits exactness tests stay
def test_evaluator_modes_agree():
  md = models.get_model("small_cnn")
  v = models.init(md, jax.random.key(0), batch=2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, *md.input_shape)).astype(np.float32)
  y = rng.integers(0, 10, 30)
  pols = np.asarray(jax.random.randint(jax.random.key(5), (3, 5, 2), 2, 9))
  ev8 = evaluate.make_evaluator(
    md, v, x, y, strategy="vmap", chunk=2, batch_size=16, int_mode="int8"
  )
  evf = evaluate.make_evaluator(md, v, x, y, strategy="vmap", chunk=2, batch_size=16)
  assert ev8.int_dtype == np.int8 and evf.int_dtype == np.float32
  r8, rf = ev8(pols), evf(pols)
  np.testing.assert_array_equal(r8.correct, rf.correct)
  np.testing.assert_array_equal(r8.loss, rf.loss)
  acc8 = evaluate.evaluate_policy(md, v, x, y, pols[0], batch_size=16, int_mode="int8")
  assert acc8 == evaluate.evaluate_policy(md, v, x, y, pols[0], batch_size=16)
  with pytest.raises(ConfigError):
    evaluate.make_evaluator(md, v, x, y, int_mode="int4")
