"""Tests for the compiler, program format, executor and verification (cimjax.compiler)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cimjax import compiler as cc
from cimjax import cost, layers, models, trace
from cimjax import hw as hw_lib
from cimjax.noise import NoiseConfig

ZOO = ("small_cnn", "resnet20", "resnet18", "vgg16", "vit_b32")
SMALL_ZOO = {  # small input sizes for numerics (random weights)
  "small_cnn": {},
  "small_cnn_narrow": {"channels": (4, 8, 8), "hidden": 16},
  # The ViT code path (patch conv, QKV, Q.K^T and A.V on dynamic crossbars, MLP, head) at a
  # width that compiles fast; the full-width depth-2 model runs in the slow tests.
  "vit_b32_narrow": {"image_size": 64, "depth": 1, "hidden": 64, "num_heads": 4, "mlp_dim": 128},
  "resnet20": {},
  "resnet18": {"image_size": 32},
  "vgg16": {"image_size": 32, "hidden": (64, 64)},
  "vit_b32": {"image_size": 64, "depth": 2},
}
COST_FIELDS = (
  "latency_us",
  "latency_write_us",
  "energy_pj",
  "e_dac_pj",
  "e_read_pj",
  "e_adc_pj",
  "e_shift_add_pj",
  "e_write_pj",
)


def init_vars(md, seed=0):
  """Random variables of the model's shapes, drawn in NumPy (no init compile: fast).

  Kernels ~ N(0, 1/fan_in), clip tables from the kernels (weights) or U(1, 4)
  (activations), batch-norm and layer-norm statistics and scales near 1, other leaves small.
  """
  x = jnp.zeros((1, *md.input_shape), jnp.float32)
  shapes = jax.eval_shape(lambda k: md.module.init(k, x, layers.QuantContext()), jax.random.key(0))
  flat = traverse_util.flatten_dict(dict(shapes), sep="/")
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in flat.items():
    leaf = k.rsplit("/", 1)[-1]
    if leaf == "kernel":
      v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif leaf in ("var", "scale"):
      v = rng.uniform(0.5, 1.5, s.shape)
    elif leaf in ("a_clip", "w_clip"):
      v = rng.uniform(1.0, 4.0, s.shape)
    else:
      v = rng.normal(size=s.shape) * 0.1
    out[k] = v.astype(np.float32)
  for k in out:
    if k.endswith("/w_clip") and k[: -len("w_clip")] + "kernel" in out:
      kern = out[k[: -len("w_clip")] + "kernel"]
      amax = np.abs(kern).reshape(-1, kern.shape[-1]).max(0)
      ch = out[k].shape[-1]
      amax = amax if ch == amax.shape[0] else amax.max(keepdims=True)
      out[k] = (amax[None, :] * rng.uniform(0.5, 1.0, out[k].shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out, sep="/")


def random_policy(num_layers, seed):
  return np.random.default_rng(seed).integers(2, 9, (num_layers, 2)).astype(np.int32)


@pytest.fixture(scope="module")
def zoo_specs():
  return {name: trace.trace_specs(models.get_model(name)) for name in ZOO}


# ----------------------------------------------------------------------------------------------
# Schedule walk == cost model


def assert_walk_matches(specs, hw, pairs):
  t = cost.cost_tables(specs, hw, xp=np)
  num = len(specs)
  for w, a in pairs:
    plans, sched, walked = cc.compile_geometry(specs, np.tile([[w, a]], (num, 1)), hw)
    for f in COST_FIELDS:
      np.testing.assert_allclose(
        getattr(walked, f),
        getattr(t, f)[:, w - 1, a - 1],
        rtol=1e-12,
        atol=0,
        err_msg=f"{hw.name} {hw.mapping} {hw.latency_mode} w{w} a{a}: {f}",
      )
    np.testing.assert_array_equal(np.array([p.tiles for p in plans]), t.tiles[:, w - 1, a - 1])
    reps = np.array([s.repeat for s in specs])
    np.testing.assert_array_equal(walked.tiles_programmed, t.tiles[:, w - 1, a - 1] * reps)


ALL_PAIRS = [(w, a) for w in range(1, 9) for a in range(1, 9)]


@pytest.mark.parametrize("mapping", ["of", "dc", "dr"])
@pytest.mark.parametrize("name", ZOO)
def test_schedule_walk_equals_cost_model_every_layer_and_bit_pair(zoo_specs, name, mapping):
  """Full-size zoo geometry (ResNet-18/VGG-16/ViT-B/32 at 224): traced, no weights."""
  hw = hw_lib.load_hw("rram_256_c4").replace(mapping=mapping)
  assert_walk_matches(zoo_specs[name], hw, ALL_PAIRS)


@pytest.mark.parametrize(
  "mode,crossbars,batch", [("stationary", 1, 16), ("parallel", 3, 4), ("parallel", 64, 1)]
)
@pytest.mark.parametrize("hw_name", ["rram_64_c2", "rram_128_c2"])
def test_schedule_walk_equals_cost_model_latency_modes(zoo_specs, hw_name, mode, crossbars, batch):
  pairs = [(2, 2), (3, 8), (5, 4), (8, 8)]
  for name in ("small_cnn", "resnet20", "vit_b32"):
    for mapping in ("of", "dc", "dr"):
      hw = hw_lib.load_hw(hw_name).replace(
        mapping=mapping, latency_mode=mode, num_crossbars=crossbars, batch=batch
      )
      assert_walk_matches(zoo_specs[name], hw, pairs)


def test_small_crossbar_targets_every_bit_pair(zoo_specs):
  for name in ("small_cnn", "resnet20"):
    for mapping in ("of", "dc", "dr"):
      assert_walk_matches(
        zoo_specs[name], hw_lib.load_hw("rram_64_c2").replace(mapping=mapping), ALL_PAIRS
      )


def test_schedule_structure():
  from cimjax.spec import LayerSpec

  hw = hw_lib.load_hw("rram_64_c2").replace(
    mapping="dc", latency_mode="parallel", num_crossbars=4, batch=2
  )
  spec = LayerSpec("conv", "Conv2D", m=40, n=150, invocations=9, repeat=2)
  plan = cc.plan_layer(spec, 5, 3, hw)
  assert (plan.slices, plan.slice_shifts, plan.slice_bits) == (3, (0, 2, 4), (2, 2, 1))
  assert (plan.cycles, plan.cycle_shifts) == (3, (0, 1, 2))
  assert (plan.rows_p, plan.cols_p) == (150, 240)
  assert (plan.row_tiles, plan.col_tiles) == (3, 4)
  s = cc.build_schedule([plan], hw)
  nt = plan.total_tiles
  assert len(s) == 3 * nt + 1 and s.op[-1] == cc.OP_DIGITAL
  for r in range(-(-nt // 4)):
    ops = s.op[s.round == r]
    # All programs, then all executes, then all shift-adds; at most 4 crossbars per round.
    assert list(ops) == sorted(ops) and np.sum(ops == cc.OP_PROGRAM) <= 4
  exe = s.op == cc.OP_EXECUTE
  assert np.all(s.count[exe] == 9 * 3)
  assert s.rows[exe].sum() == 150 * 4 * 2 and s.cols[exe].sum() == 240 * 3 * 2
  assert s.to_records(2)[0]["op"] == "program"


# ----------------------------------------------------------------------------------------------
# Compile + verify (bit-exact) over the zoo


def compile_and_check(
  name, mapping, seed, input_scheme="twos", hw_name="rram_256_c4", batch=1, variant=None
):
  kw = SMALL_ZOO[variant or name]
  md = models.get_model(name, **kw)
  v = init_vars(md, seed)
  pol = random_policy(len(trace.trace_specs(md)), seed)
  hw = hw_lib.load_hw(hw_name).replace(mapping=mapping)
  prog = cc.compile_model(md, v, pol, hw, input_scheme=input_scheme, model_kwargs=kw)
  x = jax.random.normal(jax.random.key(seed + 1), (batch, *md.input_shape))
  rep = cc.verify(prog, x, model=md)
  assert rep.ok, [c for c in rep.mismatched()]
  assert rep.logits_equal and rep.logits_max_abs_err == 0.0 and rep.top1_agreement == 1.0
  assert len(rep.layers) == len(pol) and all(c.exact for c in rep.layers)
  assert cc.check_cost(prog) == []
  return prog, md, v, x


@pytest.mark.parametrize(
  "name,variant,mapping,scheme,hw_name",
  [
    ("small_cnn", "small_cnn_narrow", "of", "offset", "rram_64_c2"),
    ("vit_b32", "vit_b32_narrow", "dr", "twos", "rram_128_c2"),
  ],
)
def test_verify_bit_exact(name, variant, mapping, scheme, hw_name):
  compile_and_check(name, mapping, seed=3, input_scheme=scheme, hw_name=hw_name, variant=variant)


@pytest.mark.slow
@pytest.mark.parametrize(
  "name,mapping,scheme",
  [
    ("resnet18", "of", "twos"),
    ("vgg16", "dr", "offset"),
    ("vit_b32", "of", "offset"),
    ("resnet20", "dr", "offset"),
    ("small_cnn", "dc", "twos"),
    ("resnet18", "dc", "offset"),
    ("vgg16", "dc", "twos"),
    ("vit_b32", "dc", "twos"),
    ("resnet20", "dc", "twos"),
  ],
)
def test_verify_bit_exact_slow(name, mapping, scheme):
  """Every zoo model at the sizes of the brief, two random policies/inputs each."""
  compile_and_check(name, mapping, seed=5, input_scheme=scheme, batch=2)


def test_program_contents_small_cnn():
  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = init_vars(md)
  pol = np.array([[8, 8], [4, 3], [2, 5], [6, 2], [7, 7]], np.int32)
  hw = hw_lib.load_hw("rram_64_c2")  # dc, 64x64, 2-bit cells
  prog = cc.compile_model(md, v, pol, hw)
  p = prog.layers[1]  # conv2: 4 -> 8 channels, 3x3
  assert (p.m, p.n, p.w_bits, p.a_bits, p.slices, p.cycles) == (8, 36, 4, 3, 2, 3)
  levels = prog.layer_array(1, "levels")
  assert levels.dtype == np.uint8 and levels.shape == (1, 1, 1, 64, 64)
  assert levels.max() <= 3 and levels[0, 0, 0, 36:].max() == 0
  assert levels[0, 0, 0, :, 32:].max() == 0
  w_int = prog.layer_array(1, "w_int")
  assert w_int.shape == (1, 36, 8) and np.abs(w_int).max() <= 7
  # The levels hold |w| slices in paired columns: reconstruct the integer weights.
  lv = levels[0, 0, 0, :36, :32].astype(np.int64).reshape(36, 8, 2, 2)  # [n, m, slice, +/-]
  rec = ((lv[..., 0] - lv[..., 1]) * np.array([1, 4])).sum(-1)
  np.testing.assert_array_equal(rec, w_int[0])
  np.testing.assert_array_equal(prog.layer_array(1, "w_colsum"), w_int.sum(1))
  scale = prog.layer_array(1, "out_scale")
  np.testing.assert_allclose(
    prog.layer_array(1, "out_mult") * 2.0 ** -prog.layer_array(1, "out_shift").astype(np.float64),
    scale,
    rtol=1e-8,
  )
  rows = prog.summary()
  assert [r["tiles"] for r in rows] == [p.total_tiles for p in prog.layers]
  assert prog.total_latency_us == pytest.approx(
    cost.policy_cost(cost.cost_tables(trace.trace_specs(md), hw, xp=np).latency_us, pol), rel=1e-12
  )
  with pytest.raises(cc.ProgramError, match="policy"):
    cc.compile_model(md, v, pol[:3], hw)
  with pytest.raises(cc.ProgramError, match="layer 0 \\(conv1\\): weight bits 9"):
    cc.compile_model(md, v, np.full((5, 2), 9), hw)


# ----------------------------------------------------------------------------------------------
# Save / load


@pytest.fixture(scope="module")
def small_program():
  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = init_vars(md, 1)
  pol = random_policy(5, 1)
  prog = cc.compile_model(
    md, v, pol, hw_lib.load_hw("rram_128_c2"), model_kwargs={"channels": [4, 8, 8], "hidden": 16}
  )
  return prog, md, v


def test_save_load_roundtrip_and_rerun(small_program, tmp_path):
  prog, md, v = small_program
  path = cc.save_program(prog, tmp_path / "prog")
  assert sorted(os.listdir(path)) == [cc.ARRAYS, cc.MANIFEST]
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left
  man = json.loads((path / cc.MANIFEST).read_text())
  assert man["format"] == cc.FORMAT and man["hw"]["name"] == "rram_128_c2"
  assert len(man["layers"]) == 5 and all(len(m["sha256"]) == 64 for m in man["arrays"].values())
  loaded = cc.load_program(path)
  assert loaded.layers == prog.layers
  np.testing.assert_array_equal(loaded.policy, prog.policy)
  for k, a in prog.arrays.items():
    np.testing.assert_array_equal(loaded.arrays[k], a)
  for a, b in zip(loaded.schedule, prog.schedule):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.cost.latency_us, prog.cost.latency_us)
  # The loaded program rebuilds its model from the manifest and runs on its own variables.
  x = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
  rep = cc.verify(loaded, x)
  assert rep.ok
  # Saving again over an existing program replaces it atomically.
  cc.save_program(loaded, path)
  assert cc.load_program(path).layers == prog.layers


def test_load_errors(small_program, tmp_path):
  prog, _, _ = small_program
  with pytest.raises(cc.ProgramError, match="not found"):
    cc.load_program(tmp_path / "nope")
  path = cc.save_program(prog, tmp_path / "p")
  # Missing file.
  (path / cc.ARRAYS).rename(tmp_path / "a.npz")
  with pytest.raises(cc.ProgramError, match="missing arrays.npz"):
    cc.load_program(path)
  (tmp_path / "a.npz").rename(path / cc.ARRAYS)
  # Corrupt bytes in the array file.
  data = bytearray((path / cc.ARRAYS).read_bytes())
  data[len(data) // 2] ^= 0xFF
  (path / cc.ARRAYS).write_bytes(bytes(data))
  with pytest.raises(cc.ProgramError, match="SHA-256 mismatch"):
    cc.load_program(path)
  # A consistent file whose array does not match the manifest's checksum.
  path = cc.save_program(prog, tmp_path / "q")
  arrays = dict(np.load(path / cc.ARRAYS, allow_pickle=False))
  key = "layer001/levels"
  arrays[key] = arrays[key].copy()
  arrays[key].flat[0] ^= 1
  np.savez(path / cc.ARRAYS, **arrays)
  man = json.loads((path / cc.MANIFEST).read_text())
  man["files"][cc.ARRAYS] = cc.file_sha256(path / cc.ARRAYS)
  (path / cc.MANIFEST).write_text(json.dumps(man))
  with pytest.raises(cc.ProgramError, match="array 'layer001/levels': SHA-256 mismatch"):
    cc.load_program(path)
  # Corrupt manifest.
  (path / cc.MANIFEST).write_text("{not json")
  with pytest.raises(cc.ProgramError, match="corrupt manifest"):
    cc.load_program(path)
  # Refuses to replace something that is not a program directory.
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(cc.ProgramError, match="not a program directory"):
    cc.save_program(prog, other)
  assert (other / "keep.txt").exists()


def test_arrays_need_no_pickle(small_program, tmp_path):
  prog, _, _ = small_program
  path = cc.save_program(prog, tmp_path / "p")
  with np.load(path / cc.ARRAYS, allow_pickle=False) as z:
    assert all(z[k].dtype != object for k in z.files)


# ----------------------------------------------------------------------------------------------
# Executor with non-idealities


def test_executor_nonidealities_and_calibration(small_program):
  prog, md, v = small_program
  x = jax.random.normal(jax.random.key(4), (8, 28, 28, 1))
  ref = np.asarray(models.forward(md.module, v, x, jnp.asarray(prog.policy))[0])
  frac = cc.calibrate_adc(prog, x, percentile=100.0)
  assert frac.shape == (5,) and np.all((frac > 0) & (frac <= 1)) and np.any(frac < 1)
  # One compiled executor: 8-bit ADC and noise; keys and ADC ranges are arguments.
  nz = NoiseConfig(variation=0.01, stuck_at_0=1e-4, stuck_at_1=1e-4, read_noise=0.1)
  run = cc.make_executor(prog, adc_bits=8, noise=nz, key=jax.random.key(0))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  full = np.asarray(run(x, read_key=k1)[0])
  calibrated = np.asarray(run(x, read_key=k1, adc_frac=frac)[0])
  assert np.abs(calibrated - ref).mean() < np.abs(full - ref).mean()
  # Keyed: the same read key gives the same result, another one a different result.
  np.testing.assert_array_equal(np.asarray(run(x, read_key=k1)[0]), full)
  assert not np.array_equal(np.asarray(run(x, read_key=k2)[0]), full)
  with pytest.raises(cc.ProgramError, match="key"):
    cc.make_executor(prog, noise=nz)


def test_verify_reports_mismatches(small_program):
  prog, md, v = small_program
  x = jax.random.normal(jax.random.key(5), (2, 28, 28, 1))
  bad = cc.CimProgram(
    hw=prog.hw,
    policy=prog.policy,
    layers=prog.layers,
    schedule=prog.schedule,
    arrays=dict(prog.arrays),
    model=prog.model,
    model_kwargs=prog.model_kwargs,
  )
  lv = bad.arrays["layer002/levels"].copy()
  lv[0, 0, 0, 0, 0] = (lv[0, 0, 0, 0, 0] + 1) % 4
  bad.arrays["layer002/levels"] = lv
  rep = cc.verify(bad, x, model=md, variables=v)
  assert not rep.ok
  assert [c.name for c in rep.mismatched()][0] == "conv3"
  assert not rep.layers[2].exact and rep.layers[2].mismatches > 0
  assert rep.layers[0].exact and rep.layers[1].exact
  d = rep.to_dict()
  assert d["ok"] is False and len(d["layers"]) == 5


def test_compile_and_verify_writes_workdir(tmp_path):
  from cimjax import data

  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = init_vars(md, 2)
  pol = np.full((5, 2), 4, np.int32)
  test = data.load_dataset("fashion_mnist_subset")["test"]
  res = cc.compile_and_verify(
    md,
    v,
    pol,
    "rram_256_c4",
    workdir=tmp_path,
    num_verify=2,
    model_kwargs={"channels": [4, 8, 8], "hidden": 16},
    adc_bits=6,
    eval_data=(test.images[:100], test.labels[:100]),
    eval_batch=50,
  )
  assert res.report.ok and res.path == tmp_path / "program"
  assert set(res.accuracy) == {"fake_quant", "crossbar"}
  rep = json.loads((tmp_path / "compile_report.json").read_text())
  assert rep["verify"]["ok"] and rep["cost_model_mismatches"] == []
  assert len(rep["layers"]) == 5 and rep["nonideal"]["adc_bits"] == 6
  assert cc.load_program(res.path).total_latency_us == pytest.approx(rep["total_latency_us"])


def test_restore_variables_from_a_stage_directory(tmp_path):
  import orbax.checkpoint as ocp

  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = init_vars(md, 3)
  with ocp.StandardCheckpointer() as c:
    c.save((tmp_path / "stage" / "variables").absolute(), v)
    c.wait_until_finished()
  got = cc.restore_variables(tmp_path / "stage", md)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(cc.ProgramError, match="cannot restore"):
    cc.restore_variables(
      tmp_path / "stage", models.get_model("small_cnn", channels=(2, 8, 8), hidden=16)
    )
  with pytest.raises(cc.ProgramError, match="directory not found"):
    cc.restore_variables(tmp_path / "nope", md)


def test_old_module_name_is_an_alias_of_the_compiler():
  from cimjax import compile as old

  assert old.__all__ == cc.__all__
  for name in cc.__all__:
    assert getattr(old, name) is getattr(cc, name)
