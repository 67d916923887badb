"""Comparison benchmark of the search agents at equal evaluation budgets.

Usage (from the repository root)::

  # Fashion-MNIST (needs a trained any-precision small CNN) + the latency-side synthetic tasks
  python -m launch.bench_search --workdir=/tmp/bench --checkpoint=/tmp/cnn_fashion/anyprec \
      --config=train/small_cnn_fashion.py
  python -m launch.bench_search --workdir=/tmp/bench --part=synthetic      # no model needed
  python -m launch.bench_search --workdir=/tmp/bench_quick --quick          # a few minutes

Tasks:

- ``fashion/<target>``: the small CNN on Fashion-MNIST, accuracy measured on the first
  ``--search_images`` images of the search-validation split (:class:`DataAccuracy`), the best
  policies re-evaluated on the test split. Where the space is small enough
  (``--exhaustive_limit``, e.g. both constraints at 4-bit cells: 2,744 policies) every policy
  is evaluated once first, giving the exact optimum, and the agents then read that table (the
  same numbers; only faster).
- ``synthetic/<model>/<target>``: ResNet-18, VGG-16, ViT-B/32 with the additive synthetic
  accuracy model (:class:`SyntheticAccuracy`), against the exact optimum of the Pareto DP.

Each agent runs once per seed with the largest budget; the result at a smaller budget is the
best among its first ``B`` evaluations, which is exactly what a run with budget ``B`` returns
(no agent's behaviour depends on its budget: iteration keys depend only on the iteration, and
the budget only truncates). Reported per task, agent and budget (medians over seeds): best
reward, speedup of the best policy and whether it meets the target, fraction of the best
known (or optimal) speedup, evaluations to reach 95 % of it, test accuracy (Fashion), wall
time; and the evaluations PG needs to match DDPG's 600-evaluation best reward.

Accuracy evaluations are memoised across runs and saved in ``WORKDIR`` (``memo_*.npz``), and
every run's history is saved under ``WORKDIR/runs``, so an interrupted benchmark resumes and
its wall times of later runs reflect memo hits: the report also gives the measured seconds per
evaluation and the estimated live wall time (agent time + evaluations x seconds each).
Output: a table on stdout and ``WORKDIR/bench_search.json``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from cimjax import cli as cli_lib
from cimjax.cli import UsageError

PROG = "launch.bench_search"
PARTS = ("fashion", "synthetic")
AGENTS = ("pg", "ddpg", "random")


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  fv = cli_lib.config_flag_values(
    argv, "Training config of the Fashion-MNIST model (default: cimjax.train.default_config())."
  )
  d = lambda *a, **k: flags.DEFINE_string(*a, flag_values=fv, **k)  # noqa: E731
  d("workdir", None, "Output directory (results, memo, run histories).")
  d("part", "fashion,synthetic", f"Comma-separated parts: {', '.join(PARTS)}.")
  d(
    "checkpoint",
    None,
    "Any-precision model directory (launch.train's WORKDIR/anyprec) for the Fashion-MNIST part.",
  )
  d("agents", "pg,ddpg,random", f"Comma-separated agents: {', '.join(AGENTS)}.")
  d("seeds", "0,1,2", "Comma-separated seeds.")
  d("budgets", "600,3000", "Comma-separated evaluation budgets.")
  d("targets", "rram_256_c4,rram_64_c2", "Comma-separated hardware targets.")
  d("models", "resnet18,vgg16,vit_b32", "Zoo models of the synthetic part.")
  d("constraint", "both", "Constraint variant: both, weight, io, none.")
  d("acc_drop", "0.5", "Allowed drop in percentage points.")
  d("search_images", "1000", "Images of the search split (Fashion).")
  d("exhaustive_limit", "5000", "Evaluate spaces up to this size exhaustively (Fashion).")
  d("synthetic_kind", "additive", "Synthetic accuracy model: additive, saturating, interaction.")
  d(
    "agent_max_budget",
    "",
    "Per-agent cap of the largest budget, e.g. 'ddpg=600' (DDPG's "
    "2 x layers updates an episode are slow on CPU for ViT-B/32); budgets above it are "
    "reported as not run.",
  )
  flags.DEFINE_bool(
    "quick",
    False,
    "Short run: seeds 0,1, budgets 100,300, ResNet-18 only, 300 search images.",
    flag_values=fv,
  )
  return fv


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into a fresh ``FlagValues``."""
  return cli_lib.parse_config_args(_define_flags(argv), argv)


