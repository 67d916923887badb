"""Tests for cimjax.cost: exact reproduction of the CIM-AQ latency model, energy, modes, gathers
and the differentiable expected cost."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import cost
from cimjax import hw as hw_lib
from cimjax import policy as policy_lib
from cimjax.spec import LayerSpec

B = 8


# ---------------------------------------------------------------------------------------------
# Hand-written geometries (docs/architecture.md, section 3) and an independent reference
# implementation.


def vgg16_specs():
  cfg = [
    (3, 64, 224),
    (64, 64, 224),
    (64, 128, 112),
    (128, 128, 112),
    (128, 256, 56),
    (256, 256, 56),
    (256, 256, 56),
    (256, 512, 28),
    (512, 512, 28),
    (512, 512, 28),
    (512, 512, 14),
    (512, 512, 14),
    (512, 512, 14),
  ]
  specs = [
    LayerSpec(f"conv{i + 1}", "Conv2D", m=co, n=ci * 9, invocations=h * h)
    for i, (ci, co, h) in enumerate(cfg)
  ]
  specs += [
    LayerSpec("fc1", "Dense", 4096, 25088, 1),
    LayerSpec("fc2", "Dense", 4096, 4096, 1),
    LayerSpec("fc3", "Dense", 1000, 4096, 1),
  ]
  return specs


def vit_b32_specs():
  specs = [LayerSpec("embed", "Conv2D", 768, 3 * 32 * 32, 49)]
  for b in range(1, 13):
    specs += [
      LayerSpec(f"block{b}/attn/qkv", "Dense", 2304, 768, 50),
      LayerSpec(f"block{b}/attn/qk", "MatMul", 50, 64, 50, repeat=12),
      LayerSpec(f"block{b}/attn/av", "MatMul", 64, 50, 50, repeat=12),
      LayerSpec(f"block{b}/attn/out", "Dense", 768, 768, 50),
      LayerSpec(f"block{b}/mlp1", "Dense", 3072, 768, 50),
      LayerSpec(f"block{b}/mlp2", "Dense", 768, 3072, 50),
    ]
  specs.append(LayerSpec("head", "Dense", 1000, 768, 1))
  return specs


def random_specs(seed=0, num=12):
  rng = np.random.default_rng(seed)
  return [
    LayerSpec(
      f"l{i}",
      "Dense",
      int(rng.integers(1, 1500)),
      int(rng.integers(1, 3000)),
      int(rng.integers(1, 400)),
      repeat=int(rng.integers(1, 5)),
    )
    for i in range(num)
  ]


GEOMETRIES = {"vgg16": vgg16_specs, "vit_b32": vit_b32_specs, "random": random_specs}


def reference_entry(s, w, a, hw):
  """The formulas of cimjax.cost's docstring, in plain Python ints and floats."""
  slices = math.ceil(w / hw.cell_bits)
  cols = s.m * slices
  rows = s.n
  if hw.mapping == "of":
    cols += 1
  if hw.mapping == "dc":
    cols *= 2
  if hw.mapping == "dr":
    rows *= 2
  tc, tr = math.ceil(cols / hw.cols), math.ceil(rows / hw.rows)
  tiles = tc * tr
  cycles = math.ceil(a / hw.dac_bits)
  execs = s.invocations * tiles * cycles
  rep, inv = s.repeat, s.invocations
  if hw.latency_mode == "serial":
    lat = rep * (tiles * hw.t_write_us + execs * hw.t_exec_us)
    wlat = rep * (tiles * hw.t_write_us)
  elif hw.latency_mode == "stationary":
    lat = rep * (tiles * hw.t_write_us / hw.batch + execs * hw.t_exec_us)
    wlat = rep * (tiles * hw.t_write_us / hw.batch)
  else:
    rounds = math.ceil(rep * tiles / hw.num_crossbars)
    lat = rounds * hw.t_write_us / hw.batch + inv * rounds * cycles * hw.t_exec_us
    wlat = rounds * hw.t_write_us / hw.batch
  k = inv * rep * cycles
  e_dac = rows * tc * k * hw.e_dac_pj
  e_read = rows * cols * k * hw.e_cell_read_pj
  e_adc = cols * tr * k * hw.e_adc_pj
  e_sa = cols * tr * k * hw.e_shift_add_pj
  e_write = rows * cols * rep * hw.e_write_pj
  if hw.latency_mode != "serial":
    e_write = e_write / hw.batch
  energy = e_dac + e_read + e_adc + e_sa + e_write
  return dict(
    latency_us=lat,
    energy_pj=energy,
    tiles=tiles,
    execs=execs,
    cycles=cycles,
    latency_write_us=wlat,
    e_dac_pj=e_dac,
    e_read_pj=e_read,
    e_adc_pj=e_adc,
    e_shift_add_pj=e_sa,
    e_write_pj=e_write,
  )


