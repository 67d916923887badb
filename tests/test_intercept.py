"""Plain Flax models through cimjax.quantize_model equal the zoo models with the same weights.

The plain models below use only Flax layers (``nn.Conv``, ``nn.Dense``, ``nn.BatchNorm``,
``nn.LayerNorm``, ``nn.dot_product_attention``, ``nn.MultiHeadDotProductAttention``,
``nn.DenseGeneral``, ``nn.Einsum``) with Flax's automatic names; :func:`transplant` maps the
zoo's variables onto them (modules paired in call order), so logits, geometry and cost tables
can be compared.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import cimjax
from cimjax import compile as cc
from cimjax import cost, evaluate, models, trace, train
from cimjax import hw as hw_lib
from cimjax.errors import ModelError
from cimjax.layers import QuantContext
from cimjax.models import Rule
from cimjax.variables import init_variables

# ---------------------------------------------------------------------------------- the models


class PlainCNN(nn.Module):
  """The zoo small_cnn, written with plain Flax layers (automatic names)."""

  channels: tuple[int, ...] = (4, 8, 8)
  hidden: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.max_pool(nn.relu(nn.Conv(c, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class PlainBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    def bn():
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)

    s = (self.strides, self.strides)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = bn()(nn.Conv(self.features, (1, 1), s, padding="VALID", use_bias=False)(x))
    y = nn.relu(bn()(nn.Conv(self.features, (3, 3), s, padding=1, use_bias=False)(x)))
    y = bn()(nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(y))
    return nn.relu(y + shortcut)


class PlainResNet(nn.Module):
  """The zoo ResNet (CIFAR stem, projection shortcuts first) in plain Flax."""

  stage_sizes: tuple[int, ...] = (1, 1, 1)
  widths: tuple[int, ...] = (4, 8, 8)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        x = PlainBlock(width, 2 if (i > 0 and j == 0) else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class PlainAttention(nn.Module):
  """Fused QKV projection, nn.dot_product_attention, output projection (the zoo's order)."""

  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    qkv = nn.Dense(3 * d)(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return nn.Dense(d)(out.reshape(b, t, d))


class PlainEncoder(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    x = x + PlainAttention(self.num_heads)(nn.LayerNorm()(x))
    y = nn.gelu(nn.Dense(self.mlp_dim)(nn.LayerNorm()(x)), approximate=False)
    return x + nn.Dense(x.shape[-1])(y)


class PlainViT(nn.Module):
  """The zoo ViT (class token, learned positions, pre-LN blocks) in plain Flax."""

  patch: int = 8
  hidden: int = 16
  depth: int = 2
  num_heads: int = 2
  mlp_dim: int = 32
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    p = (self.patch, self.patch)
    x = nn.Conv(self.hidden, p, p, padding="VALID")(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.hidden)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.hidden))
    for _ in range(self.depth):
      x = PlainEncoder(self.num_heads, self.mlp_dim)(x)
    return nn.Dense(self.num_classes)(nn.LayerNorm()(x)[:, 0])


class Mixed(nn.Module):
  """Grouped conv, MultiHeadDotProductAttention, Einsum and DenseGeneral."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (4, 4), (4, 4), padding="VALID")(x))
    x = nn.Conv(8, (3, 3), feature_group_count=2)(x)
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1, 8))
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x)
    x = nn.Einsum((8, 2, 4), "btd,dhk->bthk")(x)
    x = nn.DenseGeneral(8, axis=(-2, -1))(x)
    return nn.Dense(10)(jnp.mean(x, axis=1))


ZOO_CNN = dict(channels=(4, 8, 8), hidden=16)
VIT = dict(image_size=16, patch=8, hidden=16, depth=2, num_heads=2, mlp_dim=32, num_classes=10)


def zoo_resnet():
  return models.ModelDef(
    "resnet_tiny", models.ResNet((1, 1, 1), (4, 8, 8), "cifar", 4), (16, 16, 3), 10
  )


# ------------------------------------------------------------------------------------- helpers


def _leaves(tree, prefix=()):
  out = []
  for k, v in tree.items():
    out += _leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]
  return out


def call_order(model):
  """Module paths in the order their ``__call__`` first runs (their creation order)."""
  order = []

  def record(next_fun, args, kwargs, context):
    if context.module.path not in order:
      order.append(context.module.path)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda a: model.module.init(jax.random.key(0), a, QuantContext()), x)
  return order


def transplant(src, src_model, dst, dst_model):
  """``src``'s values in ``dst``'s structure: modules paired in call order, leaves by name."""
  out = {}
  for col in dst:
    groups = []
    for tree, model in ((src[col], src_model), (dst[col], dst_model)):
      by_module = {}
      for path, leaf in _leaves(tree):
        by_module.setdefault(path[:-1], {})[path[-1]] = leaf
      rank = {p: i for i, p in enumerate(call_order(model))}
      groups.append(sorted(by_module.items(), key=lambda kv: rank[kv[0]]))
    assert len(groups[0]) == len(groups[1]), col
    flat = {}
    for (_, a), (path, b) in zip(*groups):
      assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, path
      flat.update({(*path, k): v for k, v in a.items()})
    out[col] = traverse_util.unflatten_dict(flat)
  return out


def fwd(module, variables, x, policy=None, **kw):
  """``models.forward`` compiled once per module and shapes."""
  return _FWD(module, variables, x, policy, **kw)


_FWD = jax.jit(models.forward, static_argnums=0, static_argnames=("train",))


def unnamed(specs):
  return [dataclasses.replace(s, name="") for s in specs]


def policy(num, seed):
  return jax.random.randint(jax.random.key(seed), (num, 2), 2, 9)


# --------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
  "plain,zoo,shape",
  [
    (PlainCNN(), lambda: models.get_model("small_cnn", **ZOO_CNN), (28, 28, 1)),
    (PlainResNet(), zoo_resnet, (16, 16, 3)),
    (PlainViT(), lambda: models.get_model("vit_b32", **VIT), (16, 16, 3)),
  ],
  ids=["cnn", "resnet", "vit"],
)
def test_plain_flax_equals_zoo(plain, zoo, shape):
  """Same weights: the same logits (float and quantized), geometry and cost tables."""
  md, zm = cimjax.quantize_model(plain, input_shape=shape), zoo()
  vz = init_variables(zm, 0)
  v = transplant(vz, zm, init_variables(md, 1), md)
  specs, zspecs = trace.trace_specs(md), trace.trace_specs(zm)
  assert unnamed(specs) == unnamed(zspecs) and len(specs) == len(zspecs)
  hw = hw_lib.load_hw("rram_64_c2")
  for a, b in zip(cost.cost_tables(specs, hw, xp=np), cost.cost_tables(zspecs, hw, xp=np)):
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.key(2), (2, *shape))
  train = "batch_stats" in v
  pols = jnp.stack([policy(len(specs), 3), policy(len(specs), 4)])

  def run(module, variables):
    def f(p):  # float, quantized, and (with batch norm) quantized in training mode
      out = [models.forward(module, variables, x)[0], models.forward(module, variables, x, p[0])[0]]
      if train:
        y, st = models.forward(module, variables, x, p[1], train=True)
        out += [y, st]
      return out

    return jax.jit(f)(pols)

  got, want = run(md.module, v), run(zm.module, vz)
  for a, b in zip(got[:3], want[:3]):
    np.testing.assert_array_equal(a, b)  # exact: the same ops in the same order
  if train:  # the updated batch statistics, mapped onto the plain model's names
    mapped = transplant(want[3], zm, {"batch_stats": got[3]["batch_stats"]}, md)
    for (pa, a), (pb, b) in zip(_leaves(got[3]), _leaves(mapped)):
      assert pa == pb
      np.testing.assert_array_equal(a, b)


class ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_variables_keep_plain_flax_names_and_init():
  """The plain model's own variables (same names, same init) plus clip tables only."""
  x = jnp.zeros((1, 6, 6, 2))
  md = cimjax.quantize_model(ConvBN(), input_shape=(6, 6, 2))
  assert md.module.train_arg == "train" and md.num_classes == 3
  key = jax.random.key(0)
  plain = jax.jit(lambda k: ConvBN().init(k, x))(key)
  v = jax.jit(lambda k: md.module.init(k, x, QuantContext()))(key)
  flat_p = traverse_util.flatten_dict(plain)
  flat_v = traverse_util.flatten_dict(v)
  assert set(flat_v) - set(flat_p) == {k for k in flat_v if k[-1] in ("w_clip", "a_clip")}
  assert len(set(flat_v) - set(flat_p)) == 4
  for k, a in flat_p.items():
    np.testing.assert_array_equal(a, flat_v[k])
  assert flat_v[("params", "Conv_0", "w_clip")].shape == (8, 4)
  assert flat_v[("params", "Dense_0", "a_clip")].shape == (8,)
  # The training flag reaches the module: batch statistics move in training mode only.
  y, st = fwd(md.module, v, x + 1.0, jnp.full((2, 2), 8, jnp.int32), train=True)
  assert not np.array_equal(st["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def test_signedness_follows_the_zoo():
  cnn = dict(cimjax.quantize_model(PlainCNN(), input_shape=(28, 28, 1)).module.signed)
  assert cnn == {
    "Conv_0": True,
    "Conv_1": False,
    "Conv_2": False,
    "Dense_0": False,
    "Dense_1": False,
  }
  vit = trace.trace_specs(cimjax.quantize_model(PlainViT(), input_shape=(16, 16, 3)))
  zoo = trace.trace_specs(models.get_model("vit_b32", **VIT))
  assert [s.signed_input for s in vit] == [s.signed_input for s in zoo]
  assert [s.name.rsplit("/", 1)[-1] for s in vit[1:5]] == ["Dense_0", "qk", "av", "Dense_1"]
  assert not vit[3].signed_input  # A.V: softmax probabilities

  class Acts(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jnp.tanh(nn.Dense(4)(x))
      x = nn.sigmoid(nn.Dense(4)(x))
      x = nn.max_pool(nn.relu(nn.Dense(4)(x))[:, None, :, None], (1, 2), (1, 2))
      return nn.Dense(2)(jnp.mean(x, axis=(1, 3)))

  s = [sp.signed_input for sp in trace.trace_specs(cimjax.quantize_model(Acts(), input_shape=(3,)))]
  assert s == [True, True, False, False]  # input, after tanh, after sigmoid, pooled ReLU
  forced = cimjax.quantize_model(
    Acts(), input_shape=(3,), rules=[Rule("Dense_3", signed_input=True)]
  )
  assert [sp.signed_input for sp in trace.trace_specs(forced)] == [True, True, False, True]


# ---------------------------------------------------------------------------------------- rules


def test_rules_skip_and_fixed_bits():
  full = cimjax.quantize_model(PlainCNN(), input_shape=(8, 8, 1))
  v = init_variables(full, 0)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  pol = policy(5, 7).at[4].set(jnp.array([8, 8]))
  ref, _ = fwd(full.module, v, x, pol)

  fixed = cimjax.quantize_model(
    PlainCNN(), input_shape=(8, 8, 1), rules=[Rule("Dense_1", bits=(8, 8))]
  )
  assert [s.name for s in trace.trace_specs(fixed)] == ["Conv_0", "Conv_1", "Conv_2", "Dense_0"]
  y, _ = fwd(fixed.module, v, x, pol[:4])
  # No row, the same 8/8 computation (constant bits fold differently under jit: <= 1 ulp).
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=0)

  skip = cimjax.quantize_model(
    PlainCNN(), input_shape=(8, 8, 1), rules=[{"pattern": "Conv_0", "skip": True}]
  )
  assert [s.name for s in trace.trace_specs(skip)][0] == "Conv_1"
  vs = init_variables(skip, 0)
  assert set(vs["params"]["Conv_0"]) == {"kernel", "bias"}  # float: no clip tables
  with pytest.raises(cimjax.PolicyLengthError):
    fwd(skip.module, vs, x, pol)


@pytest.mark.parametrize(
  "rules,match",
  [
    ([Rule("conv9", skip=True)], "matches no layer of PlainCNN; its layers: Conv_0, Conv_1"),
    ([Rule("(", skip=True)], "not a regular expression"),
    ([Rule("Conv_0", bits=(9, 8))], "bits = \\(9, 8\\)"),
    ([Rule("Conv_0")], "sets nothing"),
    ([{"pattern": "Conv_0", "skp": True}], "unknown fields \\['skp'\\]"),
  ],
)
def test_bad_rules(rules, match):
  with pytest.raises(ModelError, match=match):
    cimjax.quantize_model(PlainCNN(), input_shape=(28, 28, 1), rules=rules)


def test_unsupported_layer_names_it_and_skip_works():
  class Dilated(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), kernel_dilation=2, name="dil")(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  with pytest.raises(ModelError, match="layer dil \\(Conv\\): kernel_dilation=2 is not supported"):
    cimjax.quantize_model(Dilated(), input_shape=(8, 8, 1))  # found by the analysis trace

  class BatchedEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((3, 4, 2), "bhd,hde->bhe", name="ein")(x).reshape(x.shape[0], -1)

  with pytest.raises(ModelError, match="layer ein \\(Einsum\\): einsum 'bhd,hde->bhe' with kernel"):
    cimjax.quantize_model(BatchedEinsum(), input_shape=(3, 4))
  md = cimjax.quantize_model(Dilated(), input_shape=(8, 8, 1), rules=[Rule("dil", skip=True)])
  assert [s.name for s in trace.trace_specs(md)] == ["Dense_0"]
  with pytest.raises(ModelError, match="expected a flax.linen.Module"):
    cimjax.quantize_model(lambda x: x, input_shape=(3,))
  with pytest.raises(ModelError, match="has no nn.Dense"):
    cimjax.quantize_model(nn.LayerNorm(), input_shape=(3,))


# ----------------------------------------------------------------- attention, einsum, general


def test_attention_module_einsum_dense_general():
  md = cimjax.quantize_model(Mixed(), input_shape=(16, 16, 3))
  specs = trace.trace_specs(md)
  mha = "MultiHeadDotProductAttention_0"
  assert [s.name for s in specs] == [
    "Conv_0",
    "Conv_1",
    *[f"{mha}/{n}" for n in ("query", "key", "value", "qk", "av", "out")],
    "Einsum_0",
    "DenseGeneral_0",
    "Dense_0",
  ]
  geo = [(s.kind, s.m, s.n, s.invocations, s.repeat) for s in specs]
  assert geo[1] == ("Conv2D", 4, 36, 16, 2)  # grouped: C_out/g, C_in/g*kh*kw, HW, g
  assert geo[2] == ("Dense", 8, 8, 16, 1) and geo[7] == ("Dense", 8, 8, 16, 1)
  assert geo[5] == ("MatMul", 16, 4, 16, 2) and geo[6] == ("MatMul", 4, 16, 16, 2)
  assert geo[8] == ("Dense", 8, 8, 16, 1) and geo[9] == ("Dense", 8, 8, 16, 1)
  assert [s.signed_input for s in specs] == [True, False] + [True] * 4 + [False] + [True] * 4
  v = init_variables(md, 0)
  assert v["params"][mha]["query"]["kernel"].shape == (8, 2, 4)  # Flax's own layout
  assert v["params"][mha]["query"]["w_clip"].shape == (8, 8)  # per output feature
  # Float pass equals the plain Flax model; 8/8 is close to it.
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  strip = {
    k: {n: a for n, a in p.items() if n not in ("w_clip", "a_clip")} for k, p in v["params"].items()
  }
  strip[mha] = {
    k: {n: a for n, a in p.items() if n not in ("w_clip", "a_clip")}
    for k, p in v["params"][mha].items()
    if k not in ("qk", "av")
  }
  ref = Mixed().apply({"params": strip}, x)
  y, _ = fwd(md.module, v, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  y8, _ = fwd(md.module, v, x, jnp.full((len(specs), 2), 8, jnp.int32))
  assert 0 < float(jnp.max(jnp.abs(y8 - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  assert nn.dot_product_attention is cimjax.models.intercept._FLAX_DPA  # patch undone


def test_setup_style_module_and_subclassed_layer():
  class Scaled(nn.Dense):
    def __call__(self, x):
      return super().__call__(x) * 2.0

  class SetupNet(nn.Module):
    def setup(self):
      self.qkv = nn.Dense(24)
      self.head = Scaled(10)

    def __call__(self, x):
      b, t, _ = x.shape
      qkv = self.qkv(x).reshape(b, t, 3, 2, 4)
      o = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
      return self.head(o.reshape(b, t, 8).mean(1))

  md = cimjax.quantize_model(SetupNet(), input_shape=(5, 8))
  assert [s.name for s in trace.trace_specs(md)] == ["qkv", "qk", "av", "head"]
  v = init_variables(md, 0)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  plain = SetupNet().apply({"params": {k: v["params"][k] for k in ("qkv", "head")}}, x)
  y, _ = fwd(md.module, v, x)  # float: the plain model (x 2 kept)
  np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------- evaluator, training and compiler


@pytest.mark.slow  # default-suite time; the zoo models cover the evaluator and training
def test_evaluator_and_training_on_a_plain_model():
  md = cimjax.quantize_model(PlainCNN(), input_shape=(8, 8, 1))
  v = init_variables(md, 0)
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(24, 8, 8, 1)).astype(np.float32)
  ys = np.asarray(jnp.argmax(fwd(md.module, v, xs)[0], -1))
  pols = np.asarray(jax.random.randint(jax.random.key(1), (3, 5, 2), 2, 9), np.int32)
  res = evaluate.make_evaluator(md, v, xs, ys, strategy="vmap", chunk=3, batch_size=12)(pols)
  ref = [100.0 * np.mean(np.argmax(fwd(md.module, v, xs, p)[0], -1) == ys) for p in pols]
  np.testing.assert_allclose(res.accuracy, ref)
  # Calibration and one QAT step.
  params = train.calibrate_clips(v, md, xs[:8])
  assert not np.array_equal(params["Dense_0"]["w_clip"], v["params"]["Dense_0"]["w_clip"])
  tx = optax.adam(1e-2)
  st = train.create_state(params, {}, tx, jax.random.PRNGKey(0))
  cfg = train.StepConfig.create(md, tx)
  st2, m = train.train_step(st, (xs[:8], ys[:8]), jnp.asarray(pols[0]), config=cfg)
  assert np.isfinite(float(m["loss"]))
  assert not np.array_equal(st2.params["Conv_0"]["kernel"], params["Conv_0"]["kernel"])


def test_compiler_on_attention_einsum_dense_general():
  """Compile + verify bit-exact: intercepted convs (one grouped), MHA, Einsum, DenseGeneral."""
  md = cimjax.quantize_model(Mixed(), input_shape=(16, 16, 3))
  v = init_variables(md, 0)
  pol = np.asarray(policy(len(trace.trace_specs(md)), 5), np.int32)
  prog = cc.compile_model(md, v, pol, "rram_64_c2")
  rep = cc.verify(prog, jax.random.normal(jax.random.key(1), (1, 16, 16, 3)), model=md)
  assert rep.ok and rep.logits_equal and all(c.exact for c in rep.layers)
  assert [p.dynamic for p in prog.layers].count(True) == 2  # Q.K^T and A.V
  assert cc.check_cost(prog) == []
