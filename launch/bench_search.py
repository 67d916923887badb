"""Comparison benchmark of the search agents at equal evaluation budgets.

Usage (from the repository root)::

  # Fashion-MNIST (needs a trained any-precision small CNN) + the latency-side synthetic tasks
  python -m launch.bench_search --workdir=/tmp/bench --checkpoint=/tmp/cnn_fashion/anyprec \
      --config=train/small_cnn_fashion.py
  python -m launch.bench_search --workdir=/tmp/bench --part=synthetic      # no model needed
  python -m launch.bench_search --workdir=/tmp/bench_quick --quick          # a few minutes
  # lazy evaluation against full evaluation (Fashion-MNIST, live accuracies)
  python -m launch.bench_search --workdir=/tmp/bench_lazy --part=fashion --lazy \
      --checkpoint=runs/default/anyprec --config=cimjax/configs/default_run.py \
      --targets=rram_64_c2 --agents=pg --seeds=0,1,2,3,4 --budgets=300 --lazy_chunks=50,250

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
Output: a table on stdout and ``WORKDIR/bench_search.json``. The acceptance checks (PG's
median reward against DDPG's at each budget, PG's fraction of the optimum) are columns of that
output (``checks`` of each task), computed here from the analysis, not by the library.

``--lazy``: instead of the agent comparison, the Fashion-MNIST part compares lazy candidate
evaluation (:mod:`cimjax.search.lazy`) with full evaluation at equal budgets (the largest of
``--budgets``) and seeds: each agent and seed runs once with ``lazy`` off and once per chunk
size of ``--lazy_chunks`` (error rate ``--lazy_alpha``), every accuracy computed live (no memo,
no table, so wall times compare). Reported per task, agent and setting: image-forward passes
(candidates x images scored: deterministic, the main figure), their reduction against lazy
off, wall time, medians of the best reward, of its speedup and of the best policy's
test-split accuracy, and on how many seeds the best policy equals lazy off's. Output: a table
and ``lazy_comparison`` in ``WORKDIR/bench_search.json``.

Bad input (flags, targets, checkpoint; any :class:`cimjax.errors.CimjaxError`) prints one line
``launch.bench_search: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from cimjax import cli as cli_lib
from cimjax.errors import CimjaxError, UsageError

PROG = "launch.bench_search"
PARTS = ("fashion", "synthetic")
AGENTS = ("pg", "ddpg", "random")
CONSTRAINTS = ("both", "weight", "io", "none")
SYNTHETIC_KINDS = ("additive", "saturating", "interaction")

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
config_flags.DEFINE_config_file(
  "config",
  None,
  "Training config of the Fashion-MNIST model (default: cimjax.train.default_config()).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "workdir", None, "Output directory (results, memo, run histories).", flag_values=FLAGS
)
flags.DEFINE_list("part", "fashion,synthetic", f"Parts: {', '.join(PARTS)}.", flag_values=FLAGS)
flags.DEFINE_string(
  "checkpoint",
  None,
  "Any-precision model directory (launch.train's WORKDIR/anyprec) for the Fashion-MNIST part.",
  flag_values=FLAGS,
)
flags.DEFINE_list("agents", "pg,ddpg,random", f"Agents: {', '.join(AGENTS)}.", flag_values=FLAGS)
flags.DEFINE_list("seeds", "0,1,2", "Seeds (integers >= 0).", flag_values=FLAGS)
flags.DEFINE_list("budgets", "600,3000", "Evaluation budgets (integers >= 1).", flag_values=FLAGS)
flags.DEFINE_list(
  "targets", "rram_256_c4,rram_64_c2", "Hardware targets (names or .toml paths).", flag_values=FLAGS
)
flags.DEFINE_list(
  "models", "resnet18,vgg16,vit_b32", "Zoo models of the synthetic part.", flag_values=FLAGS
)
flags.DEFINE_enum("constraint", "both", CONSTRAINTS, "Constraint variant.", flag_values=FLAGS)
flags.DEFINE_float("acc_drop", 0.5, "Allowed drop in percentage points.", flag_values=FLAGS)
flags.DEFINE_integer(
  "search_images", 1000, "Images of the search split (Fashion).", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
  "exhaustive_limit",
  5000,
  "Evaluate spaces up to this size exhaustively (Fashion).",
  lower_bound=0,
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "synthetic_kind", "additive", SYNTHETIC_KINDS, "Synthetic accuracy model.", flag_values=FLAGS
)
flags.DEFINE_list(
  "agent_max_budget",
  "",
  "Per-agent cap of the largest budget, e.g. 'ddpg=600' (DDPG's 2 x layers updates an episode "
  "are slow on CPU for ViT-B/32); budgets above it are reported as not run.",
  flag_values=FLAGS,
)
flags.DEFINE_bool(
  "quick",
  False,
  "Short run: seeds 0,1, budgets 100,300, ResNet-18 only, 300 search images.",
  flag_values=FLAGS,
)


flags.DEFINE_bool(
  "lazy",
  False,
  "Compare lazy candidate evaluation with full evaluation on the Fashion part (see above).",
  flag_values=FLAGS,
)
flags.DEFINE_list(
  "lazy_chunks", "250", "Chunk sizes (images) of the --lazy comparison.", flag_values=FLAGS
)
flags.DEFINE_float(
  "lazy_alpha", 1e-3, "Error rate of lazy evaluation's sequential test.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "lazy_top_k",
  5,
  "final_top_k of the --lazy runs (candidates kept exact for the re-evaluation; the run "
  "config's default is 64).",
  lower_bound=1,
  flag_values=FLAGS,
)


def _is_int(x: str, lo: int) -> bool:
  return x.isdigit() and int(x) >= lo


def _is_cap(x: str) -> bool:
  name, _, val = x.partition("=")
  return name.strip() in AGENTS and val.strip().isdigit()


def _validate(
  name: str, item_ok: Callable[[str], bool], allowed: str, *, empty_ok: bool = False
) -> None:
  """Registers a parse-time check of the list flag ``name``: every item ok, and not empty."""
  flags.register_validator(
    name,
    lambda v: (empty_ok or bool(v)) and all(item_ok(x) for x in v),
    f"allowed values are {allowed}" + ("" if empty_ok else " (at least one)"),
    flag_values=FLAGS,
  )


_validate("part", lambda x: x in PARTS, ", ".join(PARTS))
_validate("agents", lambda x: x in AGENTS, ", ".join(AGENTS))
_validate("seeds", lambda x: _is_int(x, 0), "integers >= 0")
_validate("budgets", lambda x: _is_int(x, 1), "integers >= 1")
_validate("targets", bool, "hardware targets")
_validate("models", bool, "zoo models")
_validate("agent_max_budget", _is_cap, f"AGENT=N pairs, agents {', '.join(AGENTS)}", empty_ok=True)
_validate("lazy_chunks", lambda x: _is_int(x, 1), "integers >= 1")
flags.register_validator(
  "lazy_alpha", lambda v: 0.0 < v < 1.0, "allowed values are numbers in (0, 1)", flag_values=FLAGS
)


def settings_from_flags() -> dict[str, Any]:
  """The benchmark settings of the parsed flags (``--quick`` applied), as saved in the JSON.

  Raises:
    UsageError: a missing ``--workdir`` or a hardware target that does not load.
  """
  if FLAGS.workdir is None:
    raise UsageError("--workdir is required")
  s: dict[str, Any] = {
    "parts": list(FLAGS.part),
    "agents": list(FLAGS.agents),
    "seeds": [int(x) for x in FLAGS.seeds],
    "budgets": sorted({int(x) for x in FLAGS.budgets}),
    "targets": list(FLAGS.targets),
    "models": list(FLAGS.models),
    "constraint": FLAGS.constraint,
    "acc_drop": FLAGS.acc_drop,
    "search_images": FLAGS.search_images,
    "exhaustive_limit": FLAGS.exhaustive_limit,
    "synthetic_kind": FLAGS.synthetic_kind,
    "checkpoint": FLAGS.checkpoint,
    "lazy": FLAGS.lazy,
    "lazy_chunks": [int(x) for x in FLAGS.lazy_chunks],
    "lazy_alpha": FLAGS.lazy_alpha,
    "lazy_top_k": FLAGS.lazy_top_k,
  }
  if FLAGS.lazy:
    if "fashion" not in s["parts"]:
      raise UsageError("--lazy compares on the Fashion-MNIST part: add fashion to --part")
    s["parts"] = ["fashion"]
    s["exhaustive_limit"] = 0  # live accuracies only (no table), so wall times compare
  caps = [x.partition("=") for x in FLAGS.agent_max_budget]
  s["agent_max_budget"] = {name.strip(): int(val) for name, _, val in caps}
  if FLAGS.quick:
    for name, value in (
      ("seeds", [0, 1]),
      ("budgets", [100, 300]),
      ("models", ["resnet18"]),
      ("search_images", 300),
    ):
      if not FLAGS[name].present:
        s[name] = value
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top

  for t in s["targets"]:
    try:
      hw_lib.load_hw(t)
    except hw_lib.HwError as e:
      raise UsageError(f"--targets: {cli_lib.one_line(e)}") from None
  return s


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


def _cached_run(js: Path, hz: Path) -> dict[str, Any] | None:
  """The run saved as ``js`` (record) + ``hz`` (history), or None when not both exist."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax.search import env as env_lib  # pylint: disable=g-import-not-at-top

  if not (js.is_file() and hz.is_file()):
    return None
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
      exact=z["exact"] if "exact" in z.files else np.ones(n, bool),
      images=z["images"] if "images" in z.files else np.zeros(n, np.int32),
    )
  return {**rec, "history": hist}


