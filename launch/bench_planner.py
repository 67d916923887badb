"""Speed benchmark of the PG agent's planner on the synthetic tasks, against the exact optimum.

Usage (from the repository root)::

  python -m launch.bench_planner --out=/tmp/bench_planner.json              # six tasks, 3 seeds
  python -m launch.bench_planner --out=/tmp/bench_planner.json --quick      # about a minute
  # the same runs with the full-front planner (the reference; ViT-B/32 rram_64_c2 takes an hour)
  python -m launch.bench_planner --out=/tmp/ref.json --planner=full --tasks=resnet18/rram_64_c2
  python -m launch.bench_planner --out=/tmp/new.json --tasks=resnet18/rram_64_c2 \
      --compare=/tmp/ref.json

Each task is a zoo model on a hardware target with the additive synthetic accuracy model
(:class:`~cimjax.search.accuracy.SyntheticAccuracy`, seed 0, INT8 at 90 %, 0.5 points allowed
drop, both constraints), as in ``launch.bench_search --part=synthetic``; its exact optimum comes
from :func:`~cimjax.search.baselines.dp_optimum`. Every (task, seed) runs PG (default
configuration, planner on) with the given budget and reports the wall time of the search (JIT
compilation included), the best feasible speedup and its fraction of the optimum's, the load
average around the run, and a SHA-256 digest of the evaluated candidates in order: two runs
with the same digest made the same search. ``--planner=full`` plans on the full Pareto front
(:func:`~cimjax.search.planner.model_front`, the reference the pruned DP of
:mod:`cimjax.search.pareto` must reproduce); ``--compare`` reads an earlier output and prints,
for each run in both, whether the searches are identical and the ratio of their wall times.

Output: one line per run, a summary table, and the JSON file ``--out``. Bad input prints one
line ``launch.bench_planner: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

from cimjax import cli as cli_lib
from cimjax.errors import UsageError

PROG = "launch.bench_planner"
MODELS = ("resnet18", "vgg16", "vit_b32")
TARGETS = ("rram_256_c4", "rram_64_c2")
HEADLINE = "vit_b32/rram_64_c2"
TASKS = (HEADLINE,) + tuple(f"{m}/{t}" for m in MODELS for t in TARGETS if f"{m}/{t}" != HEADLINE)
QUICK = {"tasks": ["resnet18/rram_64_c2", HEADLINE], "seeds": [0], "budget": 320}
ACC_DROP = 0.5

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_string("out", None, "Output JSON file (required).", flag_values=FLAGS)
flags.DEFINE_list(
  "tasks", ",".join(TASKS), f"MODEL/TARGET pairs; models {', '.join(MODELS)}.", flag_values=FLAGS
)
flags.DEFINE_list("seeds", "0,1,2", "Seeds (integers >= 0).", flag_values=FLAGS)
flags.DEFINE_integer(
  "budget", 3000, "Evaluation budget of every run.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_enum(
  "planner",
  "pruned",
  ("pruned", "full"),
  "The planner's DP: the pruned front (default) or the full front (the reference).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "compare", None, "An earlier output JSON to compare the runs with.", flag_values=FLAGS
)
flags.DEFINE_bool(
  "quick",
  False,
  f"Short run: tasks {', '.join(QUICK['tasks'])}, seed 0, budget {QUICK['budget']}.",
  flag_values=FLAGS,
)

flags.register_validator(
  "seeds",
  lambda v: bool(v) and all(x.isdigit() for x in v),
  "allowed values are integers >= 0 (at least one)",
  flag_values=FLAGS,
)
flags.register_validator(
  "tasks",
  lambda v: bool(v) and all(_task_ok(x) for x in v),
  f"allowed values are MODEL/TARGET with MODEL one of {', '.join(MODELS)} (at least one)",
  flag_values=FLAGS,
)


def _task_ok(name: str) -> bool:
  model, _, target = name.partition("/")
  return model in MODELS and bool(target)


def settings_from_flags() -> dict[str, Any]:
  """The benchmark settings of the parsed flags (``--quick`` applied), as saved in the JSON.

  Raises:
    UsageError: a missing ``--out``, a target that does not load, or a ``--compare`` file
      that does not read.
  """
  if FLAGS.out is None:
    raise UsageError("--out is required")
  s: dict[str, Any] = {
    "tasks": list(FLAGS.tasks),
    "seeds": [int(x) for x in FLAGS.seeds],
    "budget": FLAGS.budget,
    "planner": FLAGS.planner,
    "acc_drop": ACC_DROP,
    "constraint": "both",
  }
  if FLAGS.quick:
    for name, value in QUICK.items():
      if not FLAGS[name].present:
        s[name] = value
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top

  for t in {x.partition("/")[2] for x in s["tasks"]}:
    try:
      hw_lib.load_hw(t)
    except hw_lib.HwError as e:
      raise UsageError(f"--tasks: {cli_lib.one_line(e)}") from None
  s["compare"] = load_runs(FLAGS.compare) if FLAGS.compare else None
  return s


def load_runs(path: str) -> list[dict[str, Any]]:
  """The runs of an earlier output (``--compare``).

  Raises:
    UsageError: the file does not read or is not an output of this benchmark.
  """
  try:
    runs = json.loads(Path(path).read_text())["runs"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f"--compare: {path}: not a {PROG} output ({cli_lib.one_line(e)})") from None
  return list(runs)


# ----------------------------------------------------------------------------------------------
# Tasks and runs


@contextlib.contextmanager
def full_front_planner(enabled: bool) -> Iterator[None]:
  """While active (and ``enabled``), the PG agent's planner plans on the full Pareto front.

  :func:`~cimjax.search.planner.plan_candidates` binds ``plan_policies`` when it is traced,
  so an agent built and run inside the block uses the reference DP.
  """
  from cimjax.search import planner  # pylint: disable=g-import-not-at-top

  if not enabled:
    yield
    return
  original = planner.plan_policies
  planner.plan_policies = functools.partial(original, pruned=False)
  try:
    yield
  finally:
    planner.plan_policies = original


def make_task(name: str) -> dict[str, Any]:
  """One synthetic task: model, geometry, cost tables, space, accuracy source, exact optimum.

  Args:
    name: ``MODEL/TARGET``.

  Returns:
    A dict with ``model, specs, hw, tables, space, accuracy, optimum, optimum_s``.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import models, search, trace  # pylint: disable=g-import-not-at-top

  mname, _, tname = name.partition("/")
  model = models.get_model(mname)
  specs = trace.trace_specs(model)
  src = search.SyntheticAccuracy(specs, kind="additive", seed=0)
  hw = hw_lib.load_hw(tname)
  tables = cost_lib.cost_tables(specs, hw, xp=np)
  space = search.make_space(len(specs), "both", hw.cell_bits)
  t0 = time.perf_counter()
  opt = search.dp_optimum(
    space, tables.latency_us, src.damage, src.acc_of_damage, src.acc8 - ACC_DROP
  )
  return {
    "model": model,
    "specs": specs,
    "hw": hw,
    "tables": tables,
    "space": space,
    "accuracy": src,
    "optimum": opt,
    "optimum_s": time.perf_counter() - t0,
  }


