"""The run's search stage as library functions, shared by the pipeline and ``launch.search``.

:func:`run_search_stage` searches per-layer bit-widths of a :class:`SearchTask` with the
settings of a run config's ``search`` section, chooses the policy to fine-tune
(:func:`choose_policy`), writes ``chosen_policy.npy`` next to the search outputs and returns the
stage's result. A task is the model, its layer geometry and cost tables on the target, and the
accuracy sources: :func:`data_task` (a trained any-precision model on validation images; the
pipeline's) or :func:`synthetic_task` (a synthetic accuracy model, no training needed).
See docs/architecture.md for the stages of the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from cimjax import cost as cost_lib
from cimjax import data as data_lib
from cimjax import hw as hw_lib
from cimjax import policy as policy_lib
from cimjax import search as search_lib
from cimjax.crossbar import INPUT_SCHEMES
from cimjax.errors import ConfigError
from cimjax.search.accuracy import AccuracySource
from cimjax.search.runner import ProgressFn
from cimjax.trace import trace_specs

FINAL_SPLITS = ("val", "test", "none")


def _field_error(field: str, value: Any, allowed: str) -> ConfigError:
  return ConfigError(f"config.{field} = {value!r}; allowed: {allowed}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def validate_search(
  config: ml_collections.ConfigDict,
  num_layers: int | None = None,
  cell_bits: int | None = None,
) -> None:
  """Checks a run config's ``search`` section (what :func:`search_config` reads).

  Args:
    config: a run config.
    num_layers: the model's quantizable layers; with ``cell_bits``, an exhaustive search is
      checked to cover its whole space within the budget.
    cell_bits: the target's cell bits.

  Raises:
    ConfigError: naming the first bad field, its value and what is allowed.
  """
  sc = config.search
  agents = search_lib.AGENTS
  if sc.agent not in agents:
    raise _field_error("search.agent", sc.agent, ", ".join(agents))
  if sc.mode not in search_lib.MODES:
    raise _field_error("search.mode", sc.mode, ", ".join(search_lib.MODES))
  try:
    policy_lib.normalize_constraint(sc.constraint)
  except policy_lib.PolicyError:
    raise _field_error(
      "search.constraint", sc.constraint, ", ".join(policy_lib.CONSTRAINTS)
    ) from None
  low = 0 if sc.agent == "exhaustive" else 1
  if not _is_int(sc.budget) or sc.budget < low:
    extra = "" if low == 0 else " (0, the whole space, only with agent exhaustive)"
    raise _field_error("search.budget", sc.budget, f"an integer >= {low}{extra}")
  if isinstance(sc.acc_drop, bool) or not isinstance(sc.acc_drop, int | float):
    raise _field_error("search.acc_drop", sc.acc_drop, "a number >= 0 (percentage points)")
  if not (math.isfinite(sc.acc_drop) and sc.acc_drop >= 0):
    raise _field_error("search.acc_drop", sc.acc_drop, "a number >= 0 (percentage points)")
  for f in ("seed", "search_images"):
    if not _is_int(sc[f]) or sc[f] < 0:
      raise _field_error(f"search.{f}", sc[f], "an integer >= 0")
  if not _is_int(sc.population) or sc.population < 0 or (sc.population == 1 and sc.agent == "pg"):
    raise _field_error(
      "search.population", sc.population, "0 (the agent's default) or an integer >= 2"
    )
  if not _is_int(sc.final_top_k) or sc.final_top_k < 1:
    raise _field_error("search.final_top_k", sc.final_top_k, "an integer >= 1")
  margin = sc.get("choose_margin", CHOOSE_MARGIN)
  number = not isinstance(margin, bool) and isinstance(margin, int | float)
  if not (number and math.isfinite(margin) and margin >= 0):
    raise _field_error(
      "search.choose_margin", margin, "a number >= 0 (standard errors; 0: the target alone)"
    )
  _validate_lazy(sc)
  if sc.agent == "exhaustive" and num_layers is not None:
    space = search_lib.make_space(num_layers, sc.constraint, cell_bits)
    if space.size >= 2**31 or space.size > (sc.budget or space.size):
      raise _field_error(
        "search.budget",
        sc.budget,
        f"with agent exhaustive, the whole space ({space.size:.4g} policies, below 2^31): 0 "
        f"or >= {space.size}",
      )


def _lazy_fields(sc: ml_collections.ConfigDict) -> dict[str, Any]:
  """The lazy-evaluation fields of a ``search`` section (their defaults where absent)."""
  d = search_lib.SearchConfig()
  return {f: sc.get(f, getattr(d, f)) for f in ("lazy", "lazy_chunk", "lazy_alpha")}


def _validate_lazy(sc: ml_collections.ConfigDict) -> None:
  """Checks ``search.lazy``, ``search.lazy_chunk`` and ``search.lazy_alpha``."""
  f = _lazy_fields(sc)
  if not isinstance(f["lazy"], bool):
    raise _field_error("search.lazy", f["lazy"], "True or False")
  if not _is_int(f["lazy_chunk"]) or f["lazy_chunk"] < 1:
    raise _field_error("search.lazy_chunk", f["lazy_chunk"], "an integer >= 1 (images)")
  a = f["lazy_alpha"]
  if isinstance(a, bool) or not isinstance(a, int | float) or not (0.0 < a < 1.0):
    raise _field_error("search.lazy_alpha", a, "a number in (0, 1)")
  dp = sc.get("data_parallel", 1)
  ndev = jax.local_device_count()
  if not _is_int(dp) or dp < 1 or ndev % dp:
    divisors = ", ".join(str(d) for d in range(1, ndev + 1) if ndev % d == 0)
    raise _field_error(
      "search.data_parallel",
      dp,
      f"a divisor of this process's {ndev} devices ({divisors}): the images of each forward "
      "batch are split over that many devices",
    )
  if f["lazy"] and sc.mode == "scan":
    raise _field_error(
      "search.mode",
      sc.mode,
      "auto or loop with search.lazy = True (lazy evaluation runs on the host)",
    )


def validate_compile(config: ml_collections.ConfigDict) -> None:
  """Checks a run config's ``compile`` section.

  Raises:
    ConfigError: naming the first bad field, its value and what is allowed.
  """
  cc = config.compile
  if not _is_int(cc.num_verify) or cc.num_verify < 1:
    raise _field_error("compile.num_verify", cc.num_verify, "an integer >= 1")
  if not _is_int(cc.eval_images) or cc.eval_images < 0:
    raise _field_error("compile.eval_images", cc.eval_images, "an integer >= 0 (0: none)")
  if cc.input_scheme not in INPUT_SCHEMES:
    raise _field_error("compile.input_scheme", cc.input_scheme, ", ".join(INPUT_SCHEMES))


@dataclasses.dataclass
class SearchTask:
  """What a search runs on.

  Attributes:
    model: the :class:`cimjax.models.ModelDef`.
    specs: its layer specs in policy order.
    tables: its NumPy cost tables on the target.
    accuracy: the accuracy source on the search split.
    final_accuracy: the source re-evaluating the best candidates, or None.
    choose_on_final: the chosen policy is the best re-evaluated one (only when the final split
      is held-out validation data, never test); otherwise the search's winner.
    search_images: images of the search split (0: synthetic accuracy).
    final_images: images of the final split (0: none).
  """

  model: Any
  specs: list[Any]
  tables: Any
  accuracy: AccuracySource
  final_accuracy: AccuracySource | None = None
  choose_on_final: bool = False
  search_images: int = 0
  final_images: int = 0


def _task(model: Any, hw: hw_lib.HardwareTarget, **kw: Any) -> SearchTask:
  specs = trace_specs(model)
  return SearchTask(model, specs, cost_lib.cost_tables(specs, hw, xp=np), **kw)


def data_task(
  model: Any,
  variables: Any,
  splits: data_lib.Splits,
  hw: hw_lib.HardwareTarget,
  *,
  search_images: int = 0,
  final_split: str = "val",
  batch_size: int = 1000,
  data_parallel: int = 1,
) -> SearchTask:
  """A search on the validation images of ``splits`` with a trained any-precision model.

  Args:
    model: the model.
    variables: its variables (the any-precision stage's).
    splits: the data; the search uses the first images of ``splits.val``.
    hw: the hardware target (cost tables).
    search_images: images of the search split. ``final_split="val"`` (the run's setting):
      the first ``search_images`` (0: half) of ``val`` for the search, the rest re-evaluates
      the best candidates and chooses among them. Otherwise the first ``search_images`` (0:
      all) of ``val``.
    final_split: ``"val"`` (see above), ``"test"`` (re-evaluate on the test split, report only:
      the choice stays the search's winner) or ``"none"``.
    batch_size: evaluation batch size.
    data_parallel: local devices each forward batch's images are split over
      (:func:`cimjax.evaluate.make_evaluator`; the rest of the devices split the candidates).

  Returns:
    The task.
  """
  if final_split not in FINAL_SPLITS:
    raise ValueError(f"final_split = {final_split!r}; allowed: {', '.join(FINAL_SPLITS)}")
  val, test = splits.val, splits.test
  acc = lambda images, labels, name: search_lib.DataAccuracy(  # noqa: E731
    model, variables, images, labels, batch_size=batch_size, name=name, data_parallel=data_parallel
  )
  if final_split == "val":
    n = min(int(search_images), len(val) - 1) if search_images > 0 else len(val) // 2
    return _task(
      model,
      hw,
      accuracy=acc(val.images[:n], val.labels[:n], "val_search"),
      final_accuracy=acc(val.images[n:], val.labels[n:], "val_final"),
      choose_on_final=True,
      search_images=n,
      final_images=len(val) - n,
    )
  n = min(int(search_images) or len(val), len(val))
  final = None
  if final_split == "test" and len(test):
    final = acc(test.images, test.labels, "test")
  return _task(
    model,
    hw,
    accuracy=acc(val.images[:n], val.labels[:n], "val"),
    final_accuracy=final,
    search_images=n,
    final_images=len(test) if final is not None else 0,
  )


def synthetic_task(
  model: Any, hw: hw_lib.HardwareTarget, *, kind: str = "additive", seed: int = 0
) -> SearchTask:
  """A search on a synthetic accuracy model of ``model``'s layers (no trained model needed)."""
  specs = trace_specs(model)
  return SearchTask(
    model,
    specs,
    cost_lib.cost_tables(specs, hw, xp=np),
    accuracy=search_lib.SyntheticAccuracy(specs, kind=kind, seed=seed),
  )


def multiprocess(task: SearchTask) -> SearchTask:
  """In a multi-process run, ``task`` with each batch's evaluations split between processes.

  Every process runs the same search; see :class:`cimjax.search.MultiProcessAccuracy`.
  """
  if jax.process_count() == 1:
    return task
  final = task.final_accuracy
  return dataclasses.replace(
    task,
    accuracy=search_lib.MultiProcessAccuracy(task.accuracy),
    final_accuracy=None if final is None else search_lib.MultiProcessAccuracy(final),
  )


def search_config(config: ml_collections.ConfigDict, **overrides: Any) -> search_lib.SearchConfig:
  """The :class:`cimjax.search.SearchConfig` of a run config's ``search`` section.

  Args:
    config: a run config (:func:`cimjax.pipeline.default_config`).
    **overrides: further :class:`~cimjax.search.SearchConfig` fields (``min_bits``, ...).
  """
  sc = config.search
  return search_lib.SearchConfig(
    agent=sc.agent,
    budget=int(sc.budget),
    acc_drop=float(sc.acc_drop),
    constraint=sc.constraint,
    seed=int(sc.seed),
    mode=sc.mode,
    population=int(sc.population),
    final_top_k=int(sc.final_top_k),
    **{**_lazy_fields(sc), **overrides},
  )


CHOOSE_MARGIN = 1.0  # default ``search.choose_margin``: standard errors of the paired difference


def choose_policy(
  search_best: np.ndarray, final: dict[str, Any] | None, margin: float = CHOOSE_MARGIN
) -> tuple[np.ndarray, dict[str, Any]]:
  """The policy the run fine-tunes: the best *final-split* reward among those that pass.

  The search's winner is the best of many noisy scores on the search images (winner's curse):
  on the default run it typically loses 1-2 points on other images. The pipeline's final split
  is held-out *validation* data (never test), so choosing on it is legitimate. Choosing the
  fastest of ``final_top_k`` candidates that merely clear the target there repeats the curse
  on a smaller scale (the fastest one that clears it is most likely one whose score there is
  lucky). So a candidate *passes* when its paired comparison with the INT8 reference on the
  same images (:func:`cimjax.search.runner.reevaluate`) clears the allowed drop by ``margin``
  standard errors: ``acc_diff - margin * diff_se >= -acc_drop``, a one-sided paired z-test
  (for a candidate exactly at the limit, ``margin=1`` lets it pass with probability ~16%).
  Among those that pass, the highest final-split reward wins (the fastest); if none passes,
  the highest reward (the fastest that clears the target there, or else the closest).
  Without paired statistics (a source without ``correct_images``) or with ``margin=0``, every
  candidate that clears the target passes.

  Args:
    search_best: the search's winner ``[L, 2]`` (used when there is no final re-evaluation).
    final: :func:`cimjax.search.runner.reevaluate`'s dict, or None.
    margin: standard errors of the paired difference a candidate must clear (``>= 0``).

  Returns:
    ``(policy [L, 2] int32, JSON-able description of the choice)``.
  """
  if not final or not final.get("candidates"):
    return np.asarray(search_best, np.int32), {"by": "search reward"}
  cands = final["candidates"]
  drop = float(final["acc_ref"]) - float(final["acc_target"]) if "acc_ref" in final else None
  paired = bool(final.get("paired")) and drop is not None

  def passes(c: dict[str, Any]) -> bool:
    if not paired:
      return bool(c["feasible"])
    return c["acc_diff"] - margin * c["diff_se"] >= -drop - 1e-9  # float slack of the drop

  ok = [i for i in range(len(cands)) if passes(cands[i])]
  pool = ok or list(range(len(cands)))
  j = max(pool, key=lambda i: (cands[i]["reward"], -i))
  c = cands[j]
  rule = f"paired lower bound at {margin:g} SE >= -{drop:g} points" if paired else "target"
  pick = {
    "by": f"{final['name']} reward" + (f", {rule}" if ok else f" (none passes the {rule})"),
    "rank_in_search": j,
    "pool": len(cands),
    "passed": len(ok),
    "final_accuracy": c["accuracy"],
    "final_target": final["acc_target"],
    "feasible_on_final": c["feasible"],
    "speedup": c["speedup"],
    "search_winner_final_accuracy": cands[0]["accuracy"],
  }
  if paired:
    pick.update(
      margin_se=float(margin),
      acc_diff=c["acc_diff"],
      diff_se=c["diff_se"],
      lower_bound=c["acc_diff"] - margin * c["diff_se"],
    )
  return np.asarray(c["policy"], np.int32), pick


def run_search_stage(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike[str],
  task: SearchTask,
  *,
  hw: hw_lib.HardwareTarget | None = None,
  search: search_lib.SearchConfig | None = None,
  progress: ProgressFn | None = None,
  plots: bool = True,
) -> dict[str, Any]:
  """The search stage: searches ``task``, chooses the policy, writes ``chosen_policy.npy``.

  Args:
    config: a run config: its ``search`` section and (without ``hw``) its target ``hw``.
    workdir: the stage's directory: search checkpoints (an interrupted search resumes from
      them) and outputs (``best_policy.npy``, ``report.json``, ``pareto.json``, plots; see
      :func:`cimjax.search.run_search`), and ``chosen_policy.npy``.
    task: what to search on (:func:`data_task`, :func:`synthetic_task`).
    hw: the hardware target (default: ``config.hw``).
    search: the search settings (default: :func:`search_config` of ``config``).
    progress: per-iteration callback of the search loop.
    plots: write the PNG plots.

  Returns:
    The stage's result: ``chosen_policy``, ``searched`` (True), ``summary``
    (:meth:`cimjax.search.SearchResult.summary`), ``search_images``, ``final_images`` and
    ``chosen`` (how the policy was chosen, :func:`choose_policy`).
  """
  hw = hw if hw is not None else hw_lib.load_hw(config.hw)
  res = search_lib.run_search(
    task.model,
    task.specs,
    task.tables,
    task.accuracy,
    search if search is not None else search_config(config),
    hw=hw,
    final_accuracy=task.final_accuracy,
    workdir=workdir,
    progress=progress,
    plots=plots,
  )
  chosen, pick = choose_policy(
    res.best_policy,
    res.final if task.choose_on_final else None,
    float(config.search.get("choose_margin", CHOOSE_MARGIN)),
  )
  if jax.process_index() == 0:
    policy_lib.save_policy(Path(workdir) / "chosen_policy.npy", chosen)
  return {
    "chosen_policy": np.asarray(chosen).tolist(),
    "searched": True,
    "summary": res.summary(),
    "search_images": task.search_images,
    "final_images": task.final_images,
    "chosen": pick,
  }


def given_policy_stage(
  workdir: str | os.PathLike[str], policy: np.ndarray, source: str
) -> dict[str, Any]:
  """The search stage of a run with a given policy: no search; writes ``chosen_policy.npy``."""
  result = {"chosen_policy": np.asarray(policy).tolist(), "source": str(source), "searched": False}
  policy_lib.save_policy(Path(workdir) / "chosen_policy.npy", policy)
  return result
