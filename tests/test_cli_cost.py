"""Tests for the cost CLI (``python -m launch.cost``), run in subprocesses from the repo root."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SMALL_CNN_LAYERS = 5  # conv1, conv2, conv3, fc1, fc2


def run_cli(repo_root, *args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("CIMJAX_HW_DIR", None)
  return subprocess.run(
    [sys.executable, "-m", "launch.cost", *args],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def check_report(d, num_layers):
  assert set(d) == {
    "model",
    "hw",
    "layers",
    "total_latency_us",
    "baseline_latency_us",
    "speedup",
    "total_energy_pj",
  }
  assert len(d["layers"]) == num_layers
  for r in d["layers"]:
    assert set(r) == {
      "name",
      "type",
      "m",
      "n",
      "invocations",
      "repeat",
      "w_bits",
      "a_bits",
      "tiles",
      "latency_us",
      "energy_pj",
    }
    assert r["type"] in ("Conv2D", "Dense", "MatMul") and r["tiles"] >= 1
  assert d["total_latency_us"] == pytest.approx(
    sum(r["latency_us"] for r in d["layers"]), rel=1e-12
  )
  assert d["total_energy_pj"] == pytest.approx(sum(r["energy_pj"] for r in d["layers"]), rel=1e-12)
  assert d["speedup"] == pytest.approx(d["baseline_latency_us"] / d["total_latency_us"], rel=1e-12)


def test_json_default_is_uniform_8_8_on_rram_128_c2(repo_root):
  proc = run_cli(repo_root, "--json")
  assert proc.returncode == 0, proc.stderr
  d = json.loads(proc.stdout)  # exactly one JSON object on stdout
  assert d["model"] == "small_cnn" and d["hw"] == "rram_128_c2"
  check_report(d, SMALL_CNN_LAYERS)
  assert all((r["w_bits"], r["a_bits"]) == (8, 8) for r in d["layers"])
  assert d["speedup"] == pytest.approx(1.0)
  assert d["layers"][0]["name"] == "conv1" and d["layers"][0]["type"] == "Conv2D"


def test_json_with_policy_file_matches_cost_model(repo_root, tmp_path):
  from cimjax import cost, hw, models, policy, trace

  pol = np.array([[8, 8], [4, 3], [2, 2], [6, 5], [8, 8]])
  path = policy.save_policy(tmp_path / "p.npy", pol)
  proc = run_cli(repo_root, "--model=small_cnn", "--hw=rram_64_c2", f"--policy={path}", "--json")
  assert proc.returncode == 0, proc.stderr
  d = json.loads(proc.stdout)
  check_report(d, SMALL_CNN_LAYERS)
  assert [[r["w_bits"], r["a_bits"]] for r in d["layers"]] == pol.tolist()
  assert d["speedup"] > 1.0
  m = models.get_model("small_cnn")
  specs = trace.trace_specs(m.module, m.input_shape)
  t = cost.cost_tables(specs, hw.load_hw("rram_64_c2"), xp=np)
  assert d["total_latency_us"] == pytest.approx(cost.policy_cost(t.latency_us, pol), rel=1e-12)
  assert d["total_energy_pj"] == pytest.approx(cost.policy_cost(t.energy_pj, pol), rel=1e-12)


def test_table_output_and_hw_path(repo_root):
  proc = run_cli(repo_root, "--hw=hw/rram_256_c4.toml", "--uniform=4,4")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "rram_256_c4" in out and "conv1" in out and "fc2" in out
  assert "speedup" in out and "latency_us" in out and "energy_pJ" in out


ERROR_CASES = [
  (("--model=resnet99",), "--model: unknown model 'resnet99'"),
  (("--hw=no_such_target",), "--hw: unknown hardware target 'no_such_target'; available:"),
  (("--hw=/no/such/target.toml",), "--hw: hardware target file not found"),
  (("--policy=/no/such/policy.npy",), "--policy: policy file not found"),
  (("--uniform=9,8",), "--uniform: layer 0 (conv1): weight bits 9 outside the allowed range"),
  (("--uniform=8",), "--uniform='8': expected two integers W,A"),
  (("--policy=x.npy", "--uniform=4,4"), "--policy and --uniform are mutually exclusive"),
]


@pytest.mark.parametrize("args,needle", ERROR_CASES)
def test_errors_exit_2_with_one_line(repo_root, args, needle):
  proc = run_cli(repo_root, *args)
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert needle in lines[0], lines[0]


def test_policy_errors(repo_root, tmp_path):
  short = tmp_path / "short.npy"
  np.save(short, np.array([[8, 8]] * 3))
  proc = run_cli(repo_root, f"--policy={short}")
  assert proc.returncode == 2
  assert "--policy" in proc.stderr and "policy has 3 layers; the model has 5" in proc.stderr
  bad = tmp_path / "bad.npy"
  np.save(bad, np.array([[8, 8], [8, 8], [8, 0], [8, 8], [8, 8]]))
  proc = run_cli(repo_root, f"--policy={bad}")
  assert proc.returncode == 2
  assert "layer 2 (conv3): activation bits 0 outside the allowed range 1..8" in proc.stderr
