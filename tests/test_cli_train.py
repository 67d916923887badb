"""Tests of the training launcher (cimjax.cli.train / python -m launch.train)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cimjax.cli import train as cli

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "train" / "tiny.py")


def _run(capsys, *args):
  rc = cli.main(["launch.train", f"--config={CONFIG}", *args])
  out, err = capsys.readouterr()
  return rc, out, err


def _one_error_line(err):
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("launch.train: error: ")
  return lines[0]


def test_fp32_stage_runs_and_prints_result(tmp_path, capsys):
  rc, out, err = _run(
    capsys,
    f"--workdir={tmp_path}",
    "--stage=fp32",
    "--config.batch_size=64",
    "--config.checkpoint_every=0",
  )
  assert rc == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["stage"] == "fp32" and result["steps"] == 40
  assert (tmp_path / "fp32" / "result.json").is_file()
  # Overrides are applied and recorded.
  meta_cfg = json.loads((tmp_path / "fp32" / "result.json").read_text())
  assert meta_cfg["batch_size"] == 64
  # Asking again: detected as done, same result, exit 0.
  rc, out2, _ = _run(capsys, f"--workdir={tmp_path}", "--stage=fp32")
  assert rc == 0 and json.loads(out2.strip().splitlines()[-1]) == result


def test_missing_prerequisite(tmp_path, capsys):
  rc, _, err = _run(capsys, f"--workdir={tmp_path}", "--stage=anyprec")
  assert rc == 2
  assert "needs the finished int8 stage" in _one_error_line(err)


@pytest.mark.parametrize(
  "args, expect",
  [
    (["--config.nope=1"], "unknown config field 'nope'"),
    (["--config.fp32.nope=1"], "unknown config field 'nope'"),
    (["--config.fp32.lr=abc"], "--config.fp32.lr=abc"),
    (["--config.fp32.optimizer=adam"], "config.fp32.optimizer = 'adam'; allowed: sgd, adamw"),
    (["--config.data.name=cifar"], "config.data.name = 'cifar'"),
    (["--stage=int9"], "--stage=int9"),
    (["--bogus=1"], "bogus"),
  ],
)
def test_bad_flags_and_config_fields(tmp_path, capsys, args, expect):
  base = [f"--workdir={tmp_path}"] + (
    [] if any(a.startswith("--stage") for a in args) else ["--stage=fp32"]
  )
  rc, _, err = _run(capsys, *base, *args)
  assert rc == 2
  assert expect in _one_error_line(err)


def test_missing_config_file(tmp_path, capsys):
  rc = cli.main(
    ["launch.train", "--config=train/no_such.py", f"--workdir={tmp_path}", "--stage=fp32"]
  )
  assert rc == 2
  assert "config file not found: train/no_such.py" in _one_error_line(capsys.readouterr()[1])


def test_required_flags(tmp_path, capsys):
  rc = cli.main(["launch.train", f"--config={CONFIG}", "--stage=fp32"])
  assert rc == 2 and "--workdir is required" in _one_error_line(capsys.readouterr()[1])


def test_policy_errors(tmp_path, capsys):
  rc, _, err = _run(capsys, f"--workdir={tmp_path}", "--stage=finetune")
  assert rc == 2 and "needs --policy" in _one_error_line(err)
  garbage = tmp_path / "garbage.npy"
  garbage.write_bytes(b"not an npy file")
  rc, _, err = _run(capsys, f"--workdir={tmp_path}", "--stage=finetune", f"--policy={garbage}")
  assert rc == 2 and "--policy" in _one_error_line(err)
  rc, _, err = _run(
    capsys, f"--workdir={tmp_path}", "--stage=finetune", f"--policy={tmp_path / 'missing.npy'}"
  )
  assert rc == 2 and "not found" in _one_error_line(err)
  good = tmp_path / "p.npy"
  np.save(good, np.full((5, 2), 4))
  rc, _, err = _run(capsys, f"--workdir={tmp_path}", "--stage=fp32", f"--policy={good}")
  assert rc == 2 and "only used by --stage=finetune" in _one_error_line(err)
  # A policy for another model: reported once the prerequisite stage exists.
  (tmp_path / "int8").mkdir()
  (tmp_path / "int8" / "result.json").write_text("{}")
  wrong = tmp_path / "wrong.npy"
  np.save(wrong, np.full((3, 2), 4))
  rc, _, err = _run(capsys, f"--workdir={tmp_path}", "--stage=finetune", f"--policy={wrong}")
  assert rc == 2 and "policy has 3 layers; the model has 5" in _one_error_line(err)


def test_launcher_subprocess_exit_code(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      "--config=train/tiny.py",
      f"--workdir={tmp_path}",
      "--stage=fp32",
      "--config.not_a_field=3",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert out.stderr.strip() == (
    "launch.train: error: --config.not_a_field: unknown config field 'not_a_field'"
  )