def reference_tables(specs, hw, max_bits=B):
  out = {
    f: np.zeros(
      (len(specs), max_bits, max_bits),
      np.int64 if f in ("tiles", "execs", "cycles") else np.float64,
    )
    for f in cost.CostTables._fields
  }
  for l, s in enumerate(specs):
    for w in range(1, max_bits + 1):
      for a in range(1, max_bits + 1):
        for f, v in reference_entry(s, w, a, hw).items():
          out[f][l, w - 1, a - 1] = v
  return out


def assert_tables_equal(tables, ref):
  for f in cost.CostTables._fields:
    got = getattr(tables, f)
    assert got.dtype == ref[f].dtype, f
    np.testing.assert_array_equal(got, ref[f], err_msg=f)


@pytest.fixture(scope="module")
def c4():
  return hw_lib.load_hw("rram_256_c4")


@pytest.fixture(scope="module")
def vgg():
  return vgg16_specs()


@pytest.fixture(scope="module")
def vit():
  return vit_b32_specs()


# ---------------------------------------------------------------------------------------------
# Exactness against the reference.


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("mapping", ["of", "dc", "dr"])
def test_serial_tables_exact(geometry, mapping, c4):
  specs = GEOMETRIES[geometry]()
  for cell_bits in (1, 2, 3, 4):
    for dac_bits in (1, 2):
      hw = c4.replace(mapping=mapping, cell_bits=cell_bits, dac_bits=dac_bits)
      ref = reference_tables(specs, hw)
      assert_tables_equal(cost.cost_tables(specs, hw, xp=np), ref)


@pytest.mark.parametrize(
  "mode,num_crossbars,batch",
  [
    ("stationary", 1, 1),
    ("stationary", 1, 7),
    ("stationary", 3, 64),
    ("parallel", 1, 1),
    ("parallel", 4, 1),
    ("parallel", 13, 3),
    ("parallel", 10_000, 16),
  ],
)
def test_other_modes_exact(mode, num_crossbars, batch):
  specs = vit_b32_specs()[:8] + random_specs(1, 5)
  for name in ("rram_128_c2", "rram_64_c2"):
    for mapping in ("of", "dr"):
      hw = hw_lib.load_hw(name).replace(
        latency_mode=mode, num_crossbars=num_crossbars, batch=batch, mapping=mapping
      )
      assert_tables_equal(cost.cost_tables(specs, hw, xp=np), reference_tables(specs, hw))


def test_max_bits_other_than_8(c4):
  specs = random_specs(2, 4)
  ref = reference_tables(specs, c4, max_bits=12)
  assert_tables_equal(cost.cost_tables(specs, c4, max_bits=12, xp=np), ref)


@pytest.mark.parametrize("name", ["rram_256_c4", "rram_128_c2", "rram_64_c2"])
@pytest.mark.parametrize("mode", ["serial", "stationary", "parallel"])
def test_jnp_matches_numpy(name, mode, vgg, vit):
  hw = hw_lib.load_hw(name).replace(latency_mode=mode, batch=4, num_crossbars=3)
  for specs in (vgg, vit):
    exact = cost.cost_tables(specs, hw, xp=np)
    approx = cost.cost_tables(specs, hw)
    for f in cost.CostTables._fields:
      got = getattr(approx, f)
      assert isinstance(got, jax.Array)
      assert got.dtype == (jnp.int32 if f in ("tiles", "execs", "cycles") else jnp.float32)
      np.testing.assert_allclose(np.asarray(got), getattr(exact, f), rtol=1e-6, err_msg=f)


