"""The search environment: cost tables + an accuracy source -> (accuracy, cost ratio, reward).

Budget and cache semantics (shared by every agent, in and out of ``jit``):

- The **budget** is the number of *unique* policies whose accuracy was evaluated. A
  :class:`History` of capacity ``budget`` records each one once, in the order they were first
  evaluated (``history.count`` is the budget used).
- A policy already in the history is never evaluated again: a repeat, in a later batch or
  within the same batch, gets the recorded values and costs nothing. Repeats are *valid*
  samples: agents learn from them.
- When a batch holds more new policies than the budget has left, the first ones (in batch
  order) are evaluated and the rest are marked invalid (``valid = False``, reward 0): agents
  ignore invalid samples, and the search stops once the budget is spent.
- The INT8 reference accuracy (``acc_ref``, the uniform ``io_bits`` policy, CIM-AQ's
  ``org_acc``) is measured once when the environment is built and is not counted.

Two implementations with the same semantics:

- :func:`evaluate_in_graph`: pure and jittable (accuracy source with a ``fn``); the history is
  a fixed-size pytree and lookups are exact key comparisons
  (:func:`cimjax.search.space.policy_keys`).
- :class:`SearchEnv`: on the host, with a dict cache keyed by the policy bytes, for sources
  that are not jittable or faster outside ``jit`` (the batched evaluator on CPU). Only new
  policies reach the accuracy source. Optionally *lazy* (``lazy=LazyConfig(...)``): new
  policies are scored in chunks of images and stop early when a sequential test shows them
  below the accuracy target or when they can no longer be the winner nor enter the top-k
  re-evaluated at the end (:mod:`cimjax.search.lazy`: the rules, the error rate, what a
  stopped row records). The budget semantics above are unchanged.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import cost as cost_lib
from cimjax.errors import ConfigError
from cimjax.search import accuracy as acc_lib
from cimjax.search import lazy as lazy_lib
from cimjax.search import reward as reward_lib
from cimjax.search import space as space_lib

Array = Any


class History(NamedTuple):
  """Every evaluated policy of one search, in evaluation order (a fixed-capacity pytree).

  Attributes:
    policies: int8 ``[cap, L, 2]``; rows ``>= count`` are zero.
    keys: int32 ``[cap, K]`` exact policy keys.
    accuracy: float32 ``[cap]`` accuracy in percent on the search split.
    cost_ratio: float32 ``[cap]`` cost / baseline cost.
    reward: float32 ``[cap]`` CIM-AQ reward.
    iteration: int32 ``[cap]`` search iteration that first evaluated the row.
    count: int32 ``[]`` rows filled = unique evaluations = budget used.
    exact: bool ``[cap]`` the row was scored on the whole search split (False: stopped early
      by lazy evaluation, :mod:`cimjax.search.lazy`; its accuracy is the estimate on the
      images scored and its reward that estimate's).
    images: int32 ``[cap]`` search images scored for the row (0 for sources without images,
      e.g. synthetic models); ``sum(images)`` is the search's image-forward passes.
  """

  policies: Array
  keys: Array
  accuracy: Array
  cost_ratio: Array
  reward: Array
  iteration: Array
  count: Array
  exact: Array
  images: Array


class HistoryV1(NamedTuple):
  """:class:`History` as checkpoints before lazy evaluation stored it (no ``exact``,
  ``images``); :func:`upgrade_history` reads one."""

  policies: Array
  keys: Array
  accuracy: Array
  cost_ratio: Array
  reward: Array
  iteration: Array
  count: Array


def upgrade_history(old: HistoryV1, num_images: int) -> History:
  """A :class:`History` from a :class:`HistoryV1`: every filled row exact, on ``num_images``."""
  count = int(np.asarray(old.count))
  cap = np.asarray(old.accuracy).shape[0]
  filled = np.arange(cap) < count
  return History(
    *(np.asarray(x) for x in old),
    exact=filled,
    images=np.where(filled, num_images, 0).astype(np.int32),
  )


class EnvParams(NamedTuple):
  """Array inputs of the jittable environment.

  Attributes:
    cost_table: float32 ``[L, 8, 8]`` cost per layer (latency by default).
    baseline: float32 ``[]`` cost of the reference policy (uniform 8/8).
    acc_target: float32 ``[]`` ``acc_ref - acc_drop``.
  """

  cost_table: Array
  baseline: Array
  acc_target: Array


class EvalOut(NamedTuple):
  """Per-candidate results of one batch.

  Attributes:
    accuracy: ``[N]`` percent (0 where invalid).
    cost_ratio: ``[N]``.
    reward: ``[N]`` (0 where invalid).
    valid: bool ``[N]``: evaluated now or before (False: over budget).
    new: bool ``[N]``: evaluated by this call (first occurrence of a new policy).
    slot: int32 ``[N]``: history row (-1 where invalid).
  """

  accuracy: Array
  cost_ratio: Array
  reward: Array
  valid: Array
  new: Array
  slot: Array


def empty_history(capacity: int, num_layers: int, xp: Any = jnp) -> History:
  """An empty history of ``capacity`` rows (``xp``: ``jax.numpy`` or ``numpy``)."""
  k = -(-num_layers // space_lib.CODES_PER_WORD)
  return History(
    policies=xp.zeros((capacity, num_layers, 2), xp.int8),
    keys=xp.full((capacity, k), -1, xp.int32),
    accuracy=xp.zeros((capacity,), xp.float32),
    cost_ratio=xp.zeros((capacity,), xp.float32),
    reward=xp.zeros((capacity,), xp.float32),
    iteration=xp.zeros((capacity,), xp.int32),
    count=xp.asarray(0, xp.int32),
    exact=xp.zeros((capacity,), bool),
    images=xp.zeros((capacity,), xp.int32),
  )


def make_params(
  cost_table: Array, acc_target: float, baseline_bits: tuple[int, int] = (8, 8)
) -> EnvParams:
  """:class:`EnvParams` from a ``[L, 8, 8]`` cost table (e.g. ``CostTables.latency_us``)."""
  table = np.asarray(cost_table, np.float64)
  base = float(cost_lib.baseline_cost(table, baseline_bits))
  return EnvParams(
    cost_table=jnp.asarray(table, jnp.float32),
    baseline=jnp.asarray(base, jnp.float32),
    acc_target=jnp.asarray(acc_target, jnp.float32),
  )


def cost_ratio(params: EnvParams, policies: jax.Array) -> jax.Array:
  """float32 ``[N]`` cost ratio of int ``[N, L, 2]`` policies (jittable)."""
  return cost_lib.policy_cost(params.cost_table, policies) / params.baseline


def score(params: EnvParams, acc: jax.Array, policies: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(cost_ratio [N], reward [N])`` of policies with accuracies ``acc`` (jittable)."""
  cost = cost_lib.policy_cost(params.cost_table, policies)
  ratio = cost / params.baseline
  return ratio, reward_lib.reward(acc, ratio, params.acc_target, speedup=params.baseline / cost)


def evaluate_in_graph(
  params: EnvParams,
  history: History,
  policies: jax.Array,
  acc_fn: Any,
  iteration: jax.Array | int = 0,
  sharding: Any = None,
  num_images: int = 0,
) -> tuple[History, EvalOut]:
  """Scores a batch with the cache and budget semantics of the module docstring (jittable).

  The accuracy function runs on the whole batch (shapes are static); values of policies
  already in the history are taken from it, so a repeat never changes what was recorded.
  Every row is exact (lazy evaluation is host-only, :class:`SearchEnv`).

  Args:
    params: environment arrays.
    history: the search's history; its capacity is the budget.
    policies: int ``[N, L, 2]`` inside the search space.
    acc_fn: pure ``int32 [N, L, 2] -> float32 [N]`` accuracy in percent.
    iteration: current search iteration (recorded with new rows).
    sharding: optional ``jax.sharding.Sharding`` of the candidate axis (the population is
      evaluated sharded over devices; results are identical).
    num_images: search images per evaluation (recorded as each new row's ``images``; static).

  Returns:
    ``(history, EvalOut)``.
  """
  policies = jnp.asarray(policies, jnp.int32)
  keys = space_lib.policy_keys(policies)  # [N, K]
  slot_new, ok_new, slot, valid = _locate(history, keys)
  policies, acc = _batch_accuracy(acc_fn, policies, sharding)
  ratio, rew = score(params, acc, policies)
  history = _write_rows(
    history, ok_new, slot_new, policies, keys, acc, ratio, rew, iteration, num_images
  )
  cap = history.accuracy.shape[0]
  safe = jnp.clip(slot, 0, cap - 1)
  zero = jnp.zeros((), jnp.float32)
  out = EvalOut(
    accuracy=jnp.where(valid, history.accuracy[safe], zero),
    cost_ratio=jnp.where(valid, history.cost_ratio[safe], ratio),
    reward=jnp.where(valid, history.reward[safe], zero),
    valid=valid,
    new=ok_new,
    slot=jnp.where(valid, slot, -1).astype(jnp.int32),
  )
  return history, out


def _locate(history: History, keys: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Where each candidate of a batch stands in the history (jittable).

  Args:
    history: the history.
    keys: int32 ``[N, K]`` the candidates' keys.

  Returns:
    ``(slot_new, ok_new, slot, valid)``, each ``[N]``: the row a new candidate would take, whether
    it is the first occurrence of a new policy that fits in the budget, the row holding each
    candidate's values (its own, an earlier one's or the history's) and whether it has one.
  """
  n = keys.shape[0]
  cap = history.accuracy.shape[0]
  filled = jnp.arange(cap) < history.count
  match = jnp.all(keys[:, None, :] == history.keys[None, :, :], axis=-1) & filled[None]
  in_hist = jnp.any(match, axis=1)
  hist_idx = jnp.argmax(match, axis=1).astype(jnp.int32)
  same = jnp.all(keys[:, None, :] == keys[None, :, :], axis=-1)  # [N, N]
  first_idx = jnp.argmax(same, axis=1).astype(jnp.int32)  # first occurrence
  is_first = first_idx == jnp.arange(n, dtype=jnp.int32)
  is_new = is_first & ~in_hist
  slot_new = history.count + jnp.cumsum(is_new.astype(jnp.int32)) - 1
  ok_new = is_new & (slot_new < cap)
  slot = jnp.where(in_hist, hist_idx, slot_new[first_idx])
  valid = in_hist | ok_new[first_idx]
  return slot_new, ok_new, slot, valid


def _batch_accuracy(acc_fn: Any, policies: jax.Array, sharding: Any) -> tuple[jax.Array, jax.Array]:
  """``(policies, float32 accuracy [N])`` of the whole batch, optionally sharded (jittable)."""
  if sharding is None:
    return policies, jnp.asarray(acc_fn(policies), jnp.float32)
  # only the accuracy function runs sharded over the candidate axis; everything else (the
  # agent's reductions over candidates included) stays replicated, so results are identical
  rep = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  policies = jax.lax.with_sharding_constraint(policies, rep)
  acc = acc_fn(jax.lax.with_sharding_constraint(policies, sharding))
  return policies, jax.lax.with_sharding_constraint(jnp.asarray(acc, jnp.float32), rep)


def _write_rows(
  history: History,
  ok_new: jax.Array,
  slot_new: jax.Array,
  policies: jax.Array,
  keys: jax.Array,
  acc: jax.Array,
  ratio: jax.Array,
  rew: jax.Array,
  iteration: jax.Array | int,
  num_images: int = 0,
) -> History:
  """Records the new candidates (``ok_new``) at their rows ``slot_new`` (jittable, all exact)."""
  n = policies.shape[0]
  cap = history.accuracy.shape[0]
  write = jnp.where(ok_new, slot_new, cap)  # out-of-range rows are dropped
  return History(
    policies=history.policies.at[write].set(policies.astype(jnp.int8), mode="drop"),
    keys=history.keys.at[write].set(keys, mode="drop"),
    accuracy=history.accuracy.at[write].set(acc, mode="drop"),
    cost_ratio=history.cost_ratio.at[write].set(ratio.astype(jnp.float32), mode="drop"),
    reward=history.reward.at[write].set(rew.astype(jnp.float32), mode="drop"),
    iteration=history.iteration.at[write].set(jnp.full((n,), iteration, jnp.int32), mode="drop"),
    count=history.count + jnp.sum(ok_new).astype(jnp.int32),
    exact=history.exact.at[write].set(jnp.ones((n,), bool), mode="drop"),
    images=history.images.at[write].set(jnp.full((n,), num_images, jnp.int32), mode="drop"),
  )


class SearchEnv:
  """The host-side environment (cache dict + budget counter) of one search.

  Args:
    space: the search space; every batch is checked against it (a policy outside raises
      :class:`cimjax.policy.PolicyError` naming the candidate and layer).
    cost_table: ``[L, 8, 8]`` cost table or a :class:`cimjax.cost.CostTables` (its latency).
    accuracy: the accuracy source.
    acc_drop: allowed drop in percentage points.
    budget: unique evaluations allowed (the history's capacity).
    acc_ref: reference accuracy; default: measured on the space's reference policy.
    layer_names: for error messages.
    lazy: lazy evaluation settings (None: every new policy scored on the whole split). Needs
      a source with ``num_images`` and ``chunk_correct``
      (:func:`cimjax.search.lazy.supports_chunks`).

  Attributes:
    params: :class:`EnvParams` (for the jitted path).
    history: NumPy :class:`History`.
    acc_ref, acc_target: floats (percent).
    eval_seconds: wall time spent in the accuracy source.
    num_images: search images per full evaluation (0: a source without images).
    lazy_plan: the :class:`cimjax.search.lazy.LazyPlan`, or None.
    stops: ``{"test": n, "bound": n}`` candidates stopped by each rule (lazy).

  Raises:
    ConfigError: ``lazy`` with a source that cannot score chunks of images.
  """

  def __init__(
    self,
    space: space_lib.SearchSpace,
    cost_table: Any,
    accuracy: acc_lib.AccuracySource,
    *,
    acc_drop: float,
    budget: int,
    acc_ref: float | None = None,
    layer_names: list[str] | None = None,
    lazy: lazy_lib.LazyConfig | None = None,
  ):
    if not isinstance(budget, (int, np.integer)) or budget < 1:
      raise ValueError(f"budget = {budget!r}; allowed: an integer >= 1")
    table = getattr(cost_table, "latency_us", cost_table)
    self.table = np.asarray(table, np.float64)
    if self.table.shape != (space.num_layers, space_lib.TABLE_BITS, space_lib.TABLE_BITS):
      raise ValueError(
        f"cost table has shape {self.table.shape}; expected [{space.num_layers}, 8, 8]"
      )
    self.space, self.accuracy, self.budget = space, accuracy, int(budget)
    self.layer_names = layer_names
    self.eval_seconds = 0.0
    ref = space.reference_policy()
    self.baseline = float(cost_lib.policy_cost(self.table, ref))
    if acc_ref is None:
      t0 = time.perf_counter()
      acc_ref = float(accuracy(ref[None])[0])
      self.eval_seconds += time.perf_counter() - t0
    self.acc_ref = float(acc_ref)
    self.acc_drop = float(acc_drop)
    self.acc_target = reward_lib.accuracy_target(self.acc_ref, acc_drop)
    self.params = EnvParams(
      cost_table=jnp.asarray(self.table, jnp.float32),
      baseline=jnp.asarray(self.baseline, jnp.float32),
      acc_target=jnp.asarray(self.acc_target, jnp.float32),
    )
    self.history = empty_history(self.budget, space.num_layers, np)
    self._cache: dict[bytes, int] = {}
    self.num_images = int(getattr(accuracy, "num_images", 0) or 0)
    self.stops = {"test": 0, "bound": 0}
    self.lazy_plan = None
    if lazy is not None:
      if not lazy_lib.supports_chunks(accuracy):
        raise ConfigError(
          f"config.search.lazy = True needs an accuracy source that scores chunks of images "
          f"(DataAccuracy, MemoAccuracy of one, PerImageAccuracy); {accuracy.name} cannot"
        )
      self.lazy_plan = lazy_lib.make_plan(self.num_images, self.acc_target, lazy, self.budget)

  @property
  def lazy(self) -> bool:
    """Whether new policies are evaluated lazily."""
    return self.lazy_plan is not None

  @property
  def image_passes(self) -> int:
    """Candidates x images scored so far (the reference policy's evaluation not included)."""
    h = self.history
    return int(np.sum(np.asarray(h.images[: int(h.count)], np.int64)))

  @property
  def used(self) -> int:
    """Unique evaluations so far."""
    return int(self.history.count)

  @property
  def remaining(self) -> int:
    return self.budget - self.used

  @property
  def exhausted(self) -> bool:
    return self.used >= self.budget

  def set_history(self, history: History) -> None:
    """Replaces the history (after a restore) and rebuilds the cache from it."""
    h = History(*(np.array(x) for x in history))
    if h.accuracy.shape[0] != self.budget:
      raise ValueError(f"history capacity {h.accuracy.shape[0]} != budget {self.budget}")
    self.history = h
    self._cache = {space_lib.policy_bytes(h.policies[i]): i for i in range(int(h.count))}

  def evaluate(self, policies: Array, iteration: int = 0) -> EvalOut:
    """Scores a batch (see the module docstring). NumPy in and out.

    Args:
      policies: int ``[N, L, 2]`` inside the space.
      iteration: current search iteration (recorded with new rows).

    Returns:
      :class:`EvalOut` of NumPy arrays.
    """
    pols = np.asarray(policies)
    if pols.ndim == 2:
      pols = pols[None]
    self.space.check(pols, self.layer_names)
    pols = pols.astype(np.int32)
    slot, valid, new, todo = self._assign(pols)
    if todo:
      self._record(pols[todo], iteration)
    h = self.history
    safe = np.clip(slot, 0, self.budget - 1)
    ratio_all = (cost_lib.policy_cost(self.table, pols) / self.baseline).astype(np.float32)
    return EvalOut(
      accuracy=np.where(valid, h.accuracy[safe], 0.0).astype(np.float32),
      cost_ratio=np.where(valid, h.cost_ratio[safe], ratio_all).astype(np.float32),
      reward=np.where(valid, h.reward[safe], 0.0).astype(np.float32),
      valid=valid,
      new=new,
      slot=slot.astype(np.int32),
    )

  def _assign(self, pols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """History rows of a batch: cached policies keep theirs, new ones get the next free rows
    while the budget lasts (repeats within the batch share their first occurrence's).

    Returns:
      ``(slot int64 [N] (-1: none), valid bool [N], new bool [N], todo)``, ``todo`` the
      indices of the candidates to evaluate, in batch order.
    """
    n = pols.shape[0]
    slot = np.full((n,), -1, np.int64)
    valid = np.zeros((n,), bool)
    new = np.zeros((n,), bool)
    pending: dict[bytes, int] = {}
    todo: list[int] = []
    count = int(self.history.count)
    for i in range(n):
      k = space_lib.policy_bytes(pols[i])
      if k in self._cache:
        slot[i], valid[i] = self._cache[k], True
      elif k in pending:
        j = pending[k]
        slot[i], valid[i] = slot[j], valid[j]
      else:
        pending[k] = i
        if count + len(todo) < self.budget:
          slot[i], valid[i], new[i] = count + len(todo), True, True
          todo.append(i)
    return slot, valid, new, todo

  def _record(self, sel: np.ndarray, iteration: int) -> None:
    """Evaluates new policies ``sel`` (int32 ``[M, L, 2]``) and appends them to the history."""
    cost = cost_lib.policy_cost(self.table, sel)
    ratio = cost / self.baseline
    t0 = time.perf_counter()
    if self.lazy_plan is None:
      acc = np.asarray(self.accuracy(sel), np.float64)
      exact = np.ones(len(sel), bool)
      images = np.full(len(sel), self.num_images, np.int64)
    else:
      acc, exact, images = self._lazy_accuracy(sel, ratio, self.baseline / cost)
    self.eval_seconds += time.perf_counter() - t0
    rew = reward_lib.reward(acc, ratio, self.acc_target, xp=np, speedup=self.baseline / cost)
    h = self.history
    count = int(h.count)
    rows = np.arange(count, count + len(sel))
    h.exact[rows] = exact
    h.images[rows] = images
    h.policies[rows] = sel.astype(np.int8)
    h.keys[rows] = space_lib.policy_keys(sel, np)
    h.accuracy[rows] = acc
    h.cost_ratio[rows] = ratio
    h.reward[rows] = rew
    h.iteration[rows] = iteration
    for r, p in zip(rows, sel):
      self._cache[space_lib.policy_bytes(p)] = int(r)
    self.history = h._replace(count=np.asarray(count + len(sel), np.int32))

  def _lazy_accuracy(
    self, sel: np.ndarray, ratio: np.ndarray, speedup: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(accuracy float64 [M], exact bool [M], images int64 [M])`` of new policies, lazily."""
    plan = self.lazy_plan
    h = self.history
    n = int(h.count)
    threshold = lazy_lib.top_k_threshold(h.reward[:n], h.exact[:n], plan.top_k)
    out = lazy_lib.evaluate_lazily(
      self.accuracy.chunk_correct, sel, plan, self.acc_target, ratio, speedup, threshold
    )
    self.stops["test"] += int(np.sum(out.reason == lazy_lib.BY_TEST))
    self.stops["bound"] += int(np.sum(out.reason == lazy_lib.BY_BOUND))
    return lazy_lib.accuracy_of(out.correct, out.images), out.exact, out.images


def best_index(
  history: History, feasible_only: bool = False, acc_target: float | None = None
) -> int:
  """Row of the highest reward (ties: the earliest); -1 when empty (or none feasible)."""
  n = int(history.count)
  if n == 0:
    return -1
  r = np.asarray(history.reward[:n], np.float64)
  if feasible_only:
    ok = np.asarray(history.accuracy[:n]) >= np.float32(acc_target)
    if not ok.any():
      return -1
    r = np.where(ok, r, -np.inf)
  return int(np.argmax(r))


def best_so_far(history: History) -> np.ndarray:
  """float64 ``[count]``: the best reward among the first ``i + 1`` evaluations."""
  n = int(history.count)
  return np.maximum.accumulate(np.asarray(history.reward[:n], np.float64)) if n else np.zeros(0)


def pareto_front(cost_ratio: Array, accuracy: Array) -> np.ndarray:
  """Indices of the non-dominated points (lower cost ratio, higher accuracy), by cost.

  A point is dominated when another has cost ``<=`` and accuracy ``>=`` with one strict.
  Duplicate points keep the first.
  """
  c = np.asarray(cost_ratio, np.float64)
  a = np.asarray(accuracy, np.float64)
  order = np.lexsort((-a, c))  # by cost ascending, then accuracy descending
  front, best = [], -np.inf
  for i in order:
    if a[i] > best:
      front.append(int(i))
      best = a[i]
  return np.asarray(front, np.int64)


__all__ = [
  "EnvParams",
  "EvalOut",
  "History",
  "HistoryV1",
  "SearchEnv",
  "best_index",
  "best_so_far",
  "cost_ratio",
  "empty_history",
  "evaluate_in_graph",
  "make_params",
  "pareto_front",
  "score",
  "upgrade_history",
]