parse_flags = cli_lib.usage_parser(parse_args, PROG)


def _list(fv: flags.FlagValues, name: str, allowed: Sequence[str] | None = None) -> list[str]:
  items = [x.strip() for x in (fv[name].value or "").split(",") if x.strip()]
  if not items:
    raise UsageError(f"--{name}: give at least one value")
  if allowed is not None:
    for x in items:
      if x not in allowed:
        raise UsageError(f"--{name}={fv[name].value}: allowed values are {', '.join(allowed)}")
  return items


def _ints(fv: flags.FlagValues, name: str, lo: int = 0) -> list[int]:
  out = []
  for x in _list(fv, name):
    try:
      v = int(x)
    except ValueError:
      v = lo - 1
    if v < lo:
      raise UsageError(f"--{name}={fv[name].value}: allowed values are integers >= {lo}")
    out.append(v)
  return out


# ----------------------------------------------------------------------------------------------
# Tasks and runs


@dataclasses.dataclass
class Task:
  """One search problem."""

  name: str
  model: Any
  specs: list
  tables: Any
  hw: Any
  space: Any
  accuracy: Any
  final: Any = None
  optimum: Any = None
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)


def _median(xs: Sequence[float]) -> float | None:
  xs = [x for x in xs if x is not None]
  return float(statistics.median(xs)) if xs else None


def run_one(
  task: Task, agent: str, seed: int, budget: int, acc_drop: float, rundir: Path, acc_ref: float
) -> dict[str, Any]:
  """One (agent, seed) search on a task at the largest budget; cached in ``rundir``."""
  import hashlib  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import search  # pylint: disable=g-import-not-at-top
  from cimjax.search import env as env_lib  # pylint: disable=g-import-not-at-top

  rundir.mkdir(parents=True, exist_ok=True)
  cfg = search.SearchConfig(
    agent=agent, budget=budget, acc_drop=acc_drop, constraint=task.space.constraint, seed=seed
  )
  # the agent's whole configuration keys the cached run, so a changed default is re-run
  key = {k: v for k, v in cfg.to_dict().items() if k not in ("pg", "ddpg") or k == agent}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
  stem = rundir / f"{agent}_s{seed}_b{budget}_{digest}"
  js, hz = stem.with_suffix(".json"), stem.with_suffix(".npz")
  if js.is_file() and hz.is_file():
    rec = json.loads(js.read_text())
    with np.load(hz, allow_pickle=False) as z:
      n = int(z["count"])
      hist = env_lib.History(
        policies=z["policies"],
        keys=np.zeros((n, 1), np.int32),
        accuracy=z["accuracy"],
        cost_ratio=z["cost_ratio"],
        reward=z["reward"],
        iteration=z["iteration"],
        count=np.asarray(n, np.int32),
      )
    return {**rec, "history": hist}
  t0 = time.perf_counter()
  res = search.run_search(
    task.model,
    task.specs,
    task.tables,
    task.accuracy,
    cfg,
    hw=task.hw,
    acc_ref=acc_ref,
    plots=False,
  )
  wall = time.perf_counter() - t0
  n = res.evals_used
  h = res.history
  from cimjax.search import accuracy as acc_lib  # pylint: disable=g-import-not-at-top

  save = acc_lib._save_npz  # pylint: disable=protected-access
  save(
    hz,
    policies=h.policies[:n],
    accuracy=h.accuracy[:n],
    cost_ratio=h.cost_ratio[:n],
    reward=h.reward[:n],
    iteration=h.iteration[:n],
    count=np.int64(n),
  )
  rec = {
    "agent": agent,
    "seed": seed,
    "budget": budget,
    "evals_used": n,
    "iterations": res.iterations,
    "wall_s": wall,
    "search_wall_s": res.wall_s,
    "eval_s": res.eval_s,
    "mode": res.mode,
    "acc_target": res.acc_target,
    "acc_ref": res.acc_ref,
  }
  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  ckpt_lib.write_json_atomic(js, rec)
  h_np = env_lib.History(*(np.asarray(x) for x in h))
  return {**rec, "history": h_np}


