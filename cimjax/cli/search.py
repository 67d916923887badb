"""Search per-layer bit-widths of a trained any-precision model (or a synthetic task).

Usage (from the repository root)::

  # real accuracy: the any-precision model trained by launch.train (its WORKDIR/anyprec)
  python -m launch.search --config=train/small_cnn_fashion.py --workdir=/tmp/s \
      --checkpoint=/tmp/cnn_fashion/anyprec --hw=rram_256_c4 --agent=pg --acc_drop=0.5 \
      --constraint=both --budget=600

  # synthetic accuracy model (no trained model needed), any zoo model
  python -m launch.search --workdir=/tmp/s --accuracy=synthetic --model=vit_b32 \
      --hw=rram_256_c4 --agent=pg --budget=3000

``--config`` is a training config (``train/*.py``): it names the model and the data splits
(the search runs on the search-validation split ``val``; the best candidates are re-evaluated
on ``test``, or ``--final_split=none``). Without ``--config`` the defaults of
:func:`cimjax.train.default_config` are used (small CNN, Fashion-MNIST). The search state is
checkpointed in ``WORKDIR/checkpoints`` and an interrupted run resumes from it. Outputs in
``WORKDIR``: ``best_policy.npy`` (CIM-AQ format), ``report.json`` (accuracy, latency, energy,
speedup over 8/8, evaluations used, wall time), ``pareto.json``, ``history.npz`` and the plots
``pareto.png``, ``bits.png``, ``latency.png``. The report is also printed as one JSON object.

Several processes (``--num_processes``/``--process_id``/``--coordinator_address``, or
``--distributed`` on a TPU pod or SLURM cluster) run the same search and split every batch's
accuracy evaluations between them (``docs/multihost.md``); ``--workdir`` must be shared.

Exit status 0 on success; 2 with one line on stderr naming the flag for a usage error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from cimjax import cli as cli_lib
from cimjax.cli import UsageError

PROG = "launch.search"
AGENTS = ("pg", "ddpg", "random", "exhaustive")
CONSTRAINTS = ("both", "weight", "io", "none")
ACCURACY = ("data", "synthetic")
MODES = ("auto", "loop", "scan")
FINAL_SPLITS = ("test", "none")
SYNTHETIC_KINDS = ("additive", "saturating", "interaction")


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  fv = cli_lib.config_flag_values(
    argv,
    "Training config file (train/*.py with get_config()): model and data; "
    "override fields with --config.<field>=<value>.",
  )
  d = lambda *a, **k: flags.DEFINE_string(*a, flag_values=fv, **k)  # noqa: E731
  d("workdir", None, "Output and checkpoint directory.")
  d("hw", "rram_256_c4", "Hardware target: a name from hw/ or a .toml path.")
  d("agent", "pg", f"Search agent: {'|'.join(AGENTS)}.")
  d("acc_drop", "0.5", "Allowed accuracy drop from INT8 in percentage points.")
  d("constraint", "both", f"Constraint variant: {'|'.join(CONSTRAINTS)}.")
  d("budget", "600", "Unique accuracy evaluations (exhaustive: 0 = the whole space).")
  d("accuracy", "data", f"Accuracy source: {'|'.join(ACCURACY)}.")
  d(
    "checkpoint",
    None,
    "Directory of the any-precision model (launch.train's WORKDIR/anyprec "
    "or its variables/); required with --accuracy=data.",
  )
  d("model", None, "Zoo model (overrides the config's model; e.g. for synthetic runs).")
  d("seed", "0", "Search seed.")
  d("mode", "auto", f"Search loop: {'|'.join(MODES)}.")
  d("population", "0", "Candidates per iteration (0: the agent's default).")
  d("min_bits", "2", "Smallest bit-width.")
  d("max_bits", "8", "Largest bit-width (<= 8).")
  d("final_split", "test", f"Split re-evaluating the best candidates: {'|'.join(FINAL_SPLITS)}.")
  d("search_images", "0", "Use only the first N images of the search split (0: all).")
  d("synthetic_kind", "additive", f"Synthetic model: {'|'.join(SYNTHETIC_KINDS)}.")
  d("synthetic_seed", "0", "Seed of the synthetic sensitivities.")
  d("checkpoint_every", "0", "Iterations between search checkpoints (0: at the end).")
  d(
    "coordinator_address",
    None,
    "Multi-process runs: host:port of process 0 for "
    "jax.distributed.initialize (omit on Cloud TPU / SLURM, where it is detected).",
  )
  d("num_processes", "1", "Multi-process runs: number of processes (1: single process).")
  d("process_id", "0", "Multi-process runs: this process's index.")
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with the "
    "environment's defaults (Cloud TPU pods, SLURM GPU clusters).",
    flag_values=fv,
  )
  flags.DEFINE_bool("progress", True, "Show a progress bar on a terminal.", flag_values=fv)
  flags.DEFINE_bool("plots", True, "Write PNG plots.", flag_values=fv)
  return fv


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into a fresh ``FlagValues``.

  Raises:
    UsageError: unknown flag, config file that does not load, missing required flag.
  """
  return cli_lib.parse_config_args(_define_flags(argv), argv)


