"""Tests for cimjax.layers: policy rows in call order, integer operands, hooks, vmap, retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cimjax import layers, models, quant, trace

HIGHEST = jax.lax.Precision.HIGHEST


def _small():
  md = models.get_model("small_cnn")
  variables = models.init(md, jax.random.key(0), batch=2)
  x = jax.random.normal(jax.random.key(1), (4, *md.input_shape))
  return md, variables, x


def test_policy_length_checked():
  md, v, x = _small()
  f = lambda p: jax.eval_shape(lambda q: models.forward(md.module, v, x, q)[0], p)
  with pytest.raises(layers.PolicyLengthError, match="policy has 4 rows but the model has more"):
    f(jnp.full((4, 2), 8, jnp.int32))
  with pytest.raises(layers.PolicyLengthError, match="policy has 6 rows but the model has 5"):
    f(jnp.full((6, 2), 8, jnp.int32))
  assert f(jnp.full((5, 2), 8, jnp.int32)).shape == (4, 10)


def test_dense_matches_manual_integer_computation():
  md, v, x = _small()
  pol = jnp.array([[8, 8], [6, 5], [4, 4], [3, 7], [2, 2]], jnp.int32)
  _, state = jax.jit(lambda p: models.forward(md.module, v, x, p, capture=True))(pol)
  p = v["params"]["fc2"]
  cim = state["cim"]["fc2"]
  x_int, w_int, acc = cim["x_int"][0], cim["w_int"][0], cim["acc"][0]
  w_ref, _ = quant.quantize_weight(p["kernel"], p["w_clip"][1], 2)
  np.testing.assert_array_equal(w_int, w_ref)
  assert np.abs(np.asarray(w_int)).max() <= 1  # 2-bit narrow: codes -1..1
  assert np.asarray(x_int).min() >= 0 and np.asarray(x_int).max() <= 3  # 2-bit unsigned
  acc_ref = np.asarray(x_int, np.int64) @ np.asarray(w_int, np.int64)
  np.testing.assert_array_equal(np.asarray(acc, np.int64), acc_ref)


def test_first_layer_signed_others_unsigned():
  md, v, x = _small()
  pol = jnp.full((5, 2), 4, jnp.int32)
  _, state = jax.jit(lambda p: models.forward(md.module, v, x, p, capture=True))(pol)
  conv1 = np.asarray(state["cim"]["conv1"]["x_int"][0])
  conv2 = np.asarray(state["cim"]["conv2"]["x_int"][0])
  assert conv1.min() < 0 and conv1.min() >= -8 and conv1.max() <= 7
  assert conv2.min() >= 0 and conv2.max() <= 15


@pytest.mark.parametrize(
  "groups,strides,padding",
  [
    (1, (1, 1), "SAME"),
    (2, (2, 2), "VALID"),
    (4, (1, 2), ((1, 0), (2, 1))),
    (8, (2, 1), "SAME"),
  ],
)
def test_conv_as_matmul_equals_conv(groups, strides, padding):
  kx, kw = jax.random.split(jax.random.key(groups))
  x = jax.random.randint(kx, (2, 9, 7, 8), -8, 8).astype(jnp.float32)
  w = jax.random.randint(kw, (3, 2, 8 // groups, 16), -7, 8).astype(jnp.float32)
  ref = jax.lax.conv_general_dilated(
    x,
    w,
    strides,
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    precision=HIGHEST,
  )
  out = layers.conv_as_matmul(
    x,
    w,
    strides=strides,
    padding=padding,
    groups=groups,
    mvm=lambda a, b: jnp.einsum("rtn,rnm->rtm", a, b, precision=HIGHEST),
  )
  np.testing.assert_array_equal(out, ref)


def _plain_mvm(index, spec, x, w, w_bits, a_bits):
  del index, w_bits, a_bits
  assert spec is not None and x.shape[-1] == w.shape[-2] == spec.n and w.shape[-1] == spec.m
  return jnp.einsum("rtn,rnm->rtm", x, w, precision=HIGHEST)


@pytest.mark.parametrize(
  "name,kw",
  [
    ("small_cnn", {}),
    pytest.param("resnet20", {"image_size": 8}, marks=pytest.mark.slow),
    ("vgg16", {"image_size": 16, "cfg": (8, "M", 16, "M"), "hidden": (32, 32)}),
    pytest.param(
      "vit_b32",
      {"image_size": 64, "depth": 1, "hidden": 64, "num_heads": 4, "mlp_dim": 128},
      marks=pytest.mark.slow,
    ),
  ],
)
def test_hook_and_int32_paths_equal_native(name, kw):
  md = models.get_model(name, **kw)
  v = models.init(md, jax.random.key(0), batch=2)
  x = jax.random.normal(jax.random.key(1), (2, *md.input_shape))
  n = len(trace.trace_specs(md))
  pol = jax.random.randint(jax.random.key(2), (n, 2), 2, 9)
  run = jax.jit(
    lambda p, **kw: models.forward(md.module, v, x, p, **kw),
    static_argnames=("mvm", "capture", "int_dtype"),
  )
  native, st_native = run(pol, capture=True)
  hooked, st_hook = run(pol, mvm=_plain_mvm, capture=True)
  exact, _ = run(pol, int_dtype=jnp.int32)
  np.testing.assert_array_equal(hooked, native)
  np.testing.assert_array_equal(exact, native)
  chex.assert_trees_all_equal(st_hook["cim"], st_native["cim"])


class VmapTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_policies_equals_loop(self):
    md, v, x = _small()
    pols = jax.random.randint(jax.random.key(3), (4, 5, 2), 2, 9)
    f = self.variant(lambda p: models.forward(md.module, v, x, p, capture=True))
    out, st = jax.vmap(f)(pols)
    for i in range(4):
      o, s = f(pols[i])
      np.testing.assert_allclose(out[i], o, rtol=1e-6, atol=1e-6)
      for lname in s["cim"]:  # integer operands are exact under vmap
        np.testing.assert_array_equal(st["cim"][lname]["acc"][0][i], s["cim"][lname]["acc"][0])


def test_bits_change_without_retrace():
  md, v, x = _small()
  traces = []

  @jax.jit
  def f(p):
    traces.append(1)
    return models.forward(md.module, v, x, p)[0]

  outs = [f(jnp.full((5, 2), b, jnp.int32)) for b in range(2, 9)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[-1])


def test_gradients_reach_weights_and_clips():
  md, v, x = _small()
  pol = jnp.full((5, 2), 4, jnp.int32)
  y = jnp.arange(4) % 10

  def loss(params):
    logits, _ = models.forward(md.module, {"params": params}, x, pol)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  g = jax.jit(jax.grad(loss))(v["params"])
  for lname in ("conv1", "conv2", "fc1", "fc2"):
    assert float(jnp.abs(g[lname]["kernel"]).sum()) > 0
    # Only the 4-bit row of each clip table receives gradient.
    gw = np.asarray(g[lname]["w_clip"])
    assert np.abs(gw[3]).sum() > 0 and np.abs(np.delete(gw, 3, axis=0)).sum() == 0
  ga = np.asarray(g["conv2"]["a_clip"])
  assert ga[3] != 0 and np.abs(np.delete(ga, 3)).sum() == 0


def test_float_path_ignores_quantization():
  md, v, x = _small()
  f = jax.jit(lambda p: models.forward(md.module, v, x, p)[0])
  y_float = jax.jit(lambda: models.forward(md.module, v, x)[0])()
  y8 = f(jnp.full((5, 2), 8, jnp.int32))
  y2 = f(jnp.full((5, 2), 2, jnp.int32))
  err8 = float(jnp.abs(y8 - y_float).max())
  err2 = float(jnp.abs(y2 - y_float).max())
  assert 0 < err8 < err2