def history_digest(policies: Any) -> str:
  """SHA-256 (hex, 16 digits) of the evaluated candidates ``[n, L, 2]`` in order."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  return hashlib.sha256(np.ascontiguousarray(policies, np.int8).tobytes()).hexdigest()[:16]


def run_one(task: dict[str, Any], seed: int, budget: int, full: bool) -> dict[str, Any]:
  """One PG search of a task; its wall time, best feasible speedup and fraction of the optimum.

  Args:
    task: :func:`make_task`.
    seed: the run's seed.
    budget: evaluations.
    full: plan on the full Pareto front (the reference).

  Returns:
    The run's record (JSON-ready).
  """
  from cimjax import search  # pylint: disable=g-import-not-at-top
  from cimjax.search import runner  # pylint: disable=g-import-not-at-top

  src, opt = task["accuracy"], task["optimum"]
  acc_ref = float(src(task["space"].reference_policy()[None])[0])
  cfg = search.SearchConfig(
    agent="pg", budget=budget, acc_drop=ACC_DROP, constraint="both", seed=seed
  )
  load0 = os.getloadavg()[0]
  t0 = time.perf_counter()
  with full_front_planner(full):
    res = search.run_search(
      task["model"],
      task["specs"],
      task["tables"],
      src,
      cfg,
      hw=task["hw"],
      acc_ref=acc_ref,
      plots=False,
    )
  wall = time.perf_counter() - t0
  n = res.evals_used
  best = runner.best_within(res.history, n, res.acc_target)
  frac = best["speedup"] / opt.speedup if best["feasible"] else 0.0
  return {
    "seed": seed,
    "budget": budget,
    "planner": "full" if full else "pruned",
    "wall_s": wall,
    "iterations": res.iterations,
    "evals_used": n,
    "best_speedup": best["speedup"],
    "feasible": best["feasible"],
    "frac_optimum": frac,
    "load_before": load0,
    "load_after": os.getloadavg()[0],
    "history_sha256": history_digest(res.history.policies[:n]),
  }


def compare(runs: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """For each run also in ``earlier`` (same task, seed, budget): same search? wall-time ratio."""
  index = {(r["task"], r["seed"], r["budget"]): r for r in earlier}
  out = []
  for r in runs:
    e = index.get((r["task"], r["seed"], r["budget"]))
    if e is not None:
      out.append(
        {
          "task": r["task"],
          "seed": r["seed"],
          "budget": r["budget"],
          "identical": r["history_sha256"] == e["history_sha256"],
          "planners": [e["planner"], r["planner"]],
          "wall_s": [e["wall_s"], r["wall_s"]],
          "speedup_x": e["wall_s"] / r["wall_s"] if r["wall_s"] else None,
          "frac_optimum": [e["frac_optimum"], r["frac_optimum"]],
        }
      )
  return out


def summarise(runs: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
  """Per task: wall time (median, max) and fraction of the optimum (min, median)."""
  rows = []
  for t in tasks:
    rs = [r for r in runs if r["task"] == t]
    if rs:
      fr = [r["frac_optimum"] for r in rs]
      wall = [r["wall_s"] for r in rs]
      rows.append(
        {
          "task": t,
          "runs": len(rs),
          "median_wall_s": statistics.median(wall),
          "max_wall_s": max(wall),
          "min_frac_optimum": min(fr),
          "median_frac_optimum": statistics.median(fr),
          "optimum_speedup": rs[0]["optimum_speedup"],
        }
      )
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  """The summary as a plain-text table."""
  lines = [
    f"{'task':24s} {'runs':>4s} {'optimum':>8s} {'min frac':>9s} {'med frac':>9s} "
    f"{'med wall s':>10s} {'max wall s':>10s}"
  ]
  for r in rows:
    lines.append(
      f"{r['task']:24s} {r['runs']:4d} {r['optimum_speedup']:8.4f} "
      f"{100 * r['min_frac_optimum']:8.3f}% {100 * r['median_frac_optimum']:8.3f}% "
      f"{r['median_wall_s']:10.1f} {r['max_wall_s']:10.1f}"
    )
  return "\n".join(lines)


def run_benchmark(s: dict[str, Any], out: Path) -> dict[str, Any]:
  """Runs the benchmark of settings ``s``; prints, writes ``out`` after every run, returns."""
  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in s.items() if k != "compare"}
  runs: list[dict[str, Any]] = []
  tasks_info: dict[str, Any] = {}
  result: dict[str, Any] = {}
  for name in s["tasks"]:
    task = make_task(name)
    opt = task["optimum"]
    tasks_info[name] = {
      "num_layers": task["space"].num_layers,
      "space_size": float(task["space"].size),
      "optimum_speedup": opt.speedup,
      "optimum_s": task["optimum_s"],
    }
    for seed in s["seeds"]:
      r = {"task": name, **run_one(task, seed, s["budget"], s["planner"] == "full")}
      r["optimum_speedup"] = opt.speedup
      runs.append(r)
      print(
        f"{name} seed {seed} ({r['planner']}): {r['wall_s']:.1f} s, "
        f"{r['iterations']} iterations, {r['evals_used']} evaluations, best speedup "
        f"{r['best_speedup']:.5f} = {100 * r['frac_optimum']:.3f}% of the optimum "
        f"{opt.speedup:.5f} (load {r['load_before']:.1f} -> {r['load_after']:.1f}; "
        f"history {r['history_sha256']})",
        flush=True,
      )
      result = {
        "settings": settings,
        "tasks": tasks_info,
        "runs": runs,
        "summary": summarise(runs, s["tasks"]),
      }
      if s["compare"] is not None:
        result["compare"] = compare(runs, s["compare"])
      ckpt_lib.write_json_atomic(out, result)
  print(format_table(result["summary"]))
  for c in result.get("compare", []):
    print(
      f"compare {c['task']} seed {c['seed']}: {'identical' if c['identical'] else 'DIFFERENT'}"
      f" searches; wall {c['wall_s'][0]:.1f} s ({c['planners'][0]}) -> {c['wall_s'][1]:.1f} s "
      f"({c['planners'][1]}), x{c['speedup_x']:.1f}"
    )
  return result


def main(argv: Sequence[str]) -> None:
  """absl entry point."""

  def body() -> None:
    cli_lib.no_positional(argv)
    run_benchmark(settings_from_flags(), Path(FLAGS.out))

  raise SystemExit(cli_lib.run_main(PROG, body))


def run() -> None:
  """Entry point of ``python -m launch.bench_planner``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
