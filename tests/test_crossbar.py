"""Tests for the crossbar kernels and non-idealities (cimjax.crossbar, cimjax.noise).

The oracle is the NumPy int64 matmul: with an ideal ADC and no noise the bit-sliced, mapped,
tiled simulation must equal it exactly for any shape, bits, cell/DAC widths, mapping, input
signedness and scheme, and tile sizes that do not divide the matrix.
"""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import crossbar as xb
from cimjax import layers
from cimjax import noise as noise_lib
from cimjax.noise import NoiseConfig


def rand_operands(rng, r, t, n, m, w_bits, a_bits, signed):
  h = 2 ** (w_bits - 1) - 1
  w = rng.integers(-h, h + 1, (r, n, m))
  if signed:
    x = rng.integers(-(2 ** (a_bits - 1)), 2 ** (a_bits - 1), (r, t, n))
  else:
    x = rng.integers(0, 2**a_bits, (r, t, n))
  return x.astype(np.int64), w.astype(np.int64)


def oracle(x, w):
  return np.einsum("rtn,rnm->rtm", x.astype(np.int64), w.astype(np.int64))


def sim(x, w, w_bits, a_bits, cfg, signed, **kw):
  y = xb.crossbar_mvm(
    jnp.asarray(x, jnp.float32),
    jnp.asarray(w, jnp.float32),
    w_bits,
    a_bits,
    cfg,
    signed_input=signed,
    **kw,
  )
  return np.asarray(y)


# ----------------------------------------------------------------------------------------------
# Bit-exactness


@settings(max_examples=30, deadline=None)
@given(
  r=st.integers(1, 2),
  t=st.integers(1, 4),
  n=st.integers(1, 70),
  m=st.integers(1, 9),
  w_bits=st.integers(2, 8),
  a_bits=st.integers(2, 8),
  cell_bits=st.integers(1, 4),
  dac_bits=st.integers(1, 2),
  mapping=st.sampled_from(["of", "dc", "dr"]),
  signed=st.booleans(),
  scheme=st.sampled_from(["twos", "offset"]),
  rows=st.integers(3, 40),
  cols=st.integers(2, 24),
  exact_alloc=st.booleans(),
  seed=st.integers(0, 2**31 - 1),
)
def test_bit_exact_against_int64_oracle(
  r,
  t,
  n,
  m,
  w_bits,
  a_bits,
  cell_bits,
  dac_bits,
  mapping,
  signed,
  scheme,
  rows,
  cols,
  exact_alloc,
  seed,
):
  rng = np.random.default_rng(seed)
  x, w = rand_operands(rng, r, t, n, m, w_bits, a_bits, signed)
  cfg = xb.XbarConfig(
    rows=rows,
    cols=cols,
    cell_bits=cell_bits,
    dac_bits=dac_bits,
    mapping=mapping,
    input_scheme=scheme,
  )
  kw = dict(max_w_bits=w_bits, max_a_bits=a_bits) if exact_alloc else {}
  y = sim(x, w, w_bits, a_bits, cfg, signed, **kw)
  np.testing.assert_array_equal(y.astype(np.int64), oracle(x, w))


@pytest.mark.parametrize(
  "mapping,scheme,signed",
  [
    (mp, sc, sg)
    for mp in ("of", "dc", "dr")
    for sc, sg in (("twos", False), ("twos", True), ("offset", True))
  ],
)
def test_extreme_values_every_mapping(mapping, scheme, signed):
  """All-max / all-min operands on many rows (largest partial sums) stay exact."""
  w_bits, a_bits = 8, 8
  n, m = 300, 5
  cfg = xb.XbarConfig(
    rows=128, cols=16, cell_bits=4, dac_bits=2, mapping=mapping, input_scheme=scheme
  )
  h = 2 ** (w_bits - 1) - 1
  w = np.stack([np.full((n, m), h), np.full((n, m), -h)])
  lo, hi = (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1) if signed else (0, 2**a_bits - 1)
  x = np.stack([np.full((3, n), lo), np.full((3, n), hi)])
  y = sim(x, w, w_bits, a_bits, cfg, signed)
  np.testing.assert_array_equal(y.astype(np.int64), oracle(x, w))


class VariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree_with_oracle(self):
    rng = np.random.default_rng(0)
    x, w = rand_operands(rng, 2, 3, 37, 6, 5, 6, True)
    cfg = xb.XbarConfig(rows=16, cols=8, cell_bits=2, dac_bits=2, mapping="dc")
    f = self.variant(lambda x, w, wb, ab: xb.crossbar_mvm(x, w, wb, ab, cfg, signed_input=True))
    y = f(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.int32(5), jnp.int32(6))
    np.testing.assert_array_equal(np.asarray(y).astype(np.int64), oracle(x, w))

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_policies(self):
    """Traced bits (one compiled kernel) for a batch of (w, a) pairs."""
    rng = np.random.default_rng(1)
    cfg = xb.XbarConfig(rows=32, cols=16, cell_bits=3, dac_bits=1, mapping="of")
    wbs = np.array([2, 3, 5, 8], np.int32)
    abs_ = np.array([8, 2, 4, 3], np.int32)
    xs, ws = zip(*(rand_operands(rng, 1, 3, 40, 4, wb, ab, True) for wb, ab in zip(wbs, abs_)))
    xs, ws = np.stack(xs), np.stack(ws)
    f = self.variant(
      jax.vmap(lambda x, w, wb, ab: xb.crossbar_mvm(x, w, wb, ab, cfg, signed_input=True))
    )
    y = f(jnp.asarray(xs, jnp.float32), jnp.asarray(ws, jnp.float32), wbs, abs_)
    for i in range(len(wbs)):
      np.testing.assert_array_equal(np.asarray(y[i]).astype(np.int64), oracle(xs[i], ws[i]))


def test_token_blocks_are_exact():
  """The lax.map token-block path (small block_elems) gives the same result."""
  rng = np.random.default_rng(2)
  x, w = rand_operands(rng, 2, 37, 50, 7, 6, 5, False)
  cfg = xb.XbarConfig(rows=16, cols=8, cell_bits=2, dac_bits=1, mapping="dr")
  y = sim(x, w, 6, 5, cfg, False, block_elems=500)
  np.testing.assert_array_equal(y.astype(np.int64), oracle(x, w))


# ----------------------------------------------------------------------------------------------
# Layout, tiles and geometry


@pytest.mark.parametrize("mapping", ["of", "dc", "dr"])
def test_physical_layout_matches_cost_model_geometry(mapping):
  from cimjax import cost
  from cimjax import hw as hw_lib
  from cimjax.spec import LayerSpec

  base = hw_lib.load_hw("rram_64_c2")
  rng = np.random.default_rng(3)
  for _ in range(5):
    n, m = int(rng.integers(1, 300)), int(rng.integers(1, 100))
    hw = base.replace(
      mapping=mapping,
      cell_bits=int(rng.integers(1, 5)),
      rows=int(rng.integers(5, 70)),
      cols=int(rng.integers(5, 70)),
    )
    cfg = xb.XbarConfig.from_hw(hw)
    t = cost.cost_tables([LayerSpec("l", "Dense", m=m, n=n, invocations=1)], hw, xp=np)
    for w_bits in range(1, 9):
      lay = xb.make_layout(cfg, n, m, signed_input=False, max_w_bits=w_bits)
      w = rng.integers(-(2 ** (w_bits - 1) - 1), 2 ** (w_bits - 1), (n, m))
      lv = xb.slice_levels(w, w_bits, lay, xp=np)
      assert lv.shape == (lay.rows_p, lay.cols_p)
      tiles = xb.tile_matrix(lv, hw.rows, hw.cols)
      assert tiles.shape[0] * tiles.shape[1] == t.tiles[0, w_bits - 1, 0]
      np.testing.assert_array_equal(xb.untile_matrix(tiles, lay.rows_p, lay.cols_p), lv)
      assert lv.max(initial=0) <= 2**hw.cell_bits - 1