def analyse(
  task: Task,
  runs: list[dict[str, Any]],
  budgets: list[int],
  final_ref: float | None,
  acc_drop: float,
) -> dict[str, Any]:
  """Per-budget medians, fractions of the reference speedup, PG-vs-DDPG evaluations."""
  from cimjax.search import runner  # pylint: disable=g-import-not-at-top

  acc_target = runs[0]["acc_target"]
  best_known = max(
    (
      runner.best_within(r["history"], max(budgets), acc_target)["speedup"]
      for r in runs
      if runner.best_within(r["history"], max(budgets), acc_target)["feasible"]
    ),
    default=None,
  )
  ref = task.optimum.speedup if task.optimum is not None else best_known
  out: dict[str, Any] = {
    "task": task.name,
    "acc_ref": runs[0]["acc_ref"],
    "acc_target": acc_target,
    "reference_speedup": ref,
    "reference": "optimum" if task.optimum is not None else "best found",
    "space_size": float(task.space.size),
    **task.notes,
  }
  if task.optimum is not None:
    out["optimum"] = {
      "reward": task.optimum.reward,
      "speedup": task.optimum.speedup,
      "accuracy": task.optimum.accuracy,
      "policy": task.optimum.policy.tolist(),
    }
  per_agent: dict[str, Any] = {}
  for agent in sorted({r["agent"] for r in runs}):
    rs = [r for r in runs if r["agent"] == agent]
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
    for b in budgets:
      if any(b > r["budget"] for r in rs):
        entry[str(b)] = {"not_run": True}
        continue
      bests = [runner.best_within(r["history"], b, acc_target) for r in rs]
      fr = [(x["speedup"] / ref if (x["feasible"] and ref) else 0.0) for x in bests]
      e = {
        "reward": [x["reward"] for x in bests],
        "speedup": [x["speedup"] for x in bests],
        "feasible": [x["feasible"] for x in bests],
        "frac_ref_speedup": fr,
        "policy": [x["policy"] for x in bests],
        "evals": [x["evals"] for x in bests],
        "median_reward": _median([x["reward"] for x in bests]),
        "median_speedup": _median([x["speedup"] for x in bests if x["feasible"]]),
        "median_frac_ref_speedup": _median(fr),
      }
      if task.final is not None:
        import numpy as np  # pylint: disable=g-import-not-at-top

        pols = [x["policy"] for x in bests if x["policy"] is not None]
        accs = task.final(np.asarray(pols, np.int32)) if pols else []
        e["final_accuracy"] = [float(a) for a in accs]
        e["final_drop"] = [float(final_ref - a) for a in accs] if final_ref is not None else None
        e["final_feasible"] = (
          [bool(final_ref - a <= acc_drop + 1e-9) for a in accs] if final_ref is not None else None
        )
      entry[str(b)] = e
    if ref:
      entry["evals_to_95"] = [
        runner.evals_to_reach(r["history"], acc_target, speedup=0.95 * ref) for r in rs
      ]
      entry["evals_to_98"] = [
        runner.evals_to_reach(r["history"], acc_target, speedup=0.98 * ref) for r in rs
      ]
    entry["wall_s"] = [r["wall_s"] for r in rs]
    entry["eval_s"] = [r["eval_s"] for r in rs]
    entry["mode"] = [r["mode"] for r in rs]
    entry["evals_used"] = [r["evals_used"] for r in rs]
    entry["iterations"] = [r["iterations"] for r in rs]
    per_agent[agent] = entry
  out["agents"] = per_agent
  # PG vs DDPG: evaluations PG needs to reach DDPG's 600-evaluation best reward (per seed)
  if "pg" in per_agent and "ddpg" in per_agent and min(budgets) <= 600:
    b0 = 600 if 600 in budgets else min(budgets)
    pg_runs = {r["seed"]: r for r in runs if r["agent"] == "pg"}
    dd = {
      r["seed"]: runner.best_within(r["history"], b0, acc_target)["reward"]
      for r in runs
      if r["agent"] == "ddpg"
    }
    match = {
      s: runner.evals_to_reach(pg_runs[s]["history"], acc_target, reward=dd[s])
      for s in dd
      if s in pg_runs
    }
    med = _median(list(dd.values()))
    out["pg_evals_to_match_ddpg"] = {
      "ddpg_budget": b0,
      "per_seed": {str(k): v for k, v in match.items()},
      "ddpg_reward_per_seed": {str(k): v for k, v in dd.items()},
      "median": _median([v for v in match.values() if v is not None]),
      "unmatched": [k for k, v in match.items() if v is None],
      "vs_median_ddpg": _median(
        [runner.evals_to_reach(r["history"], acc_target, reward=med) for r in pg_runs.values()]
      )
      if med is not None
      else None,
    }
  # acceptance checks
  checks = {}
  if "pg" in per_agent and "ddpg" in per_agent:
    for b in budgets:
      p, d = per_agent["pg"][str(b)], per_agent["ddpg"][str(b)]
      if not p.get("not_run") and not d.get("not_run"):
        checks[f"pg_beats_ddpg_median_reward_{b}"] = p["median_reward"] > d["median_reward"]
        checks[f"pg_ge_ddpg_median_reward_{b}"] = p["median_reward"] >= d["median_reward"]
  if task.optimum is not None and "pg" in per_agent:
    for b in budgets:
      if not per_agent["pg"][str(b)].get("not_run"):
        checks[f"pg_frac_optimum_ge_0.98_{b}"] = (
          per_agent["pg"][str(b)]["median_frac_ref_speedup"] >= 0.98
        )
  out["checks"] = checks
  return out