def test_geometry_arrays_errors():
  with pytest.raises(ValueError, match="no layers"):
    cost.geometry_arrays([])
  with pytest.raises(ValueError, match=r"layer 1 \(bad\): invocations = 0"):
    cost.geometry_arrays([LayerSpec("ok", "Dense", 1, 1, 1), LayerSpec("bad", "Dense", 1, 1, 0)])
  g = cost.geometry_arrays(vgg16_specs())
  assert set(g) == {"m", "n", "inv", "rep"} and g["m"].dtype == np.int64


def test_static_argument_errors(c4):
  g = cost.geometry_arrays(random_specs(0, 2))
  p = cost.hw_params(c4)
  with pytest.raises(ValueError, match="mapping = 'x'"):
    cost.cost_tables_from_arrays(g, **p, mapping="x")
  with pytest.raises(ValueError, match="latency_mode = 'x'"):
    cost.cost_tables_from_arrays(g, **p, latency_mode="x")


# ---------------------------------------------------------------------------------------------
# Known structural facts of the CIM-AQ model (CIM-AQ's latency model).


def test_cell4_weight_bits_5_to_8_cost_the_same(c4, vgg, vit):
  for specs in (vgg, vit):
    t = cost.cost_tables(specs, c4, xp=np)
    for w in (5, 6, 7):
      np.testing.assert_array_equal(t.latency_us[:, w - 1], t.latency_us[:, 7])
    # w <= 4 uses one slice: never more tiles than 8 bits, strictly fewer somewhere.
    assert (t.tiles[:, 3] <= t.tiles[:, 7]).all() and (t.tiles[:, 3] < t.tiles[:, 7]).any()


@pytest.mark.parametrize("which,seconds,write_pct", [("vgg", 12.4, 3.8), ("vit", 3.5, 9.2)])
def test_cim_aq_headline_numbers(which, seconds, write_pct, c4, vgg, vit):
  specs = {"vgg": vgg, "vit": vit}[which]
  t = cost.cost_tables(specs, c4, xp=np)
  total = t.latency_us[:, 7, 7].sum()
  writes = t.latency_write_us[:, 7, 7].sum()
  assert total / 1e6 == pytest.approx(seconds, rel=0.05)
  assert abs(100 * writes / total - write_pct) <= 0.3


def test_parallel_many_crossbars_is_one_round(c4):
  specs = random_specs(3, 6)
  hw = c4.replace(latency_mode="parallel", num_crossbars=10**6)
  t = cost.cost_tables(specs, hw, xp=np)
  inv = np.array([s.invocations for s in specs])[:, None, None]
  cycles = np.arange(1, B + 1)[None, None, :]
  np.testing.assert_allclose(
    t.latency_us, hw.t_write_us + inv * cycles * hw.t_exec_us + 0 * t.latency_us, rtol=1e-12
  )


# ---------------------------------------------------------------------------------------------
# Hypothesis properties.

spec_st = st.builds(
  lambda m, n, inv, rep: LayerSpec("x", "Dense", m, n, inv, repeat=rep),
  st.integers(1, 5000),
  st.integers(1, 5000),
  st.integers(1, 3000),
  st.integers(1, 16),
)
hw_st = st.builds(
  lambda base, rows, cols, c, d, mapping, tw, te: base.replace(
    rows=rows, cols=cols, cell_bits=c, dac_bits=d, mapping=mapping, t_write_us=tw, t_exec_us=te
  ),
  st.just(hw_lib.load_hw("rram_128_c2")),
  st.sampled_from([16, 64, 100, 128, 256, 512]),
  st.sampled_from([16, 64, 100, 128, 256, 512]),
  st.integers(1, 4),
  st.integers(1, 3),
  st.sampled_from(["of", "dc", "dr"]),
  st.floats(0.0, 100.0),
  st.floats(0.01, 10.0),
)


