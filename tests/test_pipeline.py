"""The main job end to end on the tiny config: every stage, the report, kill + re-run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)

from cimjax import pipeline, policy

TINY = "train/run_tiny.py"


def _tiny_config(repo_root):
  import importlib.util

  spec = importlib.util.spec_from_file_location("run_tiny", os.path.join(repo_root, TINY))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _figures(report):
  """Every report figure except wall times and paths."""
  r = dict(report)
  r.pop("stage_time_s")
  r.pop("total_time_s")
  r["search"] = {k: v for k, v in r["search"].items() if k != "wall_s"}
  return r


@pytest.fixture(scope="module")
def tiny_run(repo_root, tmp_path_factory):
  wd = tmp_path_factory.mktemp("run")
  cwd = os.getcwd()
  os.chdir(repo_root)
  try:
    pipe = pipeline.Pipeline(_tiny_config(repo_root), wd, log=lambda s: None)
    report = pipe.run()
  finally:
    os.chdir(cwd)
  return wd, report


def test_every_stage_and_report(tiny_run):
  wd, r = tiny_run
  for stage in ("fp32", "int8", "anyprec", "search", "evaluate", "compile"):
    assert (wd / stage / "result.json").is_file(), stage
  assert (wd / "finetune" / "chosen" / "result.json").is_file()
  assert json.loads((wd / "report.json").read_text()) == json.loads(json.dumps(r))
  # The chosen policy is valid under the run's constraint (first/last 8/8, weights % cell bits).
  pol = np.asarray(r["policy"])
  policy.validate_policy(pol, len(pol), constraint="both", cell_bits=2)
  assert r["speedup"] > 1.0 and r["latency_us"]["mixed"] < r["latency_us"]["int8"]
  assert r["crossbar_tiles"]["mixed"] <= r["crossbar_tiles"]["int8"]
  assert r["verification"]["bit_exact"] is True
  assert r["verification"]["logits_equal"] is True
  assert not r["verification"]["cost_model_mismatches"]
  np.testing.assert_allclose(
    r["verification"]["program_latency_us"], r["latency_us"]["mixed"], rtol=1e-9
  )
  for k in ("fp32", "int8", "mixed"):
    assert 0 <= r["accuracy"][k]["test"] <= 100
  assert r["search"]["evaluations"] <= 48
  md = (wd / "report.md").read_text()
  assert "## Accuracy" in md and f"{r['speedup']:.3f}x" in md
  # The choice on the held-out rest of the validation split is paired with INT8 there.
  pick = json.loads((wd / "search" / "result.json").read_text())["chosen"]
  final = json.loads((wd / "search" / "report.json").read_text())["final"]
  assert final["paired"] and pick["margin_se"] == 1.0
  c = final["candidates"][pick["rank_in_search"]]
  assert c["policy"] == r["policy"] and c["acc_diff"] == pick["acc_diff"]
  assert sum(c["discordant"]) <= final["images"] and c["diff_se"] >= 0
  np.testing.assert_allclose(c["acc_diff"], c["accuracy"] - final["acc_ref"], atol=1e-9)
  assert "Paired with INT8 on the same images" in md
  for rel in r["plots"].values():
    assert f"]({rel})" in md and (wd / rel).stat().st_size > 1000


def test_rerun_skips_finished_stages(tiny_run, repo_root):
  wd, r = tiny_run
  lines = []
  pipe = pipeline.Pipeline(_tiny_config(repo_root), wd, log=lines.append)
  t = time.time()
  again = pipe.run()
  assert time.time() - t < 60
  assert sum("already finished" in s for s in lines) == 7
  assert _figures(again) == _figures(r)


def test_changed_config_is_refused(tiny_run, repo_root):
  wd, _ = tiny_run
  c = _tiny_config(repo_root)
  c.search.budget = 49
  with pytest.raises(pipeline.PipelineError, match="another config"):
    pipeline.Pipeline(c, wd).run(["fp32"])


def test_config_difference_accepts_only_fields_added_at_their_defaults():
  cur = json.loads(pipeline.default_config().to_json())
  old = json.loads(json.dumps(cur))
  del old["search"]["choose_margin"]
  assert pipeline.config_difference(cur, cur) == ([], [])
  assert pipeline.config_difference(old, cur) == ([], ["search.choose_margin"])
  cur2 = json.loads(json.dumps(cur))
  cur2["search"]["choose_margin"] = 2.0  # not the default: the stored run did not say so
  assert pipeline.config_difference(old, cur2) == (["search.choose_margin"], [])
  # a field only the stored config has (written by another cimjax) and a changed value refuse
  newer = json.loads(json.dumps(cur))
  newer["search"]["from_the_future"] = 1
  assert pipeline.config_difference(newer, cur) == (["search.from_the_future"], [])
  changed = json.loads(json.dumps(old))
  changed["search"]["budget"] += 1
  assert pipeline.config_difference(changed, cur) == (["search.budget"], ["search.choose_margin"])
  # a field that is not in the default config at all is never taken as added
  extra = json.loads(json.dumps(cur))
  extra["train"]["data"]["not_a_default_field"] = 3
  assert pipeline.config_difference(cur, extra) == (["train.data.not_a_default_field"], [])


def test_workdir_of_an_older_cimjax_resumes(tiny_run, repo_root):
  """A workdir whose config.json lacks a field added since (at its default) resumes: the
  finished stages are skipped, one line names the field, and config.json is left as it was."""
  wd, r = tiny_run
  path = wd / "config.json"
  kept = path.read_bytes()
  try:
    older = json.loads(kept)
    assert older["search"].pop("choose_margin") == pipeline.default_config().search.choose_margin
    path.write_text(json.dumps(older))
    lines = []
    again = pipeline.Pipeline(_tiny_config(repo_root), wd, log=lines.append).run()
    assert [s for s in lines if "predates" in s] == [
      f"{path} predates the fields search.choose_margin: the stages still to run use their defaults"
    ]
    assert sum("already finished" in s for s in lines) == 7
    assert _figures(again) == _figures(r)
    assert json.loads(path.read_text()) == older
  finally:
    path.write_bytes(kept)


def _run_cli(repo_root, *args, **kw):
  return subprocess.run(
    [sys.executable, "-m", "launch.run", *args], cwd=repo_root, capture_output=True, text=True, **kw
  )


def test_cli_errors_exit_2(repo_root, tmp_path):
  bad = tmp_path / "bad.npy"
  np.save(bad, np.full((3, 2), 8))
  cases = [
    (["--stages=fp32,nope"], "stages"),
    (["--hw=no_such_target"], "no_such_target"),
    ([f"--from_policy={bad}"], "3"),
    (["--from_policy=/nonexistent/p.npy"], "p.npy"),
    (["--budget=0"], "--budget"),
  ]
  for args, needle in cases:
    p = _run_cli(repo_root, f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *args, timeout=300)
    assert p.returncode == 2, (args, p.stderr[-2000:])
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("cimjax: error:") and needle in last, (args, last)
    assert not (tmp_path / "w").exists(), args  # checked before anything is written


@pytest.mark.slow  # default-suite time; kill -9 mid-stage: tests/test_checkpoint.py (default)
def test_kill_and_rerun_gives_the_same_report(tiny_run, repo_root, tmp_path):
  _, reference = tiny_run
  wd = tmp_path / "killed"
  args = [f"--config={TINY}", f"--workdir={wd}", "--config.train.throttle_s=0.05"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "launch.run", *args],
    cwd=repo_root,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  ckpt = wd / "anyprec" / "checkpoints"
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if ckpt.is_dir() and any(ckpt.iterdir()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (wd / "anyprec" / "result.json").exists()
  p = _run_cli(repo_root, *args, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads((wd / "report.json").read_text())
  assert _figures(report) == _figures(reference)


def test_choose_policy_takes_the_best_final_split_reward():
  """The search winner fails the target on the final split; the fastest candidate that meets
  it there is chosen instead; without a final re-evaluation the winner stays."""
  from cimjax import pipeline as pl

  win = np.full((5, 2), 2, np.int32)

  def cand(bits, acc, reward, speedup):
    return {
      "policy": np.full((5, 2), bits).tolist(),
      "accuracy": acc,
      "reward": reward,
      "feasible": acc >= 89.0,
      "speedup": speedup,
    }

  final = {
    "name": "val_final",
    "acc_target": 89.0,
    "candidates": [
      cand(2, 88.0, -10.0, 2.3),
      cand(3, 89.2, 120.0, 2.0),
      cand(4, 89.9, 90.0, 1.7),
      cand(5, 88.9, -1.0, 2.1),
    ],
  }
  pol, pick = pl.choose_policy(win, final)
  assert (pol == 3).all() and pick["rank_in_search"] == 1 and pick["feasible_on_final"]
  assert pick["search_winner_final_accuracy"] == 88.0 and pick["pool"] == 4
  pol, pick = pl.choose_policy(win, None)
  assert (pol == win).all() and pick == {"by": "search reward"}
  none_ok = dict(final, candidates=[final["candidates"][0], final["candidates"][3]])
  pol, pick = pl.choose_policy(win, none_ok)
  assert (pol == 5).all() and not pick["feasible_on_final"]  # closest to the target