parse_flags = cli_lib.usage_parser(parse_args, PROG)


def _choice(fv: flags.FlagValues, name: str, allowed: Sequence[str]) -> str:
  v = fv[name].value
  if v not in allowed:
    raise UsageError(f"--{name}={v}: allowed values are {', '.join(allowed)}")
  return v


def _int(fv: flags.FlagValues, name: str, lo: int | None = None, hi: int | None = None) -> int:
  v = fv[name].value
  try:
    i = int(v)
  except (TypeError, ValueError):
    i = None
  if i is None or (lo is not None and i < lo) or (hi is not None and i > hi):
    rng = (
      (f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}")
      if lo is not None
      else "an integer"
    )
    raise UsageError(f"--{name}={v}: allowed values are {rng}")
  return i


def _float(fv: flags.FlagValues, name: str, lo: float = 0.0) -> float:
  v = fv[name].value
  try:
    x = float(v)
  except (TypeError, ValueError):
    x = None
  if x is None or not x >= lo or x != x:
    raise UsageError(f"--{name}={v}: allowed values are numbers >= {lo:g}")
  return x


class Settings(dict):
  """Validated flag values (a dict, for the report)."""


def validate(fv: flags.FlagValues) -> Settings:
  """Checks every flag; raises :class:`UsageError` naming the first bad one."""
  s = Settings()
  s["agent"] = _choice(fv, "agent", AGENTS)
  s["constraint"] = _choice(fv, "constraint", CONSTRAINTS)
  s["accuracy"] = _choice(fv, "accuracy", ACCURACY)
  s["mode"] = _choice(fv, "mode", MODES)
  s["final_split"] = _choice(fv, "final_split", FINAL_SPLITS)
  s["synthetic_kind"] = _choice(fv, "synthetic_kind", SYNTHETIC_KINDS)
  s["acc_drop"] = _float(fv, "acc_drop", 0.0)
  s["budget"] = _int(fv, "budget", 0)
  if s["budget"] == 0 and s["agent"] != "exhaustive":
    raise UsageError(
      "--budget=0: allowed values are integers >= 1 (0 only with --agent=exhaustive)"
    )
  s["seed"] = _int(fv, "seed", 0)
  s["population"] = _int(fv, "population", 0)
  if s["population"] == 1 and s["agent"] == "pg":
    raise UsageError("--population=1: allowed values are 0 (default) or >= 2 for --agent=pg")
  s["min_bits"] = _int(fv, "min_bits", 1, 8)
  s["max_bits"] = _int(fv, "max_bits", 1, 8)
  if s["min_bits"] > s["max_bits"]:
    raise UsageError(
      f"--min_bits={s['min_bits']}: allowed values are 1..--max_bits ({s['max_bits']})"
    )
  s["search_images"] = _int(fv, "search_images", 0)
  s["synthetic_seed"] = _int(fv, "synthetic_seed", 0)
  s["checkpoint_every"] = _int(fv, "checkpoint_every", 0)
  s["num_processes"] = _int(fv, "num_processes", 1)
  s["process_id"] = _int(fv, "process_id", 0, s["num_processes"] - 1)
  s["coordinator_address"] = fv["coordinator_address"].value
  s["distributed"] = fv["distributed"].value or s["num_processes"] > 1
  if s["num_processes"] > 1 and not s["coordinator_address"]:
    raise UsageError(
      "--num_processes > 1 needs --coordinator_address=HOST:PORT (or use "
      "--distributed where the cluster is detected)"
    )
  s["workdir"] = fv["workdir"].value
  s["checkpoint"] = fv["checkpoint"].value
  s["hw"] = fv["hw"].value
  s["model"] = fv["model"].value
  if s["accuracy"] == "data" and not s["checkpoint"]:
    raise UsageError(
      "--checkpoint is required with --accuracy=data (the any-precision model "
      "directory, e.g. WORKDIR/anyprec of launch.train); or use "
      "--accuracy=synthetic"
    )
  return s


