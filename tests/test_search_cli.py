"""The search CLI: usage errors (exit 2, one line naming the flag) and a synthetic run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cimjax.cli import search as cli


@pytest.mark.parametrize(
  "args, flag",
  [
    (["--agent=foo"], "--agent=foo: allowed values are pg, ddpg, random, exhaustive"),
    (["--constraint=all"], "--constraint=all: allowed values are both, weight, io, none"),
    (["--accuracy=real"], "--accuracy=real: allowed values are data, synthetic"),
    (["--budget=-3"], "--budget=-3: allowed values are"),
    (["--budget=ten"], "--budget=ten"),
    (["--acc_drop=x"], "--acc_drop=x: allowed values are numbers >= 0"),
    (["--mode=fast"], "--mode=fast: allowed values are auto, loop, scan"),
    (["--min_bits=6", "--max_bits=4"], "--min_bits=6"),
    (["--accuracy=data"], "--checkpoint is required with --accuracy=data"),
    (["--hw=nope"], "--hw:"),
    (["--model=resnet99"], "--model=resnet99: allowed values are"),
    (["--agent=exhaustive", "--budget=10"], "--budget=10: --agent=exhaustive needs the whole"),
    (["--config=/no/such/file.py"], "--config: config file not found"),
    (["--bogus=1"], "bogus"),
  ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, flag):
  argv = ["launch.search", f"--workdir={tmp_path}", "--accuracy=synthetic", *args]
  if "--accuracy=data" in args:
    argv.remove("--accuracy=synthetic")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("launch.search: error: ")
  assert flag in err[0]


def test_missing_workdir(capsys):
  assert cli.main(["launch.search", "--accuracy=synthetic"]) == 2
  assert "--workdir is required" in capsys.readouterr().err


def test_synthetic_search_end_to_end(repo_root, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.search",
      f"--workdir={tmp_path}",
      "--accuracy=synthetic",
      "--model=small_cnn",
      "--hw=rram_64_c2",
      "--agent=pg",
      "--budget=64",
      "--population=16",
      "--constraint=both",
      "--noprogress",
    ],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rep = json.loads(proc.stdout.strip().splitlines()[-1])
  assert rep["agent"] == "pg" and rep["evals_used"] <= 64 and rep["hw"] == "rram_64_c2"
  assert rep["feasible"] and rep["latency_speedup"] > 1.0
  for f in (
    "best_policy.npy",
    "report.json",
    "pareto.json",
    "pareto.png",
    "bits.png",
    "latency.png",
  ):
    assert (tmp_path / f).is_file(), f
  pol = np.load(tmp_path / "best_policy.npy", allow_pickle=False)
  assert pol.shape == (5, 2) and (pol[0] == 8).all() and (pol[-1] == 8).all()


@pytest.mark.slow
def test_data_search_on_a_tiny_trained_model(repo_root, tmp_path):
  """``--accuracy=data``: train/tiny.py's any-precision model, search on its val split,
  re-evaluate on test."""
  import importlib.util

  from cimjax import train as train_lib

  spec = importlib.util.spec_from_file_location("tiny", os.path.join(repo_root, "train", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config().train  # a run config; the training stages use its train part
  for stage in ("fp32", "int8", "anyprec"):
    train_lib.run_stage(config, stage, tmp_path / "train")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.search",
      "--config=train/tiny.py",
      f"--checkpoint={tmp_path / 'train' / 'anyprec'}",
      f"--workdir={tmp_path / 's'}",
      "--hw=rram_128_c2",
      "--agent=pg",
      "--budget=48",
      "--population=16",
      "--acc_drop=2.0",
      "--noprogress",
      "--noplots",
    ],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rep = json.loads(proc.stdout.strip().splitlines()[-1])
  assert rep["accuracy_source"]["kind"] == "DataAccuracy"
  assert rep["final"]["name"] == "test" and len(rep["final"]["candidates"]) >= 1
  assert 0.0 < rep["acc_ref"] <= 100.0 and rep["evals_used"] <= 48
