"""``bash launch/bench_gpu.sh --dry OUT``: every section runs at tiny sizes and writes sane JSON."""

import json
import math
import os
import subprocess

import pytest


@pytest.fixture(scope="module")
def dry_result(repo_root, tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_gpu")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  proc = subprocess.run(
    ["bash", os.path.join(repo_root, "launch", "bench_gpu.sh"), "--dry", str(out)],
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert (out / "bench_gpu.txt").read_text().startswith("bench_gpu ")
  return json.loads((out / "bench_gpu.json").read_text())


def _pos(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_section_present_without_errors(dry_result):
  r = dry_result
  assert r["dry"] is True
  for key in ("env", "eval_small_cnn", "eval_resnet18", "train_resnet18", "search"):
    assert key in r and "error" not in r[key], (key, r.get(key, {}).get("error"))
    assert _pos(r[key]["seconds"])
  assert r["env"]["int8_self_check"] is True and r["env"]["auto_int_dtype"] == "float32"
  assert r["optional_modules_loaded"] == []


def test_evaluator_rows_cover_both_modes(dry_result):
  for key in ("eval_small_cnn", "eval_resnet18"):
    sec = dry_result[key]
    assert set(sec["mode_peak_gops"]) == {"float32", "int8"}
    assert all(_pos(v) for v in sec["mode_peak_gops"].values())
    modes = {(row["n"], row["int_mode"]) for row in sec["rows"]}
    assert {m for _, m in modes} == {"float32", "int8"}
    for row in sec["rows"]:
      assert _pos(row["candidates_per_s"]) and row["measured_candidates"] >= 1
      assert 0 < row["fraction_of_mode_peak"] < 1.5


def test_training_and_search_figures(dry_result):
  t = dry_result["train_resnet18"]
  for mode in ("float32", "int8"):
    assert _pos(t[mode]["images_per_s"]) and math.isfinite(t[mode]["final_loss"])
  q = dry_result["search"]
  assert 1 <= q["evals_used"] <= q["budget"]
  assert 0 <= q["best_accuracy"] <= 100 and q["best_speedup"] >= 1.0
  assert q["data"] in ("fashion_mnist", "fashion_mnist_subset") or q["data"].startswith("stand-in")
