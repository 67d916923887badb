"""``--help`` of every console script module and every ``launch/`` module: status 0, own flags.

Each ``python -m MODULE --help`` would import JAX afresh (about 2 s each), so the modules are run
as ``__main__`` (:func:`runpy.run_module`, as ``python -m`` does) in two worker processes. A
module whose help fails there is run again on its own, as ``python -m MODULE --help`` in a fresh
interpreter, and that run is the one judged.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_CLI = {
  "run": (
    "config",
    "workdir",
    "stages",
    "from_policy",
    "hw",
    "budget",
    "num_processes",
    "process_id",
    "coordinator_address",
    "distributed",
  ),
  "train": ("config", "workdir", "stage", "policy"),
  "search": ("workdir", "hw", "agent", "budget", "acc_drop", "constraint", "progress", "plots"),
  "compile": ("model", "workdir", "policy", "uniform", "hw", "adc_bits", "program", "json"),
  "cost": ("model", "hw", "policy", "uniform", "json"),
}
# module -> flags its help must list
FLAGS = {
  **{f"cimjax.cli.{m}": names for m, names in _CLI.items()},
  **{f"launch.{m}": names for m, names in _CLI.items()},
  "launch.bench_conv_grad": (
    "batch_size",
    "steps",
    "repeats",
    "compare_steps",
    "chunk",
    "parts",
    "out",
  ),
  "cimjax.cli.export": ("workdir", "model", "variables", "policy", "uniform", "out"),
  "launch.bench": ("workdir", "quick", "checkpoint", "only"),
  "launch.bench_eval": (
    "model",
    "dataset",
    "images",
    "n",
    "strategies",
    "chunk",
    "batch_size",
    "max_seconds",
    "quick",
    "out",
    "int_modes",
  ),
  "launch.bench_noise": ("variables", "workdir", "hw", "policy", "adc_bits", "variations", "out"),
  "launch.bench_search": (
    "config",
    "workdir",
    "part",
    "checkpoint",
    "agents",
    "seeds",
    "budgets",
    "targets",
    "models",
    "constraint",
    "acc_drop",
    "search_images",
    "exhaustive_limit",
    "synthetic_kind",
    "agent_max_budget",
    "quick",
    "lazy",
    "lazy_chunks",
  ),
  "launch.bench_xbar": ("out", "tokens", "batch", "repeats"),
  "launch.bench_data": ("folder", "images", "workers", "batch_size", "crop", "model", "out"),
  "launch.bench_gpu": ("out_dir", "dry", "budget", "max_seconds"),
  "launch.bench_planner": ("out", "tasks", "seeds", "budget", "planner", "compare", "quick"),
  "launch.bench_train": ("arch", "batch_size", "steps", "warmup", "repeats", "stages", "out"),
  "launch.profile_eval": ("dataset", "images", "n", "batch_size", "repeats", "out"),
  "launch.proxy_validity": (
    "config",
    "workdir",
    "num_policies",
    "finetune_epochs",
    "constraint",
    "seed",
    "out",
  ),
}

# Runs each module named in argv as __main__ with --help; prints {module: [status, stdout, err]}.
_WORKER = r"""
import contextlib, io, json, runpy, sys, traceback, warnings
warnings.simplefilter("ignore")
res = {}
for mod in sys.argv[1:]:
  out, err = io.StringIO(), io.StringIO()
  code = 0
  sys.argv = [mod, "--help"]
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      runpy.run_module(mod, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
      code = -1
      traceback.print_exc(file=err)
  res[mod] = [code, out.getvalue(), err.getvalue()[-2000:]]
print("\n@@RESULTS@@" + json.dumps(res))
"""


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _missing(module, stdout):
  """The flags of ``module`` that its help text does not list."""
  return [n for n in FLAGS[module] if not re.search(rf"--(\[no\])?{n}\b", stdout)]


def _ok(module, result):
  code, stdout, _ = result
  return code == 0 and not _missing(module, stdout)


def _alone(module):
  proc = subprocess.run(
    [sys.executable, "-m", module, "--help"],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  return [proc.returncode, proc.stdout, proc.stderr[-2000:]]


@pytest.fixture(scope="module")
def helps():
  """``{module: [status, stdout, stderr tail]}`` of ``--help`` for every module of FLAGS."""
  mods = sorted(FLAGS)
  groups = [mods[0::2], mods[1::2]]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, *g],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for g in groups
  ]
  res = {}
  for p in procs:
    out, _ = p.communicate(timeout=600)
    if "@@RESULTS@@" in out:
      res.update(json.loads(out.rsplit("@@RESULTS@@", 1)[1]))
  for m in mods:
    if m not in res or not _ok(m, res[m]):
      res[m] = _alone(m)  # judge a failure on a fresh interpreter
  return res


@pytest.mark.parametrize("module", sorted(FLAGS))
def test_help_lists_own_flags_and_exits_0(helps, module):
  code, stdout, stderr = helps[module]
  assert code == 0, f"python -m {module} --help: status {code}\n{stdout[-1000:]}\n{stderr}"
  assert not _missing(module, stdout), (_missing(module, stdout), stdout[-2000:])


def test_every_console_script_and_launch_module_is_covered():
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  for entry in scripts.values():
    assert entry.split(":")[0] in FLAGS, entry
  for path in sorted((ROOT / "launch").glob("*.py")):
    if 'if __name__ == "__main__"' in path.read_text():
      assert f"launch.{path.stem}" in FLAGS, path