def run_one(
  task: Task, agent: str, seed: int, budget: int, acc_drop: float, rundir: Path, acc_ref: float
) -> dict[str, Any]:
  """One (agent, seed) search on a task at the largest budget; cached in ``rundir``."""
  import hashlib  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cimjax import search  # pylint: disable=g-import-not-at-top
  from cimjax.search import accuracy as acc_lib  # pylint: disable=g-import-not-at-top
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
  cached = _cached_run(js, hz)
  if cached is not None:
    return cached
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
  acc_lib._save_npz(  # pylint: disable=protected-access
    hz,
    policies=h.policies[:n],
    accuracy=h.accuracy[:n],
    cost_ratio=h.cost_ratio[:n],
    reward=h.reward[:n],
    iteration=h.iteration[:n],
    count=np.int64(n),
    exact=h.exact[:n],
    images=h.images[:n],
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
  ckpt_lib.write_json_atomic(js, rec)
  h_np = env_lib.History(*(np.asarray(x) for x in h))
  return {**rec, "history": h_np}


# ----------------------------------------------------------------------------------------------
# Analysis


def _budget_entry(
  task: Task,
  rs: list[dict[str, Any]],
  b: int,
  acc_target: float,
  ref: float | None,
  final_ref: float | None,
  acc_drop: float,
) -> dict[str, Any]:
  """One agent's results at budget ``b`` (per seed, and medians)."""
  from cimjax.search import runner  # pylint: disable=g-import-not-at-top

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
  return e


def _agent_entry(
  task: Task,
  rs: list[dict[str, Any]],
  budgets: list[int],
  acc_target: float,
  ref: float | None,
  final_ref: float | None,
  acc_drop: float,
) -> dict[str, Any]:
  """One agent's results on a task: per budget, evaluations to 95/98 % of ``ref``, timings."""
  from cimjax.search import runner  # pylint: disable=g-import-not-at-top

  entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
  for b in budgets:
    if any(b > r["budget"] for r in rs):
      entry[str(b)] = {"not_run": True}
    else:
      entry[str(b)] = _budget_entry(task, rs, b, acc_target, ref, final_ref, acc_drop)
  if ref:
    for frac in (95, 98):
      entry[f"evals_to_{frac}"] = [
        runner.evals_to_reach(r["history"], acc_target, speedup=frac / 100 * ref) for r in rs
      ]
  for k in ("wall_s", "eval_s", "mode", "evals_used", "iterations"):
    entry[k] = [r[k] for r in rs]
  return entry


def _pg_vs_ddpg(runs: list[dict[str, Any]], budgets: list[int], acc_target: float) -> dict:
  """Evaluations PG needs to reach DDPG's 600-evaluation (or smallest-budget) best reward."""
  from cimjax.search import runner  # pylint: disable=g-import-not-at-top

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
  return {
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
  tops = [runner.best_within(r["history"], max(budgets), acc_target) for r in runs]
  best_known = max((x["speedup"] for x in tops if x["feasible"]), default=None)
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
  out["agents"] = {
    agent: _agent_entry(
      task, [r for r in runs if r["agent"] == agent], budgets, acc_target, ref, final_ref, acc_drop
    )
    for agent in sorted({r["agent"] for r in runs})
  }
  if "pg" in out["agents"] and "ddpg" in out["agents"] and min(budgets) <= 600:
    out["pg_evals_to_match_ddpg"] = _pg_vs_ddpg(runs, budgets, acc_target)
  return out


def acceptance(result: dict[str, Any], budgets: list[int]) -> dict[str, bool]:
  """The benchmark's acceptance columns of one analysed task (see :func:`analyse`).

  ``pg_beats_ddpg_median_reward_B`` / ``pg_ge_ddpg_median_reward_B``: PG's median best reward
  at budget B above / at least DDPG's; ``pg_frac_optimum_ge_0.98_B``: PG's median speedup at
  least 98 % of the optimum's (tasks with a known optimum).
  """
  per_agent = result["agents"]
  checks = {}
  if "pg" in per_agent and "ddpg" in per_agent:
    for b in budgets:
      p, d = per_agent["pg"][str(b)], per_agent["ddpg"][str(b)]
      if not p.get("not_run") and not d.get("not_run"):
        checks[f"pg_beats_ddpg_median_reward_{b}"] = p["median_reward"] > d["median_reward"]
        checks[f"pg_ge_ddpg_median_reward_{b}"] = p["median_reward"] >= d["median_reward"]
  if "optimum" in result and "pg" in per_agent:
    for b in budgets:
      if not per_agent["pg"][str(b)].get("not_run"):
        checks[f"pg_frac_optimum_ge_0.98_{b}"] = (
          per_agent["pg"][str(b)]["median_frac_ref_speedup"] >= 0.98
        )
  return checks


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


def fashion_model(config: Any, checkpoint: str | None) -> tuple[Any, Any, Any]:
  """``(splits, model, variables)`` of the any-precision small CNN of ``checkpoint``.

  Raises:
    UsageError: no ``checkpoint``, or one that does not load.
  """
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top

  if not checkpoint:
    raise UsageError(
      "--checkpoint is required for --part=fashion (the any-precision small "
      "CNN, launch.train's WORKDIR/anyprec)"
    )
  splits = train_lib.load_splits(config)
  model = train_lib.build_model(config, splits)
  try:
    variables = train_lib.load_variables(checkpoint, model)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"--checkpoint={checkpoint}: cannot load ({cli_lib.one_line(e)})") from None
  return splits, model, variables


def _fashion_task(
  tname: str,
  s: dict[str, Any],
  model: Any,
  specs: list,
  memo: Any,
  memo_io: tuple[Path, str],
  acc_ref: float,
  notes: dict[str, Any],
) -> Task:
  """The Fashion-MNIST task on target ``tname``, exhaustively tabulated when small enough.

  Args:
    tname: hardware target.
    s: the settings.
    model: the model.
    specs: its layer specs.
    memo: the memo of search-split accuracies.
    memo_io: ``(path, tag)`` the memo is saved with.
    acc_ref: the reference policy's search-split accuracy.
    notes: notes of the task (the exhaustive evaluation's are added).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import search  # pylint: disable=g-import-not-at-top
  from cimjax.search import baselines  # pylint: disable=g-import-not-at-top
  from cimjax.search import space as space_lib  # pylint: disable=g-import-not-at-top

  hw = hw_lib.load_hw(tname)
  tables = cost_lib.cost_tables(specs, hw, xp=np)
  space = space_lib.make_space(len(specs), s["constraint"], hw.cell_bits)
  source, optimum, notes = memo, None, dict(notes)
  if space.size <= s["exhaustive_limit"]:
    t0 = time.perf_counter()

    def prog(done, total, tname=tname):
      if done % 512 < 256 or done == total:
        logging.info("exhaustive %s: %d/%d", tname, done, total)
        memo.save(*memo_io)

    table = search.exhaustive_table(memo, space, chunk=256, progress=prog)
    memo.save(*memo_io)
    source = search.TableAccuracy(space, table, name=f"exhaustive val[:{notes['search_images']}]")
    optimum = baselines.exhaustive_optimum(space, tables.latency_us, table, acc_ref - s["acc_drop"])
    notes["exhaustive_s"] = time.perf_counter() - t0
    notes["exhaustive_evals"] = int(space.size)
  return Task(
    name=f"fashion/{tname}/{s['constraint']}",
    model=model,
    specs=specs,
    tables=tables,
    hw=hw,
    space=space,
    accuracy=source,
    optimum=optimum,
    notes=notes,
  )


def fashion_tasks(
  config: Any, s: dict[str, Any], memo_path: Path
) -> tuple[list[Task], Any, dict[str, Any]]:
  """The Fashion-MNIST tasks (one per target), with a shared memo of accuracies.

  Returns:
    ``(tasks, memo, info)``: the memo of search-split accuracies (saved at ``memo_path``) and
    the reference accuracies, split size, memo tag, model and layer names.
  """
  from cimjax import search, trace  # pylint: disable=g-import-not-at-top
  from cimjax.search import space as space_lib  # pylint: disable=g-import-not-at-top

  splits, model, variables = fashion_model(config, s["checkpoint"])
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
  notes = {"search_images": n, "test_images": len(splits.test)}
  tasks = []
  for tname in s["targets"]:
    task = _fashion_task(tname, s, model, specs, memo, (memo_path, tag), acc_ref, notes)
    task.final = test
    tasks.append(task)
  info = {
    "acc_ref_val": acc_ref,
    "acc_ref_test": test_ref,
    "search_images": n,
    "memo_tag": tag,
    "model": model.name,
    "layers": [x.name for x in specs],
  }
  return tasks, memo, info


def synthetic_tasks(s: dict[str, Any]) -> list[Task]:
  """The synthetic-accuracy tasks: every model of ``s["models"]`` on every target.

  Raises:
    UsageError: an unknown model.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import models, search, trace  # pylint: disable=g-import-not-at-top

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


# ----------------------------------------------------------------------------------------------
# Output


def _f(x: float | None, w: int, p: int) -> str:
  return f"{'-':>{w}s}" if x is None else f"{x:{w}.{p}f}"


def _row(task: str, agent: str, b: int, x: dict[str, Any], e: dict[str, Any]) -> str:
  """One table row: an agent's medians on a task at budget ``b``."""
  if x.get("not_run"):
    return f"{task[:38]:38s} {agent:6s} {b:6d}  (not run)"
  td = x.get("final_drop")
  frac = x["median_frac_ref_speedup"]
  return (
    f"{task[:38]:38s} {agent:6s} {b:6d} "
    f"{_f(x['median_reward'], 9, 2)} {_f(x['median_speedup'], 8, 3)} "
    f"{_f(100 * frac if frac is not None else None, 6, 1)} "
    f"{sum(x['feasible']):2d}/{len(x['feasible']):<2d} "
    f"{_f(_median(e.get('evals_to_95', [])), 6, 0)} "
    f"{_f(_median(td) if td else None, 9, 2)} {_f(_median(e['wall_s']), 7, 1)}"
  )


def format_table(results: list[dict[str, Any]], budgets: list[int]) -> str:
  """The printed table: one row per task, agent and budget; PG-vs-DDPG, optimum and checks."""
  hdr = (
    f"{'task':38s} {'agent':6s} {'budget':>6s} {'reward':>9s} {'speedup':>8s} "
    f"{'%ref':>6s} {'feas':>5s} {'ev95':>6s} {'test_drop':>9s} {'wall_s':>7s}"
  )
  lines = [hdr, "-" * len(hdr)]
  for t in results:
    for agent, e in t["agents"].items():
      lines += [_row(t["task"], agent, b, e[str(b)], e) for b in budgets]
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
    if t.get("checks"):
      cells = [f"{k} {'yes' if v else 'NO'}" for k, v in t["checks"].items()]
      lines.append(f"{'':38s} checks: {', '.join(cells)}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Lazy evaluation against full evaluation


def lazy_run(
  task: Task,
  source: Any,
  agent: str,
  seed: int,
  chunk: int,
  s: dict[str, Any],
  acc_ref: float,
) -> dict[str, Any]:
  """One search of the ``--lazy`` comparison (``chunk`` 0: lazy off), live accuracies."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import search  # pylint: disable=g-import-not-at-top

  cfg = search.SearchConfig(
    agent=agent,
    budget=max(s["budgets"]),
    acc_drop=s["acc_drop"],
    constraint=task.space.constraint,
    seed=seed,
    lazy=chunk > 0,
    lazy_chunk=chunk if chunk > 0 else search.SearchConfig().lazy_chunk,
    lazy_alpha=s["lazy_alpha"],
    final_top_k=s.get("lazy_top_k", 5),
  )
  t0 = time.perf_counter()
  res = search.run_search(
    task.model, task.specs, task.tables, source, cfg, hw=task.hw, acc_ref=acc_ref, plots=False
  )
  wall = time.perf_counter() - t0
  test = float(task.final(res.best_policy[None])[0]) if task.final is not None else None
  n = res.evals_used
  images, counts = np.unique(np.asarray(res.history.images[:n]), return_counts=True)
  gap = np.abs(np.asarray(res.history.accuracy[:n], np.float64) - res.acc_target)
  exact = np.asarray(res.history.exact[:n])
  return {
    "agent": agent,
    "seed": seed,
    "chunk": chunk,
    "evals_used": res.evals_used,
    "image_passes": res.image_passes,
    "wall_s": wall,
    "eval_s": res.eval_s,
    "best_reward": res.best_reward,
    "best_speedup": res.best_speedup,
    "feasible": res.feasible,
    "best_policy": res.best_policy.astype(int).tolist(),
    "test_accuracy": test,
    "lazy": res.lazy,
    # rows by images scored, and exact rows within 1 / 2 points of the target (the ones no
    # test can stop early: they decide where lazy evaluation's savings end)
    "images_hist": {str(int(i)): int(c) for i, c in zip(images, counts)},
    "exact_within_1pt": int(np.sum(exact & (gap <= 1.0))),
    "exact_within_2pt": int(np.sum(exact & (gap <= 2.0))),
  }


def lazy_summary(runs: list[dict[str, Any]], final_ref: float | None) -> list[dict[str, Any]]:
  """Per agent and chunk (0: lazy off): medians over seeds, and the reduction of image passes
  against lazy off at the same seeds (median of the per-seed ratios and ratio of totals)."""
  rows = []
  for agent in sorted({r["agent"] for r in runs}):
    off = {r["seed"]: r for r in runs if r["agent"] == agent and r["chunk"] == 0}
    for chunk in sorted({r["chunk"] for r in runs if r["agent"] == agent}):
      rs = [r for r in runs if r["agent"] == agent and r["chunk"] == chunk]
      base = [off[r["seed"]] for r in rs if r["seed"] in off]
      passes = sum(r["image_passes"] for r in rs)
      tests = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
      rows.append(
        {
          "agent": agent,
          "chunk": chunk,
          "seeds": [r["seed"] for r in rs],
          "image_passes": [r["image_passes"] for r in rs],
          "image_passes_total": passes,
          "reduction_median": _median(
            [b["image_passes"] / r["image_passes"] for r, b in zip(rs, base)]
          ),
          "reduction_total": (sum(b["image_passes"] for b in base) / passes) if base else None,
          "wall_s": [r["wall_s"] for r in rs],
          "median_wall_s": _median([r["wall_s"] for r in rs]),
          "wall_speedup": (
            _median([b["wall_s"] for b in base]) / _median([r["wall_s"] for r in rs])
            if base
            else None
          ),
          "median_best_reward": _median([r["best_reward"] for r in rs]),
          "best_reward": [r["best_reward"] for r in rs],
          "median_speedup": _median([r["best_speedup"] for r in rs]),
          "feasible": sum(bool(r["feasible"]) for r in rs),
          "median_test_accuracy": _median(tests),
          "median_test_drop": _median([final_ref - t for t in tests]) if final_ref else None,
          "same_best_as_off": sum(r["best_policy"] == b["best_policy"] for r, b in zip(rs, base)),
          "median_exact": _median([r["lazy"]["exact"] for r in rs if r["lazy"]]),
          "stopped_by_test": sum(r["lazy"]["stopped_by_test"] for r in rs if r["lazy"]),
          "stopped_by_bound": sum(r["lazy"]["stopped_by_bound"] for r in rs if r["lazy"]),
        }
      )
  return rows


def format_lazy_table(results: list[dict[str, Any]]) -> str:
  """The ``--lazy`` table: one row per task, agent and chunk (``off``: lazy off)."""
  hdr = (
    f"{'task':30s} {'agent':6s} {'chunk':>5s} {'img_passes':>11s} {'x_fewer':>7s} "
    f"{'wall_s':>7s} {'x_wall':>6s} {'reward':>8s} {'speedup':>8s} {'feas':>5s} "
    f"{'test_acc':>8s} {'same':>5s} {'exact':>6s}"
  )
  lines = [hdr, "-" * len(hdr)]
  for t in results:
    for r in t["rows"]:
      n = len(r["seeds"])
      lines.append(
        f"{t['task'][:30]:30s} {r['agent']:6s} {('off' if not r['chunk'] else r['chunk']):>5} "
        f"{r['image_passes_total']:11d} {_f(r['reduction_median'], 7, 2)} "
        f"{_f(r['median_wall_s'], 7, 1)} {_f(r['wall_speedup'], 6, 2)} "
        f"{_f(r['median_best_reward'], 8, 2)} {_f(r['median_speedup'], 8, 3)} "
        f"{r['feasible']:2d}/{n:<2d} {_f(r['median_test_accuracy'], 8, 2)} "
        f"{r['same_best_as_off']:2d}/{n:<2d} {_f(r['median_exact'], 6, 0)}"
      )
  return "\n".join(lines)


def run_lazy_comparison(
  s: dict[str, Any], tasks: list[Task], info: dict[str, Any], workdir: Path
) -> dict[str, Any]:
  """The ``--lazy`` comparison of every Fashion task; prints and returns it (and saves JSON)."""
  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  fi = info["fashion"]
  results = []
  for task in tasks:
    source = getattr(task.accuracy, "inner", task.accuracy)  # live: no memo, no table
    runs = []
    for agent in s["agents"]:
      for seed in s["seeds"]:
        for chunk in [0, *s["lazy_chunks"]]:
          r = lazy_run(task, source, agent, seed, chunk, s, fi["acc_ref_val"])
          runs.append(r)
          print(
            f"{task.name} {agent} seed {seed} {'lazy ' + str(chunk) if chunk else 'full':9s}: "
            f"reward {r['best_reward']:.3f}, {r['image_passes']} image passes, "
            f"{r['wall_s']:.1f} s",
            flush=True,
          )
    results.append(
      {
        "task": task.name,
        "budget": max(s["budgets"]),
        "acc_ref": fi["acc_ref_val"],
        "acc_ref_test": fi["acc_ref_test"],
        "alpha": s["lazy_alpha"],
        "top_k": s.get("lazy_top_k", 5),
        "rows": lazy_summary(runs, fi["acc_ref_test"]),
        "runs": runs,
      }
    )
    ckpt_lib.write_json_atomic(
      workdir / "bench_search.json",
      {"settings": s, "info": info, "lazy_comparison": results, "partial": True},
    )
  print(format_lazy_table(results))
  return {"lazy_comparison": results}


# ----------------------------------------------------------------------------------------------
# The benchmark


def build_tasks(
  s: dict[str, Any], config: Any, memo_path: Path
) -> tuple[list[Task], Any, dict[str, Any]]:
  """The tasks of the parts in ``s``; ``(tasks, memo or None, info)``."""
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top

  tasks: list[Task] = []
  info: dict[str, Any] = {}
  memo = None
  if "fashion" in s["parts"]:
    config = config if config is not None else train_lib.default_config()
    ft, memo, info["fashion"] = fashion_tasks(config, s, memo_path)
    tasks += ft
  if "synthetic" in s["parts"]:
    tasks += synthetic_tasks(s)
  return tasks, memo, info


def run_task(
  task: Task, s: dict[str, Any], rundir: Path, acc_ref: float, save_memo: Callable[[], None]
) -> list[dict[str, Any]]:
  """Every (agent, seed) run of a task at the largest budget (capped per agent)."""
  top = max(s["budgets"])
  runs = []
  for agent in s["agents"]:
    for seed in s["seeds"]:
      top_a = min(top, s["agent_max_budget"].get(agent, top))
      logging.info("%s: %s seed %d (budget %d)", task.name, agent, seed, top_a)
      r = run_one(task, agent, seed, top_a, s["acc_drop"], rundir, acc_ref)
      runs.append(r)
      save_memo()
      print(
        f"{task.name} {agent} seed {seed}: best reward "
        f"{float(max(r['history'].reward[: int(r['history'].count)])):.3f} "
        f"({r['evals_used']} evaluations, {r['wall_s']:.1f} s)",
        flush=True,
      )
  return runs


def add_live_estimates(info: dict[str, Any], results: list[dict[str, Any]], memo: Any) -> None:
  """Seconds per live evaluation, and each Fashion run's estimated wall time without the memo."""
  live = memo.inner
  per = live.seconds / live.evaluated if live.evaluated else None
  info["fashion"]["seconds_per_evaluation"] = per
  info["fashion"]["evaluations_computed"] = live.evaluated
  if not per:
    return
  for t in results:
    if t["task"].startswith("fashion"):
      for e in t["agents"].values():
        # agent time plus every evaluation computed live (no memo, no table)
        e["est_live_wall_s"] = [
          (w - ev if m == "loop" else w) + n * per
          for w, ev, m, n in zip(e["wall_s"], e["eval_s"], e["mode"], e["evals_used"])
        ]


def run_benchmark(s: dict[str, Any], config: Any, workdir: Path) -> dict[str, Any]:
  """Runs the benchmark of settings ``s`` into ``workdir``; prints and returns the results."""
  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  workdir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  memo_path = workdir / "memo_val.npz"
  tasks, memo, info = build_tasks(s, config, memo_path)

  def save_memo() -> None:
    if memo is not None:
      memo.save(memo_path, info["fashion"]["memo_tag"])

  if s.get("lazy"):
    out = {"settings": s, "info": info, **run_lazy_comparison(s, tasks, info, workdir)}
    out["wall_s"] = time.perf_counter() - t_start
    ckpt_lib.write_json_atomic(workdir / "bench_search.json", out)
    return out
  results = []
  for task in tasks:
    rundir = workdir / "runs" / task.name.replace("/", "_")
    acc_ref = (
      info.get("fashion", {}).get("acc_ref_val") if task.name.startswith("fashion") else None
    )
    if acc_ref is None:
      acc_ref = float(task.accuracy(task.space.reference_policy()[None])[0])
    runs = run_task(task, s, rundir, acc_ref, save_memo)
    final_ref = info.get("fashion", {}).get("acc_ref_test") if task.final is not None else None
    res = analyse(task, runs, s["budgets"], final_ref, s["acc_drop"])
    res["checks"] = acceptance(res, s["budgets"])
    res["acc_drop"] = s["acc_drop"]
    results.append(res)
    ckpt_lib.write_json_atomic(
      workdir / "bench_search.json",
      {"settings": s, "info": info, "tasks": results, "partial": True},
    )
  if memo is not None:
    add_live_estimates(info, results, memo)
  out = {"settings": s, "info": info, "tasks": results, "wall_s": time.perf_counter() - t_start}
  ckpt_lib.write_json_atomic(workdir / "bench_search.json", out)
  print(format_table(results, s["budgets"]))
  return out


def run_from_flags() -> dict[str, Any]:
  """Runs the benchmark of the parsed flags (see :func:`run_benchmark`)."""
  s = settings_from_flags()
  config = FLAGS.config.train if FLAGS["config"].value is not None else None
  return run_benchmark(s, config, Path(FLAGS.workdir))


def main(argv: Sequence[str]) -> None:
  """absl entry point."""
  try:
    cli_lib.no_positional(argv)
    run_from_flags()
  except CimjaxError as e:
    cli_lib.fail(PROG, e)


def run() -> None:
  """Entry point of ``python -m launch.bench_search``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
