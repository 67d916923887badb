"""Multi-controller search: two local processes on loopback (jax.distributed, gloo) give the
same search as one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, nproc, port, agent = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if nproc > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                             initialization_timeout=120)
import numpy as np
from cimjax import cost, hw as hw_lib, models, trace
from cimjax import search
m = models.get_model("small_cnn")
specs = trace.trace_specs(m)
hw = hw_lib.load_hw("rram_64_c2")
tables = cost.cost_tables(specs, hw, xp=np)
src = search.SyntheticAccuracy(specs, seed=9, drop44=3.0)
if nproc > 1:
  src = search.MultiProcessAccuracy(src)
cfg = search.SearchConfig(agent=agent, budget=96, population=16, constraint="none", mode="loop",
                          seed=1)
res = search.run_search(m, specs, tables, src, cfg, hw=hw)
n = res.evals_used
print("RESULT " + json.dumps({
    "pid": pid, "processes": jax.process_count(), "best": res.best_policy.tolist(),
    "reward": res.best_reward, "evals": n, "policies": res.history.policies[:n].tolist(),
    "accuracy": res.history.accuracy[:n].tolist()}))
if nproc > 1:
  jax.distributed.shutdown()
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _result(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["random", "pg"])
def test_two_processes_equal_one(repo_root, tmp_path, agent):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=repo_root)

  def run(*a):
    return subprocess.Popen(
      [sys.executable, str(script), *map(str, a)],
      cwd=repo_root,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  procs = [run(0, 2, port, agent), run(1, 2, port, agent), run(0, 1, 0, agent)]
  r0, r1, single = (_result(p) for p in procs)
  assert r0["processes"] == r1["processes"] == 2 and single["processes"] == 1
  for r in (r0, r1):
    assert r["evals"] == single["evals"]
    assert r["policies"] == single["policies"]  # the same candidates in the same order
    assert r["accuracy"] == single["accuracy"]  # bit-exact all-gathered accuracies
    assert r["best"] == single["best"] and r["reward"] == single["reward"]


@pytest.mark.slow
def test_cli_two_processes(repo_root, tmp_path):
  """``launch.search`` with --num_processes=2 on loopback: one shared workdir, one report."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [
    sys.executable,
    "-m",
    "launch.search",
    f"--workdir={tmp_path}",
    "--accuracy=synthetic",
    "--hw=rram_64_c2",
    "--agent=pg",
    "--budget=64",
    "--population=16",
    "--noprogress",
    "--noplots",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
  ]
  procs = [
    subprocess.Popen(
      args + [f"--process_id={i}"],
      cwd=repo_root,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  rep0 = json.loads(outs[0][0].strip().splitlines()[-1])
  rep1 = json.loads(outs[1][0].strip().splitlines()[-1])
  assert rep0["evals_used"] <= 64 and rep1 == {"process": 1, "best_reward": rep0["best_reward"]}
  assert (tmp_path / "best_policy.npy").is_file() and (tmp_path / "report.json").is_file()