def test_slice_levels_numpy_equals_jax_and_reconstructs_weights():
  rng = np.random.default_rng(4)
  for mapping, c in itertools.product(("of", "dc", "dr"), (1, 2, 3, 4)):
    cfg = xb.XbarConfig(cell_bits=c, mapping=mapping)
    wb = 7
    lay = xb.make_layout(cfg, 9, 4, signed_input=False, max_w_bits=wb)
    w = rng.integers(-63, 64, (2, 9, 4))
    a = xb.slice_levels(w, wb, lay, xp=np)
    b = np.asarray(xb.slice_levels(jnp.asarray(w, jnp.float32), wb, lay))
    np.testing.assert_array_equal(a.astype(np.float32), b)
    # Reconstruct the integer matrix from the cell levels with the column coefficients.
    coef = np.asarray(xb.column_coeffs(wb, lay)).astype(np.int64)
    lv = a.astype(np.int64)
    if mapping == "dr":  # row 2i holds the positive part, row 2i+1 the negative one
      levels = lv.reshape(2, 9, 2, -1)
      rec = ((levels[:, :, 0] - levels[:, :, 1]) * coef).reshape(2, 9, 4, -1).sum(-1)
    elif mapping == "dc":
      rec = (lv * coef).reshape(2, 9, 4, -1).sum(-1)
    else:
      rec = (lv[..., :-1] * coef[:-1]).reshape(2, 9, 4, -1).sum(-1) + lv[..., -1:] * coef[-1]
    np.testing.assert_array_equal(rec, w)


def test_tile_mvm_vmapped_over_tiles_equals_dense_product():
  rng = np.random.default_rng(5)
  n_rows, n_cols = 8, 6
  levels = rng.integers(0, 16, (19, 14)).astype(np.float32)
  digits = rng.integers(0, 2, (5, 19)).astype(np.float32)
  tiles = xb.tile_matrix(levels, n_rows, n_cols)  # [3, 3, 8, 6]
  dig = np.pad(digits, ((0, 0), (0, 3 * n_rows - 19))).reshape(5, 3, n_rows)
  per_tile = jax.vmap(jax.vmap(xb.tile_mvm, in_axes=(None, 0)), in_axes=(1, 0))(
    jnp.asarray(dig), jnp.asarray(tiles)
  )  # [3 rows, 3 cols, 5, 6]
  col_sums = np.asarray(per_tile).sum(0).transpose(1, 0, 2).reshape(5, -1)[:, :14]
  np.testing.assert_array_equal(col_sums, digits @ levels)


def test_input_digits_reconstruct_inputs():
  digits = jax.jit(xb.input_digits, static_argnums=2)
  for signed, scheme, d in itertools.product((False, True), ("twos", "offset"), (1, 2, 3)):
    if scheme == "offset" and not signed:
      continue
    cfg = xb.XbarConfig(dac_bits=d, mapping="dc", input_scheme=scheme)
    lay = xb.make_layout(cfg, 1, 1, signed_input=signed, max_a_bits=8)
    for a in range(2, 9):
      # Every code of the a-bit range, padded to a fixed length (one compilation).
      vals = np.arange(-(2 ** (a - 1)), 2 ** (a - 1)) if signed else np.arange(2**a)
      vals = np.resize(vals, 256)
      dig = np.asarray(digits(jnp.asarray(vals[:, None], jnp.float32), jnp.int32(a), lay))
      coef = np.asarray(xb.cycle_coeffs(a, lay))
      rec = (dig[:, :, 0] * coef).sum(-1)
      if signed and scheme == "offset":
        rec = rec - 2 ** (a - 1)
      np.testing.assert_array_equal(rec, vals)
      lo, hi = (np.asarray(v) for v in xb.digit_bounds(a, lay))
      used = coef != 0
      assert np.all(dig[:, used, 0] >= lo[used]) and np.all(dig[:, used, 0] <= hi[used])


def test_config_validation():
  with pytest.raises(ValueError, match="mapping"):
    xb.XbarConfig(mapping="xx")
  with pytest.raises(ValueError, match="input_scheme"):
    xb.XbarConfig(input_scheme="sign")
  with pytest.raises(ValueError, match="cell_bits"):
    xb.XbarConfig(cell_bits=0)
  with pytest.raises(ValueError, match="adc_bits"):
    xb.XbarConfig(adc_bits=0)


# ----------------------------------------------------------------------------------------------
# ADC