@settings(max_examples=60, deadline=None)
@given(
  st.lists(spec_st, min_size=1, max_size=4),
  hw_st,
  st.sampled_from(["serial", "stationary", "parallel"]),
  st.integers(1, 64),
  st.integers(1, 64),
)
def test_latency_monotone_and_energy_positive(specs, hw, mode, p, batch):
  hw = hw.replace(latency_mode=mode, num_crossbars=p, batch=batch)
  t = cost.cost_tables(specs, hw, xp=np)
  for table in (t.latency_us, t.energy_pj, t.tiles, t.execs):
    assert (np.diff(table, axis=1) >= 0).all()  # non-decreasing in w
    assert (np.diff(table, axis=2) >= 0).all()  # non-decreasing in a
  assert (t.energy_pj > 0).all() and (t.latency_us > 0).all()
  for f in ("e_dac_pj", "e_read_pj", "e_adc_pj", "e_shift_add_pj", "e_write_pj"):
    assert (getattr(t, f) > 0).all(), f


@settings(max_examples=60, deadline=None)
@given(st.lists(spec_st, min_size=1, max_size=4), hw_st)
def test_parallel_p1_and_stationary_batch1_equal_serial(specs, hw):
  serial = cost.cost_tables(specs, hw.replace(latency_mode="serial", batch=5), xp=np)
  par = cost.cost_tables(specs, hw.replace(latency_mode="parallel", num_crossbars=1), xp=np)
  sta = cost.cost_tables(specs, hw.replace(latency_mode="stationary", batch=1), xp=np)
  for other in (par, sta):
    for f in cost.CostTables._fields:
      np.testing.assert_allclose(getattr(other, f), getattr(serial, f), rtol=1e-12, err_msg=f)
  np.testing.assert_array_equal(sta.latency_us, serial.latency_us)


# ---------------------------------------------------------------------------------------------
# Gathers: policy_cost, per_layer_cost, ratios; jit and vmap.


class PolicyCostTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_policy_cost_matches_python_sum(self):
    specs = vit_b32_specs()
    t = cost.cost_tables(specs, hw_lib.load_hw("rram_256_c4"))
    pol = policy_lib.random_policies(jax.random.key(0), np.ones((len(specs), B, B), bool), 1)[0]
    got = self.variant(cost.policy_cost)(t.latency_us, pol)
    chex.assert_shape(got, ())
    table = np.asarray(t.latency_us, np.float64)
    want = sum(table[l, w - 1, a - 1] for l, (w, a) in enumerate(np.asarray(pol)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    per = self.variant(cost.per_layer_cost)(t.latency_us, pol)
    chex.assert_shape(per, (len(specs),))

  @chex.variants(with_jit=True, without_jit=True)
  def test_uniform_8_8_ratio_is_one(self):
    t = cost.cost_tables(vgg16_specs(), hw_lib.load_hw("rram_256_c2"))
    pol = policy_lib.uniform_policy(16, 8, 8)
    np.testing.assert_allclose(self.variant(cost.cost_ratio)(t.latency_us, pol), 1.0, rtol=1e-6)
    np.testing.assert_allclose(self.variant(cost.speedup)(t.latency_us, pol), 1.0, rtol=1e-6)


def test_vmap_over_policies_equals_loop(vit):
  t = cost.cost_tables(vit, hw_lib.load_hw("rram_256_c4"))
  mask = policy_lib.action_mask(len(vit), "both", cell_bits=4)
  pols = policy_lib.random_policies(jax.random.key(1), mask, 32)
  batched = jax.jit(jax.vmap(cost.policy_cost, in_axes=(None, 0)))(t.latency_us, pols)
  one = jax.jit(cost.policy_cost)
  loop = np.array([one(t.latency_us, p) for p in np.asarray(pols)])
  np.testing.assert_allclose(batched, loop, rtol=1e-6)
  # Leading batch axes also work without vmap.
  np.testing.assert_allclose(cost.policy_cost(t.latency_us, pols), loop, rtol=1e-6)
  speed = jax.vmap(cost.speedup, in_axes=(None, 0))(t.latency_us, pols)
  np.testing.assert_allclose(speed, cost.baseline_cost(t.latency_us) / loop, rtol=1e-6)


def test_numpy_gather_is_exact(vgg, c4):
  t = cost.cost_tables(vgg, c4, xp=np)
  pol = np.array([[4, 5]] * 16)
  got = cost.policy_cost(t.latency_us, pol)
  assert isinstance(got, np.floating)
  assert got == sum(t.latency_us[l, 3, 4] for l in range(16))


def test_vmap_and_jit_over_hardware_parameters(vgg, c4):
  geom = cost.geometry_arrays(vgg)
  params = cost.hw_params(c4)
  te = jnp.array([0.1, 1.4, 2.0], jnp.float32)
  rows = jnp.array([64, 128, 256], jnp.int32)

  @jax.jit
  def sweep(te, rows):
    return cost.cost_tables_from_arrays(
      geom,
      **{**params, "t_exec_us": te, "rows": rows},
      mapping=c4.mapping,
      latency_mode=c4.latency_mode,
    )

  out = jax.vmap(sweep)(te, rows)
  chex.assert_shape(out.latency_us, (3, 16, B, B))
  for i in range(3):
    ref = cost.cost_tables(vgg, c4.replace(t_exec_us=float(te[i]), rows=int(rows[i])), xp=np)
    np.testing.assert_allclose(out.latency_us[i], ref.latency_us, rtol=1e-6)
    np.testing.assert_array_equal(out.tiles[i], ref.tiles)


# ---------------------------------------------------------------------------------------------
# Expected cost.


def _small_problem(num_layers=5, constraint="both", cell_bits=4):
  specs = random_specs(7, num_layers)
  table = cost.cost_tables(specs, hw_lib.load_hw("rram_64_c2"), xp=np).latency_us
  mask = policy_lib.action_mask(num_layers, constraint, cell_bits=cell_bits)
  return table, mask


def test_expected_cost_uniform_equals_exact_mean_over_all_policies():
  table, mask = _small_problem()
  per_layer = [np.argwhere(mask[l]) + 1 for l in range(len(mask))]
  pols = np.array([np.stack(c) for c in itertools.product(*per_layer)])
  assert len(pols) == 14**3
  exact_mean = cost.policy_cost(table, pols).mean()
  got = jax.jit(cost.expected_cost)(jnp.asarray(table, jnp.float32), jnp.zeros(mask.shape), mask)
  np.testing.assert_allclose(got, exact_mean, rtol=1e-5)


def test_expected_cost_one_hot_mask_equals_policy_cost():
  table, _ = _small_problem()
  pol = np.array([[8, 8], [3, 2], [4, 7], [2, 2], [8, 8]])
  one_hot = np.zeros(table.shape, bool)
  one_hot[np.arange(5), pol[:, 0] - 1, pol[:, 1] - 1] = True
  logits = jax.random.normal(jax.random.key(0), table.shape)
  t32 = jnp.asarray(table, jnp.float32)
  expected = jax.jit(cost.expected_cost)
  want = cost.policy_cost(table, pol)
  np.testing.assert_allclose(expected(t32, logits, one_hot), want, rtol=1e-6)
  # Near-one-hot logits without a mask.
  near = jnp.where(jnp.asarray(one_hot), 50.0, 0.0)
  np.testing.assert_allclose(expected(t32, near, None), want, rtol=1e-5)


def test_expected_cost_gradient_closed_form_and_finite_differences():
  table, mask = _small_problem()
  t64 = np.asarray(table, np.float64)
  logits = np.asarray(jax.random.normal(jax.random.key(3), table.shape), np.float64)
  grad = np.asarray(
    jax.jit(jax.grad(cost.expected_cost, argnums=1))(
      jnp.asarray(table, jnp.float32), jnp.asarray(logits, jnp.float32), mask
    ),
    np.float64,
  )
  # Closed form: dE/dz[l, k] = p[l, k] * (c[l, k] - E_l), zero where masked.
  z = np.where(mask, logits, -np.inf).reshape(5, -1)
  p = np.exp(z - z.max(axis=1, keepdims=True))
  p = (p / p.sum(axis=1, keepdims=True)).reshape(table.shape)
  e_l = (p * t64).sum(axis=(1, 2), keepdims=True)
  closed = p * (t64 - e_l)
  scale = np.abs(closed).max()
  np.testing.assert_allclose(grad, closed, atol=1e-5 * scale)
  assert (grad[~mask] == 0).all()
  # Central finite differences (float64 NumPy) on a few allowed entries.

  def e_np(zz):
    zz = np.where(mask, zz, -np.inf).reshape(5, -1)
    q = np.exp(zz - zz.max(axis=1, keepdims=True))
    q = (q / q.sum(axis=1, keepdims=True)).reshape(table.shape)
    return (q * t64).sum()

  for idx in np.argwhere(mask)[::9]:
    d = np.zeros_like(logits)
    d[tuple(idx)] = 1e-4
    fd = (e_np(logits + d) - e_np(logits - d)) / 2e-4
    np.testing.assert_allclose(grad[tuple(idx)], fd, atol=1e-5 * scale)


def test_expected_cost_factored_matches_joint():
  table, mask = _small_problem()
  t32 = jnp.asarray(table, jnp.float32)
  kw, ka = jax.random.split(jax.random.key(4))
  wl, al = jax.random.normal(kw, (5, B)), jax.random.normal(ka, (5, B))
  joint = wl[:, :, None] + al[:, None, :]
  expected = jax.jit(cost.expected_cost)
  np.testing.assert_allclose(
    jax.jit(cost.expected_cost_factored)(t32, wl, al, mask), expected(t32, joint, mask), rtol=1e-5
  )
  g = jax.jit(jax.grad(cost.expected_cost_factored, argnums=(1, 2)))(t32, wl, al, mask)
  assert all(np.isfinite(x).all() for x in g)
  # vmap over a population of logits.
  pop = jax.random.normal(kw, (6, 5, B, B))
  batched = jax.jit(jax.vmap(cost.expected_cost, in_axes=(None, 0, None)))(t32, pop, mask)
  np.testing.assert_allclose(batched, [expected(t32, z, mask) for z in pop], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Report.


def test_layer_report(vit, c4):
  mask = policy_lib.action_mask(len(vit), "io")
  pol = np.asarray(policy_lib.random_policies(jax.random.key(5), mask, 1)[0])
  rep = cost.layer_report(vit, c4, pol)
  assert len(rep["layers"]) == len(vit)
  first = rep["layers"][1]
  assert first["name"] == "block1/attn/qkv" and first["type"] == "Dense"
  assert (first["m"], first["n"], first["invocations"], first["repeat"]) == (2304, 768, 50, 1)
  assert rep["total_latency_us"] == sum(r["latency_us"] for r in rep["layers"])
  assert rep["total_energy_pj"] == sum(r["energy_pj"] for r in rep["layers"])
  assert rep["speedup"] == rep["baseline_latency_us"] / rep["total_latency_us"]
  t = cost.cost_tables(vit, c4, xp=np)
  assert rep["total_latency_us"] == pytest.approx(cost.policy_cost(t.latency_us, pol), rel=1e-12)
  assert rep["baseline_latency_us"] == pytest.approx(t.latency_us[:, 7, 7].sum(), rel=1e-12)
  assert rep["layers"][2]["tiles"] == int(t.tiles[2, pol[2, 0] - 1, 0])
  with pytest.raises(policy_lib.PolicyError, match=r"layer 2 \(block1/attn/qk\)"):
    cost.layer_report(vit, c4, np.where(np.arange(len(vit))[:, None] == 2, 9, pol))


def test_traced_zoo_geometry_matches_hand_written():
  """The traced VGG-16 and ViT-B/32 geometry equals docs/architecture.md's table (and order)."""
  models = pytest.importorskip("cimjax.models")
  trace = pytest.importorskip("cimjax.trace")
  for name, hand in (("vgg16", vgg16_specs()), ("vit_b32", vit_b32_specs())):
    model = models.get_model(name)
    traced = cost.geometry_arrays(trace.trace_specs(model.module, model.input_shape))
    want = cost.geometry_arrays(hand)
    for k in want:
      np.testing.assert_array_equal(traced[k], want[k], err_msg=f"{name} {k}")