def _progress_bar(enabled: bool, total: int):
  """A rich progress callback on stderr (None when off or not a terminal)."""
  if not (enabled and sys.stderr.isatty()):
    return None, lambda: None
  from rich import progress as rp  # pylint: disable=g-import-not-at-top
  from rich.console import Console  # pylint: disable=g-import-not-at-top

  bar = rp.Progress(
    rp.TextColumn("[bold]search"),
    rp.BarColumn(),
    rp.MofNCompleteColumn(),
    rp.TimeElapsedColumn(),
    rp.TextColumn("{task.fields[info]}"),
    console=Console(stderr=True),
  )
  bar.start()
  task = bar.add_task("search", total=total, info="")

  def update(iteration: int, used: int, budget: int, best: float) -> None:
    bar.update(task, completed=used, info=f"iter {iteration}  best reward {best:.3f}")

  return update, bar.stop


def _log_progress():
  last = {"t": 0.0}

  def update(iteration: int, used: int, budget: int, best: float) -> None:
    import time  # pylint: disable=g-import-not-at-top

    now = time.time()
    if now - last["t"] > 10.0 or used >= budget:
      last["t"] = now
      logging.info(
        "search iteration %d: %d/%d evaluations, best reward %.4f", iteration, used, budget, best
      )

  return update