def test_adc_fine_enough_is_exact_and_coarse_error_is_bounded():
  rng = np.random.default_rng(6)
  x, w = rand_operands(rng, 1, 6, 200, 5, 8, 8, True)
  ref = oracle(x, w)
  for mapping in ("dc", "dr", "of"):
    # 256 rows x 15 levels x 1: 13 bits cover the full-scale range with a step below 1.
    fine = xb.XbarConfig(rows=256, cols=64, cell_bits=4, mapping=mapping, adc_bits=13)
    np.testing.assert_array_equal(sim(x, w, 8, 8, fine, True).astype(np.int64), ref)
    coarse = fine.replace(adc_bits=6)
    err = np.abs(sim(x, w, 8, 8, coarse, True) - ref)
    assert err.max() > 0
    # Bound: every (column, cycle) read-out errs by at most step/2 + 1/2, weighted by its
    # shift coefficients (no clipping with the full-scale range).
    lay = xb.make_layout(coarse, 200, 5, signed_input=True)
    step = np.asarray(xb.adc_step(8, 8, lay, 6))
    colw = np.abs(np.asarray(xb.column_coeffs(8, lay)))
    cycw = np.abs(np.asarray(xb.cycle_coeffs(8, lay)))
    per = (step / 2 + 0.5) * cycw[:, None] * colw[None, :]  # [C, cols]
    if mapping == "of":
      bound = per[:, :-1].sum(0).reshape(5, -1).sum(-1) + per[:, -1].sum()
    else:
      bound = per.sum(0).reshape(5, -1).sum(-1)
    bound = bound * lay.row_tiles  # one read-out per row tile (dr: 400 rows -> 2 tiles)
    assert np.all(err <= bound[None, None, :] + 1e-6)


def test_adc_convert_levels_and_clipping():
  lo, hi = jnp.float32(0.0), jnp.float32(100.0)
  v = jnp.array([-5.0, 0.0, 3.0, 50.0, 99.0, 180.0])
  out = np.asarray(xb.adc_convert(v, lo, hi, 2))  # 3 steps of 33.3
  np.testing.assert_array_equal(out, [0, 0, 0, 67, 100, 100])
  # Two-sided: 2^b - 2 steps over [-F, F], zero is a level.
  out = np.asarray(
    xb.adc_convert(jnp.array([-3.2, 0.0, 0.4, 7.0]), jnp.float32(-6.0), jnp.float32(6.0), 3)
  )
  np.testing.assert_array_equal(out, [-4, 0, 0, 6])
  # A zero range (unused column) reads 0.
  assert float(xb.adc_convert(jnp.float32(3.0), jnp.float32(0.0), jnp.float32(0.0), 4)) == 0.0


def test_calibrated_range_reduces_error_on_small_sums():
  rng = np.random.default_rng(7)
  x = rng.integers(0, 4, (1, 16, 256)) * (rng.random((1, 16, 256)) < 0.1)
  w = rng.integers(-7, 8, (1, 256, 8))
  cfg = xb.XbarConfig(rows=256, cols=256, cell_bits=4, adc_bits=5, mapping="dc")
  ref = oracle(x, w)
  full = np.abs(sim(x, w, 4, 2, cfg, False) - ref).mean()
  lay = xb.make_layout(cfg, 256, 8, signed_input=False)
  u = np.asarray(
    xb.adc_utilisation(
      jnp.asarray(x, jnp.float32), xb.slice_levels(jnp.asarray(w, jnp.float32), 4, lay), 4, 2, lay
    )
  )
  frac = float(u.max())
  assert 0 < frac < 0.2
  calib = np.abs(sim(x, w, 4, 2, cfg, False, adc_frac=frac) - ref).mean()
  assert calib < full / 4


# ----------------------------------------------------------------------------------------------
# Non-idealities and gradients


def test_zero_noise_is_ideal_and_noise_is_keyed():
  rng = np.random.default_rng(8)
  x, w = rand_operands(rng, 1, 5, 60, 6, 6, 4, False)
  cfg = xb.XbarConfig(rows=32, cols=32, cell_bits=2, mapping="dc")
  k1, k2 = jax.random.key(1), jax.random.key(2)
  zero = sim(x, w, 6, 4, cfg, False, noise=NoiseConfig(), prog_key=k1, read_key=k1)
  np.testing.assert_array_equal(zero.astype(np.int64), oracle(x, w))
  nz = NoiseConfig(variation=0.1, stuck_at_0=0.01, stuck_at_1=0.01, read_noise=0.5)
  a = sim(x, w, 6, 4, cfg, False, noise=nz, prog_key=k1, read_key=k1)
  b = sim(x, w, 6, 4, cfg, False, noise=nz, prog_key=k1, read_key=k1)
  c = sim(x, w, 6, 4, cfg, False, noise=nz, prog_key=k2, read_key=k1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, oracle(x, w))
  np.testing.assert_array_equal(a, np.round(a))  # integer read-out