# ----------------------------------------------------------------------------------------------
# Parts


def memo_tag(variables: Any, search_images: int) -> str:
  """Identity of the memoised accuracies: a digest of the weights and the split size."""
  import hashlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  for leaf in jax.tree.leaves(variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return f"sha256:{h.hexdigest()[:16]} val[:{search_images}]"


def fashion_tasks(
  fv: flags.FlagValues, s: dict[str, Any], workdir: Path, memo_path: Path
) -> tuple[list[Task], Any, Any, dict[str, Any]]:
  """The Fashion-MNIST tasks (one per target), with a shared memo of accuracies."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import (
    search,  # pylint: disable=g-import-not-at-top
    trace,  # pylint: disable=g-import-not-at-top
  )
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top
  from cimjax.search import baselines  # pylint: disable=g-import-not-at-top
  from cimjax.search import space as space_lib  # pylint: disable=g-import-not-at-top

  if not s["checkpoint"]:
    raise UsageError(
      "--checkpoint is required for --part=fashion (the any-precision small "
      "CNN, launch.train's WORKDIR/anyprec)"
    )
  config = fv.config if fv["config"].value is not None else train_lib.default_config()
  splits = train_lib.load_splits(config)
  model = train_lib.build_model(config, splits)
  try:
    variables = train_lib.load_variables(s["checkpoint"], model)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
      f"--checkpoint={s['checkpoint']}: cannot load ({str(e).splitlines()[0]})"
    ) from None
  n = min(s["search_images"], len(splits.val))
  live = search.DataAccuracy(
    model,
    variables,
    splits.val.images[:n],
    splits.val.labels[:n],
    batch_size=min(1000, n),
    name=f"val[:{n}]",
  )
  memo = search.MemoAccuracy(live)
  tag = memo_tag(variables, n)
  try:
    memo.load(memo_path, tag)
  except ValueError as e:
    raise UsageError(str(e)) from None
  test = search.MemoAccuracy(
    search.DataAccuracy(
      model, variables, splits.test.images, splits.test.labels, batch_size=1000, name="test"
    )
  )
  specs = trace.trace_specs(model)
  ref = space_lib.make_space(len(specs), "none").reference_policy()
  acc_ref = float(memo(ref[None])[0])
  test_ref = float(test(ref[None])[0])
  tasks = []
  for tname in s["targets"]:
    hw = hw_lib.load_hw(tname)
    tables = cost_lib.cost_tables(specs, hw, xp=np)
    space = space_lib.make_space(len(specs), s["constraint"], hw.cell_bits)
    source, optimum, notes = memo, None, {"search_images": n, "test_images": len(splits.test)}
    if space.size <= s["exhaustive_limit"]:
      t0 = time.perf_counter()

      def prog(done, total, tname=tname):
        if done % 512 < 256 or done == total:
          logging.info("exhaustive %s: %d/%d", tname, done, total)
          memo.save(memo_path, tag)

      table = search.exhaustive_table(memo, space, chunk=256, progress=prog)
      memo.save(memo_path, tag)
      source = search.TableAccuracy(space, table, name=f"exhaustive val[:{n}]")
      optimum = baselines.exhaustive_optimum(
        space, tables.latency_us, table, acc_ref - s["acc_drop"]
      )
      notes["exhaustive_s"] = time.perf_counter() - t0
      notes["exhaustive_evals"] = int(space.size)
    tasks.append(
      Task(
        name=f"fashion/{tname}/{s['constraint']}",
        model=model,
        specs=specs,
        tables=tables,
        hw=hw,
        space=space,
        accuracy=source,
        final=test,
        optimum=optimum,
        notes=notes,
      )
    )
  info = {
    "acc_ref_val": acc_ref,
    "acc_ref_test": test_ref,
    "search_images": n,
    "memo_tag": tag,
    "model": model.name,
    "layers": [x.name for x in specs],
  }
  return tasks, memo, test, info


def synthetic_tasks(s: dict[str, Any]) -> list[Task]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import (
    models,  # pylint: disable=g-import-not-at-top
    search,  # pylint: disable=g-import-not-at-top
    trace,  # pylint: disable=g-import-not-at-top
  )

  tasks = []
  for mname in s["models"]:
    try:
      model = models.get_model(mname)
    except ValueError as e:
      raise UsageError(f"--models: {e}") from None
    specs = trace.trace_specs(model)
    src = search.SyntheticAccuracy(specs, kind=s["synthetic_kind"], seed=0)
    for tname in s["targets"]:
      hw = hw_lib.load_hw(tname)
      tables = cost_lib.cost_tables(specs, hw, xp=np)
      space = search.make_space(len(specs), s["constraint"], hw.cell_bits)
      opt = None
      if src.separable:
        opt = search.dp_optimum(
          space, tables.latency_us, src.damage, src.acc_of_damage, src.acc8 - s["acc_drop"]
        )
      tasks.append(
        Task(
          name=f"synthetic/{mname}/{tname}/{s['constraint']}",
          model=model,
          specs=specs,
          tables=tables,
          hw=hw,
          space=space,
          accuracy=src,
          optimum=opt,
          notes={"synthetic": src.describe()},
        )
      )
  return tasks


def format_table(results: list[dict[str, Any]], budgets: list[int]) -> str:
  lines = []
  hdr = (
    f"{'task':38s} {'agent':6s} {'budget':>6s} {'reward':>9s} {'speedup':>8s} "
    f"{'%ref':>6s} {'feas':>5s} {'ev95':>6s} {'test_drop':>9s} {'wall_s':>7s}"
  )
  lines.append(hdr)
  lines.append("-" * len(hdr))
  for t in results:
    for agent, e in t["agents"].items():
      for b in budgets:
        x = e[str(b)]
        if x.get("not_run"):
          lines.append(f"{t['task'][:38]:38s} {agent:6s} {b:6d}  (not run)")
          continue
        td = x.get("final_drop")
        frac = x["median_frac_ref_speedup"]
        lines.append(
          f"{t['task'][:38]:38s} {agent:6s} {b:6d} "
          f"{_f(x['median_reward'], 9, 2)} {_f(x['median_speedup'], 8, 3)} "
          f"{_f(100 * frac if frac is not None else None, 6, 1)} "
          f"{sum(x['feasible']):2d}/{len(x['feasible']):<2d} "
          f"{_f(_median(e.get('evals_to_95', [])), 6, 0)} "
          f"{_f(_median(td) if td else None, 9, 2)} {_f(_median(e['wall_s']), 7, 1)}"
        )
    m = t.get("pg_evals_to_match_ddpg")
    if m:
      lines.append(
        f"{'':38s} PG evaluations to match DDPG@{m['ddpg_budget']}: per seed "
        f"{m['per_seed']} (median {m['median']})"
      )
    if t.get("optimum"):
      lines.append(
        f"{'':38s} optimum: reward {t['optimum']['reward']:.2f}, speedup "
        f"{t['optimum']['speedup']:.3f}x"
      )
  return "\n".join(lines)


def _f(x: float | None, w: int, p: int) -> str:
  return f"{'-':>{w}s}" if x is None else f"{x:{w}.{p}f}"


def run_from_flags(fv: flags.FlagValues) -> dict[str, Any]:
  s: dict[str, Any] = {}
  s["parts"] = _list(fv, "part", PARTS)
  s["agents"] = _list(fv, "agents", AGENTS)
  s["seeds"] = _ints(fv, "seeds")
  s["budgets"] = sorted(set(_ints(fv, "budgets", 1)))
  s["targets"] = _list(fv, "targets")
  s["models"] = _list(fv, "models")
  s["constraint"] = _list(fv, "constraint", ("both", "weight", "io", "none"))[0]
  try:
    s["acc_drop"] = float(fv["acc_drop"].value)
  except ValueError:
    raise UsageError(
      f"--acc_drop={fv['acc_drop'].value}: allowed values are numbers >= 0"
    ) from None
  s["search_images"] = _ints(fv, "search_images", 1)[0]
  s["exhaustive_limit"] = _ints(fv, "exhaustive_limit")[0]
  s["synthetic_kind"] = _list(fv, "synthetic_kind", ("additive", "saturating", "interaction"))[0]
  s["checkpoint"] = fv["checkpoint"].value
  caps = {}
  for item in [x for x in (fv["agent_max_budget"].value or "").split(",") if x.strip()]:
    name, _, val = item.partition("=")
    if name.strip() not in AGENTS or not val.strip().isdigit():
      raise UsageError(
        f"--agent_max_budget={fv['agent_max_budget'].value}: allowed values "
        f"are AGENT=N pairs, agents {', '.join(AGENTS)}"
      )
    caps[name.strip()] = int(val)
  s["agent_max_budget"] = caps
  if fv["quick"].value:
    if not fv["seeds"].present:
      s["seeds"] = [0, 1]
    if not fv["budgets"].present:
      s["budgets"] = [100, 300]
    if not fv["models"].present:
      s["models"] = ["resnet18"]
    if not fv["search_images"].present:
      s["search_images"] = 300
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top

  for t in s["targets"]:
    try:
      hw_lib.load_hw(t)
    except hw_lib.HwError as e:
      raise UsageError(f"--targets: {str(e).splitlines()[0]}") from None
  workdir = Path(fv["workdir"].value)
  workdir.mkdir(parents=True, exist_ok=True)
  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  tasks: list[Task] = []
  info: dict[str, Any] = {}
  memo = test = None
  memo_path = workdir / "memo_val.npz"
  if "fashion" in s["parts"]:
    ft, memo, test, info["fashion"] = fashion_tasks(fv, s, workdir, memo_path)
    tasks += ft
  if "synthetic" in s["parts"]:
    tasks += synthetic_tasks(s)
  top = max(s["budgets"])
  results = []
  for task in tasks:
    rundir = workdir / "runs" / task.name.replace("/", "_")
    runs = []
    acc_ref = (
      info.get("fashion", {}).get("acc_ref_val") if task.name.startswith("fashion") else None
    )
    if acc_ref is None:
      acc_ref = float(task.accuracy(task.space.reference_policy()[None])[0])
    for agent in s["agents"]:
      for seed in s["seeds"]:
        top_a = min(top, s["agent_max_budget"].get(agent, top))
        logging.info("%s: %s seed %d (budget %d)", task.name, agent, seed, top_a)
        r = run_one(task, agent, seed, top_a, s["acc_drop"], rundir, acc_ref)
        runs.append(r)
        if memo is not None:
          memo.save(memo_path, info["fashion"]["memo_tag"])
        print(
          f"{task.name} {agent} seed {seed}: best reward "
          f"{float(max(r['history'].reward[: int(r['history'].count)])):.3f} "
          f"({r['evals_used']} evaluations, {r['wall_s']:.1f} s)",
          flush=True,
        )
    final_ref = info.get("fashion", {}).get("acc_ref_test") if task.final is not None else None
    res = analyse(task, runs, s["budgets"], final_ref, s["acc_drop"])
    res["acc_drop"] = s["acc_drop"]
    results.append(res)
    ckpt_lib.write_json_atomic(
      workdir / "bench_search.json",
      {"settings": s, "info": info, "tasks": results, "partial": True},
    )
  if memo is not None:
    live = memo.inner
    info["fashion"]["seconds_per_evaluation"] = (
      live.seconds / live.evaluated if live.evaluated else None
    )
    info["fashion"]["evaluations_computed"] = live.evaluated
    for t in results:
      if t["task"].startswith("fashion") and info["fashion"]["seconds_per_evaluation"]:
        per = info["fashion"]["seconds_per_evaluation"]
        for e in t["agents"].values():
          # agent time plus every evaluation computed live (no memo, no table)
          e["est_live_wall_s"] = [
            (w - ev if m == "loop" else w) + n * per
            for w, ev, m, n in zip(e["wall_s"], e["eval_s"], e["mode"], e["evals_used"])
          ]
  out = {"settings": s, "info": info, "tasks": results, "wall_s": time.perf_counter() - t_start}
  ckpt_lib.write_json_atomic(workdir / "bench_search.json", out)
  print(format_table(results, s["budgets"]))
  return out


def main(argv: Sequence[str] | flags.FlagValues) -> int:
  try:
    fv = argv if isinstance(argv, flags.FlagValues) else parse_args(argv)
    run_from_flags(fv)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  return 0


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
