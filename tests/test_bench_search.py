"""The search benchmark's run cache: keyed by the run's own agent configuration."""

import dataclasses
import functools

import numpy as np
import pytest

from cimjax import search
from cimjax.search import pg as pg_lib
from cimjax.search import runner
from launch import bench_search as bs


def _task():
  s = {
    "models": ["small_cnn"],
    "targets": ["rram_64_c2"],
    "constraint": "both",
    "synthetic_kind": "additive",
    "acc_drop": 0.5,
  }
  (task,) = bs.synthetic_tasks(s)
  return task


def _files(d):
  return sorted(p.name for p in d.rglob("*") if p.is_file())


@pytest.mark.slow  # default-suite time
def test_run_cache_reuses_a_run_and_reruns_when_the_agent_config_changes(tmp_path, monkeypatch):
  task = _task()
  acc_ref = task.accuracy.acc8
  first = bs.run_one(task, "random", 0, 48, 0.5, tmp_path, acc_ref)
  pg1 = bs.run_one(task, "pg", 0, 48, 0.5, tmp_path, acc_ref)
  assert len(_files(tmp_path)) == 4  # .json + .npz a run
  assert pg1["evals_used"] == 48 and first["evals_used"] == 48
  # the same runs again: read back, not re-run (same wall time, same history, no new file)
  again = bs.run_one(task, "random", 0, 48, 0.5, tmp_path, acc_ref)
  assert again["wall_s"] == first["wall_s"]
  n = first["evals_used"]
  np.testing.assert_array_equal(again["history"].policies[:n], first["history"].policies[:n])
  np.testing.assert_array_equal(again["history"].reward[:n], first["history"].reward[:n])
  assert len(_files(tmp_path)) == 4
  # a changed PG default: PG's cached run is stale and re-run; random's key does not hold PG's
  # configuration, so its run is still reused
  changed = dataclasses.replace(pg_lib.PGConfig(), entropy_coef=0.05)
  monkeypatch.setattr(search, "SearchConfig", functools.partial(runner.SearchConfig, pg=changed))
  pg2 = bs.run_one(task, "pg", 0, 48, 0.5, tmp_path, acc_ref)
  assert pg2["wall_s"] != pg1["wall_s"]
  assert len(_files(tmp_path)) == 6
  assert bs.run_one(task, "random", 0, 48, 0.5, tmp_path, acc_ref)["wall_s"] == first["wall_s"]
  assert len(_files(tmp_path)) == 6