def test_variation_error_grows_with_sigma():
  rng = np.random.default_rng(9)
  x, w = rand_operands(rng, 1, 32, 128, 16, 8, 8, False)
  cfg = xb.XbarConfig(rows=128, cols=128, cell_bits=4, mapping="dr")
  ref = oracle(x, w).astype(np.float64)
  errs = []
  for s in (0.0, 0.02, 0.1):
    y = sim(
      x,
      w,
      8,
      8,
      cfg,
      False,
      noise=NoiseConfig(variation=s),
      prog_key=jax.random.key(0),
      read_key=jax.random.key(1),
    )
    errs.append(np.sqrt(np.mean((y - ref) ** 2)) / np.sqrt(np.mean(ref**2)))
  assert errs[0] == 0 and 0 < errs[1] < errs[2] < 0.2


def test_program_levels_stuck_at_rates():
  levels = jnp.full((200, 300), 2.0)
  lmax = jnp.full((300,), 3.0)
  g = np.asarray(
    noise_lib.program_levels(
      levels, lmax, NoiseConfig(stuck_at_0=0.1, stuck_at_1=0.2), jax.random.key(0)
    )
  )
  assert abs(np.mean(g == 0) - 0.1) < 0.01 and abs(np.mean(g == 3) - 0.2) < 0.01
  assert np.all((g == 0) | (g == 2) | (g == 3))
  g = np.asarray(
    noise_lib.program_levels(levels, lmax, NoiseConfig(variation=0.1), jax.random.key(1))
  )
  assert abs(np.std(g / 2.0) - 0.1) < 0.005 and g.min() >= 0


def test_all_cells_stuck_at_1_reads_max_levels():
  """With every cell at its column maximum the result is the product with the max levels."""
  rng = np.random.default_rng(10)
  x = rng.integers(0, 8, (1, 3, 20))
  w = rng.integers(-15, 16, (1, 20, 2))
  cfg = xb.XbarConfig(rows=8, cols=8, cell_bits=2, mapping="dc")
  y = sim(
    x,
    w,
    5,
    3,
    cfg,
    False,
    noise=NoiseConfig(stuck_at_1=1.0),
    prog_key=jax.random.key(0),
    read_key=jax.random.key(0),
  )
  # dc: both columns of a pair at max -> every slice contributes 0 after subtraction.
  np.testing.assert_array_equal(y, 0)


