"""Search loops, the result of a search and its outputs.

Two loops with the same semantics (:func:`search_loop`):

- ``"scan"``: the whole search is jitted, purejaxrl style: ``lax.scan`` over iterations of
  ``ask -> evaluate_in_graph -> tell`` (:func:`cimjax.search.env.evaluate_in_graph`), with a
  ``jax.debug.callback`` for progress. Needs an accuracy source with a jittable ``fn``
  (synthetic models, lookup tables, the data evaluator on accelerators). The scan runs in
  segments of ``scan_chunk`` iterations so it can be checkpointed between them; iteration keys
  depend only on the iteration, so segmenting changes nothing.
- ``"loop"``: a Python loop of jitted ``ask``/``tell`` around the host environment
  (:class:`cimjax.search.env.SearchEnv`): only new policies reach the accuracy source. The
  default on CPU with the real evaluator, where a loop over candidates is fastest.
- ``"auto"``: the accuracy source's ``preferred_mode``.

With ``SearchConfig.lazy`` the loop mode's environment scores new candidates lazily, in chunks
of images with early stops (:mod:`cimjax.search.lazy`); the result counts the image-forward
passes either way (:attr:`SearchResult.image_passes`).

A search stops when the budget (unique evaluations) is spent, after ``stall_iters``
consecutive iterations without a new evaluation (the agent has converged: it only samples
policies it has seen), or after ``max_iters`` iterations.

:func:`run_search` is the entry point of the pipeline and the CLI: it builds the space, the
environment and the agent, runs (or resumes) the loop, re-evaluates the best candidates on a
second accuracy source, and writes the outputs (:func:`write_outputs`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cimjax import cost as cost_lib
from cimjax import hw as hw_lib
from cimjax import policy as policy_lib
from cimjax.errors import CheckpointError, ConfigError
from cimjax.search import accuracy as acc_lib
from cimjax.search import baselines
from cimjax.search import ddpg as ddpg_lib
from cimjax.search import env as env_lib
from cimjax.search import lazy as lazy_lib
from cimjax.search import pg as pg_lib
from cimjax.search import space as space_lib
from cimjax.search.agent import Agent, iteration_keys
from cimjax.search.state import LoopState, SearchCheckpointer
from cimjax.spec import LayerSpec

MODES = ("auto", "loop", "scan")
AGENTS = ("pg", "ddpg", "random", "exhaustive")
# (iteration, evaluations used, budget, best reward, speedup of the best-reward policy)
ProgressFn = Callable[[int, int, int, float, float], None]


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """What :func:`run_search` does.

  Attributes:
    agent: one of :data:`AGENTS`.
    budget: unique accuracy evaluations allowed (``exhaustive``: 0 means the space's size).
    acc_drop: allowed drop from the INT8 reference accuracy, in percentage points.
    constraint: ``"none"``, ``"io"``, ``"weight"`` or ``"both"``.
    cell_bits: cell bits for the weight rule (default: the target's).
    min_bits: smallest bit-width.
    max_bits: largest bit-width.
    seed: the run's seed.
    mode: one of :data:`MODES`.
    population: candidates per iteration for pg/random/exhaustive (0: the agent's default).
    stall_iters: stop after this many iterations without a new evaluation (0: derive it from
      ``stall_candidates``; negative: never).
    stall_candidates: with ``stall_iters = 0``, stop after ``ceil(stall_candidates / P)``
      iterations without a new evaluation: the same number of repeated candidates for every
      population size (50 iterations of PG's 32, 1,600 episodes of DDPG).
    max_iters: iteration cap (0: ``10 * ceil(budget / population) + 100``).
    checkpoint_every: iterations between checkpoints when a workdir is given (0: at the end).
    scan_chunk: iterations per jitted segment in scan mode (0: ``checkpoint_every`` or all).
    final_top_k: best candidates (by search reward) re-evaluated on the final source.
    pg: policy-gradient hyperparameters.
    ddpg: DDPG hyperparameters.
    lazy: lazy candidate evaluation (:mod:`cimjax.search.lazy`): new candidates are scored
      in chunks of ``lazy_chunk`` images and stop early when a sequential test (search-wide
      error rate ``lazy_alpha``) shows them below the accuracy target or when they can be
      neither the winner nor one of the ``final_top_k``. Host loop only (``mode`` ``auto`` or
      ``loop``); needs a source that scores chunks of images. Off by default.
    lazy_chunk: images a look of lazy evaluation.
    lazy_alpha: probability that lazy evaluation's test stops any candidate meeting the target.
  """

  agent: str = "pg"
  budget: int = 600
  acc_drop: float = 0.5
  constraint: str = "both"
  cell_bits: int | None = None
  min_bits: int = 2
  max_bits: int = 8
  seed: int = 0
  mode: str = "auto"
  population: int = 0
  stall_iters: int = 0
  stall_candidates: int = 1600
  max_iters: int = 0
  checkpoint_every: int = 0
  scan_chunk: int = 0
  final_top_k: int = 5
  pg: pg_lib.PGConfig = pg_lib.PGConfig()
  ddpg: ddpg_lib.DDPGConfig = ddpg_lib.DDPGConfig()
  lazy: bool = False
  lazy_chunk: int = lazy_lib.DEFAULT_CHUNK
  lazy_alpha: float = lazy_lib.DEFAULT_ALPHA

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def lazy_config(self) -> lazy_lib.LazyConfig | None:
    """The environment's :class:`cimjax.search.lazy.LazyConfig` (None when ``lazy`` is off).

    Raises:
      ConfigError: a bad ``lazy_chunk`` or ``lazy_alpha``.
    """
    if not self.lazy:
      return None
    lazy_lib.check_config(self.lazy_chunk, self.lazy_alpha)
    return lazy_lib.LazyConfig(
      chunk=int(self.lazy_chunk),
      alpha=float(self.lazy_alpha),
      top_k=max(int(self.final_top_k), 1),
    )


# fields added after checkpoints were first written: a saved configuration without them had
# their defaults (so an old checkpoint resumes under the same settings)
_ADDED_DEFAULTS = {
  "lazy": False,
  "lazy_chunk": lazy_lib.DEFAULT_CHUNK,
  "lazy_alpha": lazy_lib.DEFAULT_ALPHA,
}


def make_agent(
  name: str,
  space: space_lib.SearchSpace,
  specs: Sequence[LayerSpec],
  cost_table: Any,
  config: SearchConfig = SearchConfig(),
  tiles: Any = None,
  acc_target: float | None = None,
) -> Agent:
  """Builds agent ``name`` (one of :data:`AGENTS`) for a space.

  ``acc_target`` (the environment's) is needed by the model-based PG agent.
  """
  pop = config.population
  if name == "pg":
    cfg = config.pg
    if pop:  # keep the planned share of the population
      cfg = dataclasses.replace(
        cfg, population=pop, plan=min(round(cfg.plan * pop / cfg.population), pop - 1)
      )
    return pg_lib.make_pg(space, specs, cost_table, cfg, tiles=tiles, acc_target=acc_target)
  if name == "ddpg":
    return ddpg_lib.make_ddpg(space, specs, config.ddpg)
  if name == "random":
    return baselines.make_random(space, pop or 32)
  if name == "exhaustive":
    return baselines.make_exhaustive(space, pop or 256)
  raise ValueError(f"agent = {name!r}; allowed: {', '.join(AGENTS)}")


def default_max_iters(budget: int, population: int) -> int:
  return 10 * math.ceil(budget / population) + 100


# ----------------------------------------------------------------------------------------------
# Loops


def initial_state(agent: Agent, budget: int, num_layers: int, seed: int) -> LoopState:
  """The loop state before the first iteration (the agent initialised from the seed)."""
  key = jax.random.PRNGKey(seed)
  k_init, k_run = jax.random.split(key)
  return LoopState(
    agent=agent.init(k_init),
    history=env_lib.empty_history(budget, num_layers, jnp),
    iteration=jnp.zeros((), jnp.int32),
    stall=jnp.zeros((), jnp.int32),
    done=jnp.zeros((), bool),
    key=k_run,
  )


def resolve_mode(mode: str, accuracy: acc_lib.AccuracySource) -> str:
  """``"auto"`` -> the source's preferred mode; ``"scan"`` needs a jittable source."""
  if mode not in MODES:
    raise ValueError(f"mode = {mode!r}; allowed: {', '.join(MODES)}")
  if mode == "auto":
    mode = accuracy.preferred_mode if accuracy.fn is not None else "loop"
  if mode == "scan" and accuracy.fn is None:
    raise ValueError(f"mode 'scan' needs a jittable accuracy source; {accuracy.name} has none")
  return mode


def make_scan_segment(
  agent: Agent,
  params: env_lib.EnvParams,
  acc_fn: Any,
  *,
  length: int,
  max_iters: int,
  stall_iters: int,
  sharding: Any = None,
  progress: ProgressFn | None = None,
  num_images: int = 0,
) -> Callable[[LoopState], LoopState]:
  """A jitted function advancing a :class:`LoopState` by ``length`` iterations (scan mode).

  ``num_images`` is recorded as each new row's ``images`` (every row is exact in scan mode).

  Iterations after ``done`` are skipped (``lax.cond``), so the result does not depend on how
  the run is cut into segments.
  """
  replicated = (
    None
    if sharding is None
    else jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  )

  def one(state: LoopState) -> LoopState:
    k_ask, k_tell = iteration_keys(state.key, state.iteration)
    pols, aux = agent.ask(state.agent, k_ask)
    if sharding is not None:  # the agent stays replicated; only the evaluation is sharded
      pols = jax.lax.with_sharding_constraint(pols, replicated)
    hist, out = env_lib.evaluate_in_graph(
      params, state.history, pols, acc_fn, state.iteration, sharding, num_images
    )
    if sharding is not None:
      out = jax.lax.with_sharding_constraint(out, replicated)
    ag, _ = agent.tell(state.agent, pols, out, aux, k_tell)
    cap = hist.accuracy.shape[0]
    new = jnp.sum(out.new.astype(jnp.int32))
    stall = jnp.where(new > 0, 0, state.stall + 1).astype(jnp.int32)
    it = state.iteration + 1
    done = (hist.count >= cap) | (it >= max_iters)
    if stall_iters > 0:
      done = done | (stall >= stall_iters)
    if progress is not None:
      rewards = jnp.where(jnp.arange(cap) < hist.count, hist.reward, -jnp.inf)
      best = jnp.max(rewards)
      speedup = 1.0 / hist.cost_ratio[jnp.argmax(rewards)]
      jax.debug.callback(
        lambda i, u, c, b, s: progress(int(i), int(u), int(c), float(b), float(s)),
        it,
        hist.count,
        cap,
        best,
        speedup,
      )
    return LoopState(agent=ag, history=hist, iteration=it, stall=stall, done=done, key=state.key)

  def step(state: LoopState, _: Any) -> tuple[LoopState, None]:
    return jax.lax.cond(state.done, lambda s: s, one, state), None

  @jax.jit
  def segment(state: LoopState) -> LoopState:
    state, _ = jax.lax.scan(step, state, None, length=length)
    return state

  return segment


def search_loop(
  agent: Agent,
  env: env_lib.SearchEnv,
  *,
  seed: int = 0,
  mode: str = "auto",
  max_iters: int = 0,
  stall_iters: int = 50,
  checkpointer: SearchCheckpointer | None = None,
  checkpoint_every: int = 0,
  scan_chunk: int = 0,
  meta: dict[str, Any] | None = None,
  sharding: Any = None,
  progress: ProgressFn | None = None,
  stop_after: int | None = None,
) -> tuple[LoopState, dict[str, Any]]:
  """Runs (or resumes) a search; ``env.history`` holds the result afterwards.

  Args:
    agent: the agent.
    env: the host environment (its budget, accuracy source, cost table, history).
    seed: the run's seed.
    mode: ``"auto"``, ``"loop"`` or ``"scan"``.
    max_iters: iteration cap (0: :func:`default_max_iters`).
    stall_iters: stop after this many iterations without a new evaluation (0 or negative:
      never; :func:`run_search` derives it from ``stall_candidates``).
    checkpointer: resume from its newest checkpoint and save to it.
    checkpoint_every: iterations between checkpoints (0: only at the end).
    scan_chunk: iterations per jitted segment (scan mode).
    meta: JSON metadata saved with checkpoints; a resumed run must have equal metadata.
    sharding: sharding of the candidate axis (scan mode).
    progress: ``progress(iteration, used, budget, best_reward, best_speedup)`` after every
      iteration (the speedup of the best-reward policy so far; :data:`ProgressFn`).
    stop_after: stop (as if interrupted) once this many iterations are done (tests).

  Returns:
    ``(final LoopState, stats)`` with ``stats = {"mode", "iterations", "wall_s", "eval_s",
    "resumed_from"}``.

  Raises:
    ValueError: a checkpoint written by a different search configuration.
    ConfigError: ``mode="scan"`` with a lazy environment (lazy evaluation runs on the host).
  """
  if env.lazy:
    if mode == "scan":
      raise ConfigError(
        "config.search.mode = 'scan' with config.search.lazy = True; allowed: 'auto' or "
        "'loop' (lazy evaluation runs in the host loop)"
      )
    resolve_mode(mode, env.accuracy)  # checks the name
    mode = "loop"
  mode = resolve_mode(mode, env.accuracy)
  max_iters = max_iters or default_max_iters(env.budget, agent.population)
  meta = dict(meta or {})
  state = initial_state(agent, env.budget, env.space.num_layers, seed)
  state, saved = _resume(checkpointer, state, meta, env)
  resumed_from = None if saved is None else int(state.iteration)
  t0 = time.perf_counter()
  wall_before = 0.0 if saved is None else float(saved.get("wall_s", 0.0))

  def save(st: LoopState) -> None:
    if checkpointer is not None:
      wall_s = wall_before + time.perf_counter() - t0
      checkpointer.save(
        st, {**_checkpoint_meta(meta, st, wall_s, env.eval_seconds, mode), "lazy_stops": env.stops}
      )

  limit = max_iters if stop_after is None else min(max_iters, stop_after)
  stop = dict(limit=limit, max_iters=max_iters, stall_iters=stall_iters, progress=progress)
  if mode == "scan":
    chunk = max(1, min(scan_chunk or checkpoint_every or max_iters, max_iters))
    state = _run_scan(agent, env, state, save, chunk=chunk, sharding=sharding, **stop)
  else:
    state = _run_loop(agent, env, state, save, checkpoint_every=checkpoint_every, **stop)
  stats = {
    "mode": mode,
    "iterations": int(state.iteration),
    "wall_s": wall_before + time.perf_counter() - t0,
    "eval_s": env.eval_seconds,
    "resumed_from": resumed_from,
  }
  return state, stats


def _resume(
  checkpointer: SearchCheckpointer | None,
  state: LoopState,
  meta: dict[str, Any],
  env: env_lib.SearchEnv,
) -> tuple[LoopState, dict[str, Any] | None]:
  """Restores the newest intact checkpoint, if any, into ``state`` and ``env``.

  Returns:
    ``(state, saved metadata)``; the metadata is None when nothing was restored.

  Raises:
    ValueError: the checkpoint was written by a different search configuration.
  """
  if checkpointer is None or not checkpointer.has_checkpoints():
    return state, None
  restored = _restore(checkpointer, state, env.num_images)
  if restored is None:
    logging.warning(
      "search: no intact checkpoint in %s; the search restarts from its beginning",
      checkpointer.directory,
    )
    return state, None
  state, saved = restored
  saved_cfg = saved.get("search")
  if saved_cfg is not None:
    saved_cfg = {**_ADDED_DEFAULTS, **saved_cfg}
  if (
    saved_cfg is not None
    and meta.get("search") is not None
    and saved_cfg != json.loads(json.dumps(meta["search"]))
  ):
    raise ValueError(
      f"{checkpointer.directory} holds a search with a different "
      f"configuration; use another workdir or the same settings"
    )
  env.set_history(state.history)
  env.eval_seconds += float(saved.get("eval_s", 0.0))
  for k in env.stops:
    env.stops[k] = int(saved.get("lazy_stops", {}).get(k, 0))
  return state, saved


def _restore(
  checkpointer: SearchCheckpointer, state: LoopState, num_images: int
) -> tuple[LoopState, dict[str, Any]] | None:
  """:meth:`SearchCheckpointer.restore_intact`, also reading checkpoints written before the
  history had ``exact``/``images`` (their rows are all exact, :func:`env_lib.upgrade_history`).

  Raises:
    CheckpointError: a checkpoint that matches neither structure (another search).
  """
  try:
    return checkpointer.restore_intact(state)  # corrupt ones: a warning each, skipped
  except CheckpointError as e:
    legacy = state._replace(history=env_lib.HistoryV1(*state.history[:7]))
    try:
      out = checkpointer.restore_intact(legacy)
    except CheckpointError:
      raise e from None
    if out is None:
      return None
    old, saved = out
    logging.info("search: read a checkpoint written before lazy evaluation (all rows exact)")
    return old._replace(history=env_lib.upgrade_history(old.history, num_images)), saved


def _checkpoint_meta(
  meta: dict[str, Any], state: LoopState, wall_s: float, eval_s: float, mode: str
) -> dict[str, Any]:
  """The JSON metadata saved with a checkpoint of ``state``."""
  return {
    **meta,
    "iteration": int(state.iteration),
    "used": int(state.history.count),
    "wall_s": wall_s,
    "eval_s": eval_s,
    "mode": mode,
  }


def _run_scan(
  agent: Agent,
  env: env_lib.SearchEnv,
  state: LoopState,
  save: Callable[[LoopState], None],
  *,
  chunk: int,
  limit: int,
  max_iters: int,
  stall_iters: int,
  sharding: Any,
  progress: ProgressFn | None,
) -> LoopState:
  """The scan-mode loop: jitted segments of ``chunk`` iterations, saved after each."""
  segment_of = functools.partial(
    make_scan_segment,
    agent,
    env.params,
    env.accuracy.fn,
    max_iters=max_iters,
    stall_iters=stall_iters,
    sharding=sharding,
    progress=progress,
    num_images=env.num_images,
  )
  segment = segment_of(length=chunk)
  state = state._replace(history=env_lib.History(*(jnp.asarray(x) for x in state.history)))
  t_eval = time.perf_counter()
  while not bool(state.done) and int(state.iteration) < limit:
    left = limit - int(state.iteration)
    if left < chunk and limit < max_iters:
      # finish exactly at ``limit`` (stop_after) with a shorter segment (tests of interruption)
      state = segment_of(length=left)(state)
    else:
      state = segment(state)
    jax.block_until_ready(state.iteration)
    save(state)
  # in scan mode accuracy is computed inside the loop; count its whole time
  env.eval_seconds += time.perf_counter() - t_eval
  env.set_history(jax.device_get(state.history))
  return state


def _best_so_far(history: env_lib.History, used: int) -> tuple[float, float]:
  """(best reward, its policy's speedup) of the first ``used`` evaluations (-inf, nan: none)."""
  if not used:
    return float("-inf"), float("nan")
  j = int(np.argmax(history.reward[:used]))
  return float(history.reward[j]), float(1.0 / history.cost_ratio[j])


def _run_loop(
  agent: Agent,
  env: env_lib.SearchEnv,
  state: LoopState,
  save: Callable[[LoopState], None],
  *,
  checkpoint_every: int,
  limit: int,
  max_iters: int,
  stall_iters: int,
  progress: ProgressFn | None,
) -> LoopState:
  """The loop mode: jitted ``ask``/``tell`` around the host environment."""
  ask = jax.jit(agent.ask)
  tell = jax.jit(agent.tell)
  ag = state.agent
  it, stall, done = int(state.iteration), int(state.stall), bool(state.done)
  key = state.key
  while not done and it < limit:
    k_ask, k_tell = iteration_keys(key, it)
    pols, aux = ask(ag, k_ask)
    out = env.evaluate(np.asarray(pols), it)
    ag, _ = tell(ag, pols, env_lib.EvalOut(*(jnp.asarray(x) for x in out)), aux, k_tell)
    stall = 0 if out.new.any() else stall + 1
    it += 1
    done = env.exhausted or it >= max_iters or (stall_iters > 0 and stall >= stall_iters)
    if progress is not None:
      progress(it, env.used, env.budget, *_best_so_far(env.history, env.used))
    if checkpoint_every and it % checkpoint_every == 0 and not done:
      save(LoopState(ag, env.history, np.int32(it), np.int32(stall), np.bool_(done), key))
  state = LoopState(
    agent=ag,
    history=env.history,
    iteration=np.asarray(it, np.int32),
    stall=np.asarray(stall, np.int32),
    done=np.asarray(done),
    key=key,
  )
  save(state)
  return state


# ----------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class SearchResult:
  """The outcome of one search.

  Attributes:
    agent: agent name.
    best_policy: int32 ``[L, 2]`` highest-reward evaluated policy.
    best_reward: its reward on the search split.
    best_accuracy: its accuracy on the search split (percent).
    best_cost_ratio: its cost ratio.
    best_speedup: ``1 / best_cost_ratio`` (latency speedup over 8/8).
    feasible: whether it meets the accuracy target.
    acc_ref: INT8 reference accuracy on the search split.
    acc_target: ``acc_ref - acc_drop``.
    acc_drop: allowed drop.
    evals_used: unique accuracy evaluations.
    budget: the budget.
    iterations: search iterations.
    wall_s: wall time of the search loop (seconds).
    eval_s: time spent in the accuracy source.
    history: the evaluation history (NumPy).
    mode: loop mode used.
    space: JSON summary of the search space.
    config: JSON of the search configuration.
    final: re-evaluation on the final source (or None): ``{"name", "acc_ref", "acc_target",
      "candidates": [{"policy", "search_accuracy", "accuracy", "cost_ratio", "speedup",
      "reward", "feasible"}], "best": {...}}``.
    report: cost report of the best policy (``cimjax.cost.layer_report``), if a target was
      given.
    image_passes: image-forward passes of the search: candidates x search images actually
      scored (``sum(history.images)``; the reference policy's measurement not included; 0
      for sources without images).
    lazy: lazy evaluation's figures (None when off): ``{"chunk", "alpha", "alpha_look",
      "looks", "top_k", "exact", "stopped_by_test", "stopped_by_bound", "image_passes_full"}``
      (``image_passes_full``: what scoring every candidate on every image would have cost).
  """

  agent: str
  best_policy: np.ndarray
  best_reward: float
  best_accuracy: float
  best_cost_ratio: float
  best_speedup: float
  feasible: bool
  acc_ref: float
  acc_target: float
  acc_drop: float
  evals_used: int
  budget: int
  iterations: int
  wall_s: float
  eval_s: float
  history: env_lib.History
  mode: str
  space: dict[str, Any]
  config: dict[str, Any]
  final: dict[str, Any] | None = None
  report: dict[str, Any] | None = None
  image_passes: int = 0
  lazy: dict[str, Any] | None = None

  def curve(self) -> np.ndarray:
    """Best reward after each evaluation, float64 ``[evals_used]``."""
    return env_lib.best_so_far(self.history)

  def best_at(self, evals: int) -> dict[str, Any]:
    """The best candidate among the first ``evals`` evaluations (anytime result)."""
    return best_within(self.history, evals, self.acc_target)

  def pareto(self) -> list[dict[str, Any]]:
    """Non-dominated (cost ratio, accuracy) candidates over all evaluations."""
    n = self.evals_used
    h = self.history
    idx = env_lib.pareto_front(h.cost_ratio[:n], h.accuracy[:n])
    return [
      {
        "policy": h.policies[i].astype(int).tolist(),
        "accuracy": float(h.accuracy[i]),
        "cost_ratio": float(h.cost_ratio[i]),
        "speedup": float(1.0 / h.cost_ratio[i]),
        "reward": float(h.reward[i]),
        "feasible": bool(h.accuracy[i] >= np.float32(self.acc_target)),
      }
      for i in idx
    ]

  def summary(self) -> dict[str, Any]:
    """JSON-ready summary (no history)."""
    out = {k: getattr(self, k) for k in _SUMMARY_FIELDS}
    out["best_policy"] = np.asarray(self.best_policy).astype(int).tolist()
    if self.report is not None:
      out.update(_report_summary(self.report))
    return out


_SUMMARY_FIELDS = (
  "agent",
  "best_reward",
  "best_accuracy",
  "best_cost_ratio",
  "best_speedup",
  "feasible",
  "acc_ref",
  "acc_target",
  "acc_drop",
  "evals_used",
  "budget",
  "iterations",
  "wall_s",
  "eval_s",
  "mode",
  "space",
  "config",
  "final",
  "image_passes",
  "lazy",
)


def _report_summary(report: dict[str, Any]) -> dict[str, Any]:
  """The cost report's totals and layers for :meth:`SearchResult.summary`."""
  return {
    "latency_us": report["total_latency_us"],
    "baseline_latency_us": report["baseline_latency_us"],
    "energy_pj": report["total_energy_pj"],
    "baseline_energy_pj": report["baseline_energy_pj"],
    "energy_ratio": report["total_energy_pj"] / report["baseline_energy_pj"],
    "latency_speedup": report["speedup"],
    "layers": report["layers"],
  }


def best_within(history: env_lib.History, evals: int, acc_target: float) -> dict[str, Any]:
  """Best (highest-reward) candidate among the first ``evals`` evaluations."""
  n = min(int(history.count), int(evals))
  if n == 0:
    return {
      "reward": float("-inf"),
      "speedup": float("nan"),
      "accuracy": float("nan"),
      "feasible": False,
      "policy": None,
      "evals": 0,
    }
  r = np.asarray(history.reward[:n], np.float64)
  i = int(np.argmax(r))
  return {
    "reward": float(r[i]),
    "speedup": float(1.0 / history.cost_ratio[i]),
    "accuracy": float(history.accuracy[i]),
    "feasible": bool(history.accuracy[i] >= np.float32(acc_target)),
    "policy": history.policies[i].astype(int).tolist(),
    "evals": n,
  }


def evals_to_reach(
  history: env_lib.History,
  acc_target: float,
  *,
  speedup: float | None = None,
  reward: float | None = None,
) -> int | None:
  """First evaluation count at which the best-so-far reaches a level (None: never).

  Args:
    history: the history.
    acc_target: the accuracy target (feasibility for ``speedup``).
    speedup: a feasible speedup to reach.
    reward: a reward to reach.
  """
  n = int(history.count)
  if n == 0:
    return None
  if reward is not None:
    hit = np.flatnonzero(
      np.maximum.accumulate(np.asarray(history.reward[:n], np.float64)) >= reward
    )
  else:
    ok = np.asarray(history.accuracy[:n]) >= np.float32(acc_target)
    sp = np.where(ok, 1.0 / np.asarray(history.cost_ratio[:n], np.float64), 0.0)
    hit = np.flatnonzero(np.maximum.accumulate(sp) >= speedup)
  return int(hit[0]) + 1 if hit.size else None


def make_result(
  agent: Agent, env: env_lib.SearchEnv, stats: dict[str, Any], config: SearchConfig | None = None
) -> SearchResult:
  """Builds a :class:`SearchResult` from a finished loop."""
  h = env.history
  i = env_lib.best_index(h)
  if i < 0:
    raise RuntimeError("the search evaluated no candidate")
  pol = h.policies[i].astype(np.int32)
  return SearchResult(
    agent=agent.name,
    best_policy=pol,
    best_reward=float(h.reward[i]),
    best_accuracy=float(h.accuracy[i]),
    best_cost_ratio=float(h.cost_ratio[i]),
    best_speedup=float(1.0 / h.cost_ratio[i]),
    feasible=bool(h.accuracy[i] >= np.float32(env.acc_target)),
    acc_ref=env.acc_ref,
    acc_target=env.acc_target,
    acc_drop=env.acc_drop,
    evals_used=env.used,
    budget=env.budget,
    iterations=int(stats["iterations"]),
    wall_s=float(stats["wall_s"]),
    eval_s=float(stats["eval_s"]),
    history=env_lib.History(*(np.asarray(x) for x in h)),
    mode=stats["mode"],
    space=env.space.describe(),
    config=config.to_dict() if config is not None else dict(agent.config),
    image_passes=env.image_passes,
    lazy=lazy_summary(env),
  )


def lazy_summary(env: env_lib.SearchEnv) -> dict[str, Any] | None:
  """Lazy evaluation's figures of a finished environment (see :class:`SearchResult`)."""
  plan = env.lazy_plan
  if plan is None:
    return None
  n = env.used
  return {
    "chunk": plan.chunk,
    "alpha": plan.alpha,
    "alpha_look": plan.alpha_look,
    "looks": plan.looks.astype(int).tolist(),
    "top_k": plan.top_k,
    "exact": int(np.sum(env.history.exact[:n])),
    "stopped_by_test": int(env.stops["test"]),
    "stopped_by_bound": int(env.stops["bound"]),
    "image_passes_full": n * int(plan.num_images),
  }


def reevaluate(
  result: SearchResult,
  final: acc_lib.AccuracySource,
  cost_table: Any,
  top_k: int = 5,
  acc_ref: float | None = None,
) -> dict[str, Any]:
  """Re-evaluates the ``top_k`` search candidates on a second source (another split).

  The search's winner is the highest noisy reward of many candidates (the winner's curse); its
  accuracy on an independent split says whether it really meets the target. The
  candidates' final-split rewards are reported; ``best`` is the search's winner (selection is
  not redone on the final split, which may be the test split).

  Where the source has ``correct_images`` (a :class:`~cimjax.search.DataAccuracy`), each
  candidate is also compared with the INT8 reference *on the same images* (a paired
  comparison): ``acc_diff`` (points, candidate minus reference), ``diff_se`` (its standard
  error, points: ``100 * sd(d) / sqrt(n)`` over the per-image differences ``d`` in {-1, 0, 1},
  which only the images where the two disagree make nonzero) and ``discordant``
  (``[images only the candidate gets right, images only the reference gets right]``). The
  accuracies are then the row means of the same per-image results.

  Returns:
    ``{"name", "acc_ref", "acc_target", "candidates": [...], "best": {...}}`` (with paired
    statistics also ``"paired": True`` and ``"images"``).
  """
  h = result.history
  n = result.evals_used
  order = np.argsort(-np.asarray(h.reward[:n], np.float64), kind="stable")[: max(top_k, 1)]
  pols = h.policies[order].astype(np.int32)
  ref_pol = policy_lib.uniform_policy(
    pols.shape[1], result.space["io_bits"], result.space["io_bits"]
  )
  paired = callable(getattr(final, "correct_images", None))
  if paired:
    hits = np.asarray(final.correct_images(np.concatenate([ref_pol[None], pols])), bool)
    images = hits.shape[1]
    acc_all = 100.0 * hits.sum(axis=1, dtype=np.int64) / images
    acc = acc_all[1:]
    if acc_ref is None:
      acc_ref = float(acc_all[0])
    d = hits[1:].astype(np.int64) - hits[0].astype(np.int64)  # [k, images] in {-1, 0, 1}
    wins, losses = np.sum(d > 0, axis=1), np.sum(d < 0, axis=1)
    diff = acc - acc_all[0]
    se = 100.0 * np.std(d, axis=1) / math.sqrt(images)  # population sd of d; SE of its mean
  else:
    if acc_ref is None:
      acc_ref = float(final(ref_pol[None])[0])
    acc = np.asarray(final(pols), np.float64)
  target = acc_ref - result.acc_drop
  table = np.asarray(cost_table, np.float64)
  ratio = cost_lib.policy_cost(table, pols) / cost_lib.policy_cost(table, ref_pol)
  from cimjax.search import reward as reward_lib  # pylint: disable=g-import-not-at-top

  rew = reward_lib.reward(acc, ratio, target, xp=np)
  cands = []
  for j in range(len(order)):
    c = {
      "policy": pols[j].tolist(),
      "search_accuracy": float(h.accuracy[order[j]]),
      "search_reward": float(h.reward[order[j]]),
      "accuracy": float(acc[j]),
      "cost_ratio": float(ratio[j]),
      "speedup": float(1.0 / ratio[j]),
      "reward": float(rew[j]),
      "feasible": bool(acc[j] >= target),
    }
    if paired:
      c.update(
        acc_diff=float(diff[j]),
        diff_se=float(se[j]),
        discordant=[int(wins[j]), int(losses[j])],
      )
    cands.append(c)
  out = {
    "name": final.name,
    "acc_ref": acc_ref,
    "acc_target": target,
    "candidates": cands,
    "best": cands[0],
  }
  if paired:
    out.update(paired=True, images=int(images))
  return out


# ----------------------------------------------------------------------------------------------
# Entry point


def run_search(
  model_def: Any,
  specs: Sequence[LayerSpec],
  tables: Any,
  accuracy: acc_lib.AccuracySource,
  config: SearchConfig = SearchConfig(),
  *,
  hw: hw_lib.HardwareTarget | None = None,
  final_accuracy: acc_lib.AccuracySource | None = None,
  workdir: str | os.PathLike[str] | None = None,
  sharding: Any = None,
  progress: ProgressFn | None = None,
  plots: bool = True,
  acc_ref: float | None = None,
  stop_after: int | None = None,
) -> SearchResult:
  """Searches per-layer bit-widths of a model on a target.

  Args:
    model_def: the :class:`cimjax.models.ModelDef` (its name goes into the report), or None.
    specs: layer geometry in policy order.
    tables: :class:`cimjax.cost.CostTables` (NumPy, float64 preferred) of the model on ``hw``.
    accuracy: accuracy source on the search split.
    config: search configuration.
    hw: the hardware target (cell bits, cost report); optional.
    final_accuracy: source on a separate split to re-evaluate the best candidates.
    workdir: where checkpoints and outputs go (None: nothing is written). In a
      multi-process run every process passes the same (shared) directory: orbax writes the
      checkpoints collectively and process 0 writes the outputs.
    sharding: candidate-axis sharding (scan mode).
    progress: per-iteration callback.
    plots: write the PNG plots (with a workdir).
    acc_ref: INT8 reference accuracy (default: measured on the search split).
    stop_after: stop after this many iterations without finishing (tests of resumption).

  Returns:
    The :class:`SearchResult` (also written to ``workdir``).
  """
  cfg = config
  latency = np.asarray(getattr(tables, "latency_us", tables), np.float64)
  env = make_env(specs, latency, accuracy, cfg, hw=hw, acc_ref=acc_ref)
  agent = make_agent(
    cfg.agent,
    env.space,
    specs,
    latency,
    cfg,
    tiles=getattr(tables, "tiles", None),
    acc_target=env.acc_target,
  )
  meta = {
    "search": cfg.to_dict(),
    "agent": agent.config,
    "acc_ref": env.acc_ref,
    "model": getattr(model_def, "name", None),
    "hw": hw.name if hw else None,
  }
  final_state, stats = _configured_loop(
    agent, env, cfg, meta, workdir, sharding=sharding, progress=progress, stop_after=stop_after
  )
  result = make_result(agent, env, stats, cfg)
  if hw is not None:
    result.report = cost_lib.layer_report(specs, hw, result.best_policy)
  if final_accuracy is not None:
    result.final = reevaluate(result, final_accuracy, latency, cfg.final_top_k)
  if workdir is not None and bool(final_state.done) and jax.process_index() == 0:
    write_outputs(
      result, workdir, specs=specs, hw=hw, model_name=getattr(model_def, "name", None), plots=plots
    )
  return result


def _configured_loop(
  agent: Agent,
  env: env_lib.SearchEnv,
  cfg: SearchConfig,
  meta: dict[str, Any],
  workdir: str | os.PathLike[str] | None,
  **kwargs: Any,
) -> tuple[LoopState, dict[str, Any]]:
  """:func:`search_loop` with the configuration's settings, checkpointed under ``workdir``."""
  ckpt = SearchCheckpointer(Path(workdir) / "checkpoints") if workdir is not None else None
  stall = cfg.stall_iters or math.ceil(cfg.stall_candidates / agent.population)
  try:
    return search_loop(
      agent,
      env,
      seed=cfg.seed,
      mode=cfg.mode,
      max_iters=cfg.max_iters,
      stall_iters=max(stall, 0),
      checkpointer=ckpt,
      checkpoint_every=cfg.checkpoint_every,
      scan_chunk=cfg.scan_chunk,
      meta=meta,
      **kwargs,
    )
  finally:
    if ckpt is not None:
      ckpt.close()


def make_env(
  specs: Sequence[LayerSpec],
  cost_table: Any,
  accuracy: acc_lib.AccuracySource,
  config: SearchConfig = SearchConfig(),
  *,
  hw: hw_lib.HardwareTarget | None = None,
  acc_ref: float | None = None,
) -> env_lib.SearchEnv:
  """The search space and host environment of :func:`run_search`.

  Args:
    specs: layer geometry in policy order.
    cost_table: float64 ``[L, 8, 8]`` latency table.
    accuracy: accuracy source on the search split.
    config: the search configuration (constraint, bits, budget, accuracy drop).
    hw: the hardware target (its cell bits unless the configuration sets them).
    acc_ref: INT8 reference accuracy (default: measured on the search split).
  """
  cfg = config
  cell = cfg.cell_bits if cfg.cell_bits is not None else (hw.cell_bits if hw else None)
  space = space_lib.make_space(len(specs), cfg.constraint, cell, cfg.min_bits, cfg.max_bits)
  budget = cfg.budget
  if cfg.agent == "exhaustive" and not budget:
    budget = space.size
  return env_lib.SearchEnv(
    space,
    cost_table,
    accuracy,
    acc_drop=cfg.acc_drop,
    budget=budget,
    acc_ref=acc_ref,
    layer_names=[s.name for s in specs],
    lazy=cfg.lazy_config(),
  )


def write_outputs(
  result: SearchResult,
  workdir: str | os.PathLike[str],
  *,
  specs: Sequence[LayerSpec] | None = None,
  hw: hw_lib.HardwareTarget | None = None,
  model_name: str | None = None,
  plots: bool = True,
) -> dict[str, Path]:
  """Writes a search's outputs atomically (temporary file + rename).

  Files: ``best_policy.npy`` (CIM-AQ format), ``report.json``, ``pareto.json``,
  ``history.npz`` and, with ``plots``, ``pareto.png``, ``bits.png``, ``latency.png``.

  Returns:
    ``{name: path}`` of the files written.
  """
  from cimjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  out: dict[str, Path] = {}
  out["best_policy"] = policy_lib.save_policy(wd / "best_policy.npy", result.best_policy)
  rep = {"model": model_name, "hw": hw.name if hw else None, **result.summary()}
  out["report"] = ckpt_lib.write_json_atomic(wd / "report.json", rep)
  front = result.pareto()
  out["pareto"] = ckpt_lib.write_json_atomic(
    wd / "pareto.json",
    {"acc_ref": result.acc_ref, "acc_target": result.acc_target, "points": front},
  )
  n = result.evals_used
  h = result.history
  out["history"] = _atomic_npz(
    wd / "history.npz",
    policies=h.policies[:n],
    accuracy=h.accuracy[:n],
    cost_ratio=h.cost_ratio[:n],
    reward=h.reward[:n],
    iteration=h.iteration[:n],
    exact=h.exact[:n],
    images=h.images[:n],
  )
  if plots:
    from cimjax.search import plots as plots_lib  # pylint: disable=g-import-not-at-top

    out.update(plots_lib.write_plots(result, wd, specs=specs, hw=hw))
  return out


def _atomic_npz(path: Path, **arrays: Any) -> Path:
  acc_lib._save_npz(path, **arrays)  # pylint: disable=protected-access
  return path


__all__ = [
  "AGENTS",
  "MODES",
  "SearchConfig",
  "SearchResult",
  "best_within",
  "default_max_iters",
  "evals_to_reach",
  "initial_state",
  "make_agent",
  "make_env",
  "make_result",
  "make_scan_segment",
  "reevaluate",
  "resolve_mode",
  "run_search",
  "search_loop",
  "write_outputs",
]