def run_from_flags(fv: flags.FlagValues) -> dict[str, Any]:
  """Runs the search the flags describe; returns the report dict.

  Raises:
    UsageError: anything the user can fix (exit status 2).
  """
  s = validate(fv)
  import jax  # pylint: disable=g-import-not-at-top

  if s["distributed"]:
    # CPU collectives (tests, CPU clusters); accelerators use their own. Must precede any
    # call that initialises a backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if s["num_processes"] > 1:
      kw = {
        "coordinator_address": s["coordinator_address"],
        "num_processes": s["num_processes"],
        "process_id": s["process_id"],
      }
    jax.distributed.initialize(**kw)
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import models as models_lib  # pylint: disable=g-import-not-at-top
  from cimjax import (
    search,  # pylint: disable=g-import-not-at-top
    trace,  # pylint: disable=g-import-not-at-top
  )
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top

  config = fv.config if fv["config"].value is not None else train_lib.default_config()
  if s["model"]:
    if s["model"] not in models_lib.MODEL_NAMES:
      raise UsageError(
        f"--model={s['model']}: allowed values are {', '.join(models_lib.MODEL_NAMES)}"
      )
    config.model = s["model"]
  try:
    target = hw_lib.load_hw(s["hw"])
  except hw_lib.HwError as e:
    raise UsageError(f"--hw: {cli_lib.one_line(e)}") from None
  if s["constraint"] in ("weight", "both") and s["max_bits"] < target.cell_bits:
    raise UsageError(
      f"--max_bits={s['max_bits']}: allowed values are >= cell_bits "
      f"({target.cell_bits}) with --constraint={s['constraint']}"
    )

  final = None
  acc_ref = None
  if s["accuracy"] == "data":
    try:
      splits = train_lib.load_splits(config)
      model = train_lib.build_model(config, splits)
    except (data_lib.DataError, train_lib.ConfigError, ValueError) as e:
      raise UsageError(f"--config: {cli_lib.one_line(e)}") from None
    try:
      variables = train_lib.load_variables(s["checkpoint"], model)
    except Exception as e:  # pylint: disable=broad-except
      raise UsageError(
        f"--checkpoint={s['checkpoint']}: cannot load the model variables ({cli_lib.one_line(e)})"
      ) from None
    val = splits.val
    if len(val) == 0:
      raise UsageError("--config: the search-validation split is empty (config.data.val_size)")
    n = s["search_images"] or len(val)
    accuracy = search.DataAccuracy(
      model,
      variables,
      val.images[:n],
      val.labels[:n],
      batch_size=config.eval_batch_size,
      name="val",
    )
    if s["final_split"] == "test" and len(splits.test):
      final = search.DataAccuracy(
        model,
        variables,
        splits.test.images,
        splits.test.labels,
        batch_size=config.eval_batch_size,
        name="test",
      )
  else:
    try:
      model = models_lib.get_model(
        config.model,
        **{
          k: (tuple(v) if isinstance(v, list) else v)
          for k, v in config.model_kwargs.to_dict().items()
        },
      )
    except (TypeError, ValueError) as e:
      raise UsageError(f"--model: {cli_lib.one_line(e)}") from None
    accuracy = search.SyntheticAccuracy(
      trace.trace_specs(model), kind=s["synthetic_kind"], seed=s["synthetic_seed"]
    )
  if jax.process_count() > 1:
    # every process runs the same search; each batch's evaluations are split between them
    accuracy = search.MultiProcessAccuracy(accuracy)
    if final is not None:
      final = search.MultiProcessAccuracy(final)
  specs = trace.trace_specs(model)
  tables = cost_lib.cost_tables(specs, target, xp=np)
  cfg = search.SearchConfig(
    agent=s["agent"],
    budget=s["budget"],
    acc_drop=s["acc_drop"],
    constraint=s["constraint"],
    min_bits=s["min_bits"],
    max_bits=s["max_bits"],
    seed=s["seed"],
    mode=s["mode"],
    population=s["population"],
    checkpoint_every=s["checkpoint_every"],
  )
  space = search.make_space(
    len(specs), cfg.constraint, target.cell_bits, cfg.min_bits, cfg.max_bits
  )
  budget = cfg.budget or space.size
  if s["agent"] == "exhaustive" and space.size > budget:
    raise UsageError(
      f"--budget={budget}: --agent=exhaustive needs the whole space "
      f"({space.size:.4g} policies) in the budget; use --budget=0 or a smaller "
      f"space (--constraint=both)"
    )
  if s["agent"] == "exhaustive" and space.size >= 2**31:
    raise UsageError(
      f"--agent=exhaustive: the space has {space.size:.4g} policies; allowed are spaces below 2^31"
    )
  update, stop = _progress_bar(fv["progress"].value and jax.process_index() == 0, budget)
  if update is None:
    update = _log_progress()
  try:
    result = search.run_search(
      model,
      specs,
      tables,
      accuracy,
      cfg,
      hw=target,
      final_accuracy=final,
      workdir=s["workdir"],
      progress=update,
      plots=fv["plots"].value,
      acc_ref=acc_ref,
    )
  except ValueError as e:
    raise UsageError(f"--workdir={s['workdir']}: {cli_lib.one_line(e)}") from None
  finally:
    stop()
  if jax.process_index() != 0:
    return {"process": jax.process_index(), "best_reward": result.best_reward}
  report = json.loads(Path(s["workdir"], "report.json").read_text())
  report.pop("layers", None)
  report["accuracy_source"] = accuracy.describe()
  return report


def main(argv: Sequence[str] | flags.FlagValues) -> int:
  """Entry point: ``argv`` (program name first) or flags parsed by :func:`parse_flags`.

  Returns:
    0, or 2 after printing one line on stderr.
  """
  try:
    fv = argv if isinstance(argv, flags.FlagValues) else parse_args(argv)
    report = run_from_flags(fv)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report, sort_keys=True, default=str))
  return 0


def run() -> None:
  """Console-script style entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