def test_straight_through_gradient_is_ideal_matmul_gradient():
  rng = np.random.default_rng(11)
  x, w = rand_operands(rng, 1, 4, 30, 5, 6, 4, False)
  x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  cfg = xb.XbarConfig(rows=16, cols=16, cell_bits=2, adc_bits=4, mapping="dc")
  g = jnp.asarray(rng.normal(size=(1, 4, 5)), jnp.float32)

  def noisy(x, w):
    y = xb.crossbar_mvm(
      x,
      w,
      6,
      4,
      cfg,
      signed_input=False,
      noise=NoiseConfig(variation=0.1),
      prog_key=jax.random.key(0),
      read_key=jax.random.key(1),
    )
    return jnp.sum(xb.straight_through(x, w, jax.lax.stop_gradient(y)) * g)

  ideal = lambda x, w: jnp.sum(xb.int_matmul(x, w) * g)
  for a, b in zip(jax.grad(noisy, argnums=(0, 1))(x, w), jax.grad(ideal, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The forward-pass hook


class _TinyCNN(nn.Module):
  """A quantized conv (signed image input) and a dense head: the conv and dense hook paths."""

  @nn.compact
  def __call__(self, x, ctx):
    x = nn.relu(layers.QuantConv(6, (3, 3), (2, 2), signed_input=True, name="conv")(x, ctx))
    x = x.reshape(x.shape[0], -1)
    return layers.QuantDense(10, name="fc")(x, ctx)


def test_hook_forward_equals_fake_quant_and_vmaps_over_policies():
  from cimjax import models

  module = _TinyCNN()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  v = module.init(jax.random.key(0), x, layers.QuantContext())
  pols = jnp.asarray(np.random.default_rng(12).integers(2, 9, (3, 2, 2)), jnp.int32)
  cfg = xb.XbarConfig(rows=7, cols=16, cell_bits=2, mapping="of")
  hook = xb.make_mvm_hook(cfg)
  fwd = lambda p, mvm: models.forward(module, v, x, p, mvm=mvm, capture=True)[1]["cim"]
  out = jax.jit(jax.vmap(lambda p: fwd(p, hook)))(pols)
  ref = jax.jit(jax.vmap(lambda p: fwd(p, None)))(pols)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A static policy allocates slices/cycles exactly and gives the same accumulators.
  p0 = np.asarray(pols[0])
  exact = xb.make_mvm_hook(cfg, policy=p0)
  got = jax.jit(lambda p: fwd(p, exact))(jnp.asarray(p0))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.tree.map(lambda t: t[0], ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _TinyMLP(nn.Module):
  """Two quantized dense layers (cheap to compile): signed input, unsigned hidden."""

  @nn.compact
  def __call__(self, x, ctx):
    x = nn.relu(layers.QuantDense(24, signed_input=True, name="fc1")(x, ctx))
    return layers.QuantDense(10, name="fc2")(x, ctx)


def test_noise_aware_gradients_through_the_hook():
  from cimjax import models

  module = _TinyMLP()
  x = jax.random.normal(jax.random.key(1), (8, 40))
  v = module.init(jax.random.key(0), x, layers.QuantContext())
  y = jnp.arange(8) % 10
  pol = jnp.full((2, 2), 4, jnp.int32)
  hook = xb.make_mvm_hook(
    xb.XbarConfig(rows=16, cols=16, cell_bits=2, adc_bits=6),
    policy=np.full((2, 2), 4),
    noise=NoiseConfig(variation=0.05, read_noise=0.2),
    key=jax.random.key(3),
  )

  def loss(params, mvm):
    logits, _ = models.forward(module, {"params": params}, x, pol, mvm=mvm)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  g = jax.jit(jax.grad(lambda p: loss(p, hook)))(v["params"])
  g_ideal = jax.jit(jax.grad(lambda p: loss(p, None)))(v["params"])
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(g))
  assert float(jnp.abs(g["fc1"]["kernel"]).sum()) > 0
  # Same structure, similar direction (noise only perturbs the forward activations).
  for name in ("fc1", "fc2"):
    a = np.asarray(g[name]["kernel"]).ravel()
    b = np.asarray(g_ideal[name]["kernel"]).ravel()
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.5


def test_hook_requires_key_for_noise():
  with pytest.raises(ValueError, match="key"):
    xb.make_mvm_hook(xb.XbarConfig(), noise=NoiseConfig(variation=0.1))
  # Zero noise needs no key (it is dropped).
  xb.make_mvm_hook(xb.XbarConfig(), noise=NoiseConfig())


# ----------------------------------------------------------------------------------------------
# Requantisation


def test_fixed_point_requantisation_matches_float():
  rng = np.random.default_rng(13)
  scale = rng.uniform(1e-6, 2.0, 50)
  mult, shift = xb.fixed_point_multiplier(scale)
  assert np.all((mult >= 2**30) & (mult < 2**31))
  np.testing.assert_allclose(mult * 2.0**-shift, scale, rtol=1e-9)
  acc = rng.integers(-(2**20), 2**20, (7, 50))
  got = xb.requantize_fixed(acc, mult, shift, -128, 127)
  want = np.asarray(
    xb.requantize(jnp.asarray(acc, jnp.float32), jnp.asarray(scale, jnp.float32), -128, 127)
  )
  assert np.max(np.abs(got - want)) <= 1
  assert np.mean(got == want) > 0.99


def test_package_reexports_its_modules():
  import importlib

  for name in xb.__all__:
    owner = getattr(xb, name)
    mod = getattr(owner, "__module__", None)
    if mod and mod.startswith("cimjax.crossbar."):
      assert getattr(importlib.import_module(mod), name) is owner
