"""Tests for the compile CLI (``python -m launch.compile``)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cimjax.cli import compile as cli

NARROW = '{"channels": [4, 8, 8], "hidden": 16}'


def run_cli(repo_root, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("CIMJAX_HW_DIR", None)
  return subprocess.run(
    [sys.executable, "-m", "launch.compile", *args],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_compile_verify_then_rerun_saved_program(parse, tmp_path, capsys):
  """The whole CLI in-process (main() with parsed flags): compile, verify, JSON, re-run."""
  wd = tmp_path / "wd"
  parse(
    "--model=small_cnn",
    f"--model_kwargs={NARROW}",
    f"--workdir={wd}",
    "--uniform=4,3",
    "--hw=rram_64_c2",
    "--adc_bits=6",
    "--dataset=none",
    "--num_verify=1",
    "--json",
  )
  cli.main(["cimjax-compile"])
  d = json.loads(capsys.readouterr().out)
  assert d["verify"]["ok"] and d["cost_model_mismatches"] == []
  assert [(r["w_bits"], r["a_bits"]) for r in d["layers"]] == [(4, 3)] * 5
  assert d["accuracy"] is None and d["nonideal"]["adc_bits"] == 6
  assert (wd / "program" / "manifest.json").is_file()
  assert (
    json.loads((wd / "compile_report.json").read_text())["total_latency_us"]
    == d["total_latency_us"]
  )
  # Re-run the saved program (table output, no dataset).
  parse(f"--program={wd / 'program'}", "--eval_images=0", "--num_verify=1")
  cli.main(["cimjax-compile"])
  out = capsys.readouterr().out
  assert "conv1" in out and "fc2" in out and "exact" in out
  assert "verification    OK" in out and "cost model agrees" in out


@pytest.mark.parametrize(
  "args,msg",
  [
    (("--model=resnet99", "--workdir=/tmp/x"), "--model: unknown model 'resnet99'"),
    (("--program=/no/such/program",), "--program: program directory not found"),
  ],
)
def test_bad_input_exits_2_with_one_line(repo_root, args, msg):
  proc = run_cli(repo_root, *args)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("cimjax-compile: error: ") and msg in lines[0]


@pytest.fixture
def parse():
  """Parses flags in-process (cli.FLAGS is module-global: reset after each test)."""

  def _parse(*args):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["cimjax-compile", *args])

  yield _parse
  cli.FLAGS.unparse_flags()


@pytest.mark.parametrize(
  "args,msg",
  [
    (("--workdir=/tmp/x", "--hw=no_such_target"), "--hw: unknown hardware target"),
    (("--workdir=/tmp/x", "--policy=/no/such.npy"), "--policy: policy file not found"),
    (("--workdir=/tmp/x", "--uniform=9,8"), "--uniform: layer 0 (conv1): weight bits 9"),
    (("--workdir=/tmp/x", "--uniform=8"), "--uniform='8': expected two integers"),
    (("--workdir=/tmp/x", "--adc_bits=0"), "--adc_bits='0'"),
    (("--workdir=/tmp/x", "--adc_bits=six"), "--adc_bits='six'"),
    (("--workdir=/tmp/x", "--variation=-0.1"), "--variation=-0.1"),
    (("--workdir=/tmp/x", "--model_kwargs=[1]"), "--model_kwargs='[1]': invalid JSON object"),
    (("--workdir=/tmp/x", '--model_kwargs={"depth": 3}'), "--model_kwargs:"),
    ((), "--workdir is required"),
    (("--workdir=/tmp/x", "--checkpoint=/no/such/dir"), "--checkpoint: directory not found"),
    (("--program=/tmp/p", "--policy=x.npy"), "--policy cannot be combined with --program"),
    (("--workdir=/tmp/x", "--dataset=imagenet"), "--dataset='imagenet'"),
  ],
)
def test_usage_errors_in_process(parse, args, msg):
  parse(*args)
  with pytest.raises(cli.UsageError) as e:
    cli.run_compile([])
  assert msg in str(e.value)


def test_policy_file_with_wrong_length(parse, tmp_path):
  from cimjax import policy

  path = policy.save_policy(tmp_path / "p.npy", np.full((3, 2), 4))
  parse("--workdir=/tmp/x", f"--policy={path}")
  with pytest.raises(cli.UsageError, match="--policy: .*3 layers; the model has 5"):
    cli.run_compile([])


def test_corrupt_program_is_a_usage_error(parse, tmp_path):
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / "manifest.json").write_text("{}")
  (tmp_path / "p" / "arrays.npz").write_bytes(b"")
  parse(f"--program={tmp_path / 'p'}")
  with pytest.raises(cli.UsageError, match="--program: .*not a cimjax-program manifest"):
    cli.run_compile([])


def test_eval_data_fits_the_model():
  from cimjax import models

  md = models.get_model("small_cnn")
  x, y = cli.load_eval_data("fashion_mnist_subset", md, 20)
  assert x.shape == (20, 28, 28, 1) and y.shape == (20,)
  r20 = models.get_model("resnet20")
  x, _ = cli.load_eval_data("fashion_mnist_subset", r20, 5)  # padded to 32x32x3
  assert x.shape == (5, 32, 32, 3)
  assert cli.load_eval_data("auto", models.get_model("resnet18"), 10) is None  # 1000 classes
  assert cli.load_eval_data("fashion_mnist_subset", md, 0) is None
  with pytest.raises(cli.UsageError, match="does not fit"):
    cli.load_eval_data("fashion_mnist_subset", models.get_model("vgg16"), 10)


def test_make_noise_splits_stuck_at():
  nz = cli.make_noise(0.05, 0.002, 0.0)
  assert nz.variation == 0.05 and nz.stuck_at_0 == nz.stuck_at_1 == 0.001
  assert cli.make_noise(0.0, 0.0, 0.0) is None
