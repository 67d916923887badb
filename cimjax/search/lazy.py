"""Lazy, cost-aware candidate evaluation: score in chunks of images, stop when it cannot matter.

A candidate's cost ratio is known exactly before any image is seen, and a feasible candidate's
reward is ``100 * (1 / ratio - 1)`` plus at most ``0.1 * (100 - acc_t)`` points of accuracy bonus
(:mod:`cimjax.search.reward`). With lazy evaluation (``SearchConfig.lazy``) the host environment
(:class:`cimjax.search.env.SearchEnv`) scores the new candidates of a batch on the search
images in consecutive chunks of ``chunk`` images (looks at ``chunk, 2 * chunk, ..., N``). After
each chunk but the last, a candidate stops when

(b) **it cannot matter** (deterministic, exact): its best possible reward, with every remaining
    image correct (:func:`reward_upper_bound`), is below the ``top_k``-th best *exact* reward
    recorded so far (:func:`top_k_threshold`; ``top_k`` = the held-out re-evaluation's
    ``final_top_k``, and the best feasible reward is among them). Such a candidate can be
    neither the search's winner nor one of the top-k candidates the runner re-evaluates
    (:func:`cimjax.search.runner.reevaluate`), with its recorded or with its full-split reward;
(a) **a sequential test decides it is below the accuracy target** (statistical): with ``c``
    correct among the first ``n`` of ``N`` images, it stops when
    ``P(K <= c) <= alpha'`` for ``K ~ Hypergeometric(N, M*, n)``, ``M*`` the smallest number of
    correct images that meets the target (:func:`min_feasible_correct`), and when its estimate
    ``100 c / n`` is itself below the target. This is the exact tail of sampling without
    replacement from the finite search split (tighter than the Hoeffding-Serfling bound
    ``exp(-2 n eps^2 / (1 - (n - 1) / N))``, which bounds it): the search split is a uniformly
    shuffled sample
    (``cimjax.data.held_out_split`` takes the validation images in the order of a seeded
    random permutation), so the first ``n`` images are a simple random sample of the ``N``.
    ``P(K <= c)`` decreases in ``M`` (the hypergeometric is stochastically increasing in its
    number of successes), so for every candidate that meets the target the chance to be
    stopped at one look is at most ``alpha'``. The error rate is split by a union bound over
    the looks and the budget's candidates: ``alpha' = alpha / (budget * (looks - 1))``, so
    **the probability that any candidate of the search whose full-split accuracy meets the
    target is stopped by the test is at most ``alpha``** (default ``1e-3``). Caveat: the
    guarantee is over the random order of the split for candidates fixed in advance;
    adaptive agents choose later candidates from earlier results on the same order, which the
    union bound does not cover formally (as for the search accuracy itself: winner's curse).

Rule (b) is checked first. The looks are batch-synchronous (each look scores every still-active
candidate of the batch in one call) and the threshold is that of the history before the batch;
until ``top_k`` exact rows exist only the test can stop a candidate.

What is recorded (and what the agent receives) for a stopped candidate: ``exact = False``,
``images = n`` (images scored), accuracy ``100 c / n`` (the unbiased estimate on the images
seen) and the reward of that estimate (:func:`cimjax.search.reward.reward`). A candidate stopped
by the test is therefore recorded infeasible (reward ``-10 * (acc_t - 100 c / n) < 0``); one
stopped by the bound has a recorded reward ``<=`` its upper bound ``<`` the threshold. Every
candidate not stopped is scored on all ``N`` images and recorded exactly as without lazy
evaluation (bit for bit: the same integer count, the same float64 expression). A row stopped
by the test (negative recorded reward) enters the recorded top-k only when fewer than ``top_k``
candidates meet the target (it is then re-evaluated exactly at the end), and is the winner only
when none does. The budget
semantics are unchanged: a stopped candidate uses one evaluation and is never re-evaluated
(a repeat gets its recorded values). The final held-out re-evaluation stays exact.

Accuracy sources for lazy evaluation provide ``num_images`` and
``chunk_correct(policies [M, L, 2], start, stop) -> int64 [M]`` (correct predictions on images
``[start, stop)``): :class:`cimjax.search.DataAccuracy`, :class:`cimjax.search.MemoAccuracy` of
one, and :class:`PerImageAccuracy` (an oracle whose per-image correctness is given).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from cimjax.errors import ConfigError
from cimjax.search import accuracy as acc_lib
from cimjax.search import reward as reward_lib

Array = Any
CountFn = Callable[[np.ndarray, int, int], np.ndarray]  # (policies, start, stop) -> correct [M]
DEFAULT_CHUNK = 250
DEFAULT_ALPHA = 1e-3
EXACT, BY_TEST, BY_BOUND = 0, 1, 2  # outcome of one candidate (LazyOutcome.reason)


class LazyConfig(NamedTuple):
  """Settings of lazy evaluation.

  Attributes:
    chunk: images a look (``>= 1``).
    alpha: search-wide error rate of the sequential test, in ``(0, 1)``.
    top_k: candidates the held-out re-evaluation takes (``>= 1``); the deterministic rule keeps
      exact every candidate that could be one of them.
  """

  chunk: int = DEFAULT_CHUNK
  alpha: float = DEFAULT_ALPHA
  top_k: int = 5


class LazyPlan(NamedTuple):
  """What lazy evaluation of one search precomputes (pure data).

  Attributes:
    num_images: ``N``, images of the search split.
    looks: int64 ``[J]`` cumulative images scored at each look; ``looks[-1] = N``.
    max_correct: int64 ``[J]``: the test stops a candidate at look ``j`` when its correct count
      is ``<= max_correct[j]`` (-1: never; always -1 at the last look, where all is exact).
    min_correct: ``M*`` of :func:`min_feasible_correct`.
    alpha_look: the test's error rate at one look for one candidate.
    top_k: see :class:`LazyConfig`.
    chunk: see :class:`LazyConfig`.
    alpha: see :class:`LazyConfig`.
  """

  num_images: int
  looks: np.ndarray
  max_correct: np.ndarray
  min_correct: int
  alpha_look: float
  top_k: int
  chunk: int
  alpha: float


class LazyOutcome(NamedTuple):
  """Per-candidate result of :func:`evaluate_lazily` (NumPy ``[M]`` each).

  Attributes:
    correct: int64 correct predictions on the images scored.
    images: int64 images scored (``N`` for exact candidates).
    exact: bool, scored on the whole split.
    reason: int8 :data:`EXACT`, :data:`BY_TEST` or :data:`BY_BOUND`.
  """

  correct: np.ndarray
  images: np.ndarray
  exact: np.ndarray
  reason: np.ndarray


def check_config(chunk: Any, alpha: Any, field: str = "search") -> None:
  """Raises :class:`cimjax.errors.ConfigError` naming ``{field}.lazy_chunk`` / ``lazy_alpha``."""
  if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
    raise ConfigError(f"config.{field}.lazy_chunk = {chunk!r}; allowed: an integer >= 1 (images)")
  ok = isinstance(alpha, int | float) and not isinstance(alpha, bool)
  if not (ok and math.isfinite(alpha) and 0.0 < alpha < 1.0):
    raise ConfigError(f"config.{field}.lazy_alpha = {alpha!r}; allowed: a number in (0, 1)")


def look_sizes(num_images: int, chunk: int) -> np.ndarray:
  """int64 ``[J]`` cumulative images at each look: ``chunk, 2 chunk, ..., N`` (last one ``N``)."""
  looks = list(range(chunk, num_images, chunk)) + [num_images]
  return np.asarray(looks, np.int64)


def accuracy_of(correct: Array, images: Array) -> np.ndarray:
  """float64 accuracy in percent, ``100 * correct / images`` (the expression of
  :class:`cimjax.search.DataAccuracy`, so a full-split count gives the same float)."""
  return 100.0 * np.asarray(correct, np.int64) / np.asarray(images, np.int64)


def min_feasible_correct(num_images: int, acc_target: float) -> int:
  """``M*``: the fewest correct images of ``N`` whose accuracy meets the target.

  Meets means feasible in either of the two ways the search compares: the reward's float64
  ``acc >= acc_t`` or the history's float32 ``float32(acc) >= float32(acc_t)``. ``N + 1`` when no
  count meets it.
  """
  acc = accuracy_of(np.arange(num_images + 1), num_images)
  ok = (acc >= acc_target) | (acc.astype(np.float32) >= np.float32(acc_target))
  hits = np.flatnonzero(ok)
  return int(hits[0]) if hits.size else num_images + 1


def hypergeom_cdf(num: int, successes: int, draws: int) -> np.ndarray:
  """float64 ``[draws + 1]``: ``P(K <= k)`` for ``K ~ Hypergeometric(num, successes, draws)``.

  ``K`` is the number of successes among ``draws`` items drawn without replacement from
  ``num`` items of which ``successes`` are successes. Computed from log-binomials
  (``math.lgamma`` of every integer up to ``num``), exact to about 1e-12 relative.
  """
  k = np.arange(draws + 1)
  lo, hi = max(0, draws - (num - successes)), min(draws, successes)
  ok = (k >= lo) & (k <= hi)
  kk = np.clip(k, lo, hi)
  log_fact = _log_factorials(num)

  def log_comb(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return log_fact[a] - log_fact[b] - log_fact[a - b]

  logp = log_comb(successes, kk) + log_comb(num - successes, draws - kk) - log_comb(num, draws)
  pmf = np.where(ok, np.exp(logp), 0.0)
  return np.minimum(np.cumsum(pmf), 1.0)


@functools.lru_cache(maxsize=8)
def _log_factorials(num: int) -> np.ndarray:
  """float64 ``[num + 1]``: ``log(i!)`` (read-only)."""
  out = np.asarray([math.lgamma(i + 1.0) for i in range(num + 1)], np.float64)
  out.setflags(write=False)
  return out


def make_plan(num_images: int, acc_target: float, config: LazyConfig, budget: int) -> LazyPlan:
  """The looks and the test's stopping counts of one search (see the module docstring).

  Args:
    num_images: ``N``.
    acc_target: target accuracy in percent.
    config: chunk, alpha, top-k.
    budget: candidates the search may evaluate (the union bound's count).

  Returns:
    The :class:`LazyPlan`.
  """
  check_config(config.chunk, config.alpha)
  looks = look_sizes(int(num_images), int(config.chunk))
  m_star = min_feasible_correct(int(num_images), float(acc_target))
  tests = max(len(looks) - 1, 1)
  alpha_look = float(config.alpha) / (max(int(budget), 1) * tests)
  max_correct = np.full(looks.shape, -1, np.int64)
  for j, n in enumerate(looks[:-1]):
    n = int(n)
    est = accuracy_of(np.arange(n + 1), n)  # the estimate must itself be infeasible
    infeasible = (est < acc_target) & (est.astype(np.float32) < np.float32(acc_target))
    if m_star > num_images:  # nothing can meet the target: every count is below it
      ok = np.ones(n + 1, bool)
    else:
      # a small relative margin keeps float rounding of the tail on the safe side
      ok = hypergeom_cdf(int(num_images), m_star, n) <= alpha_look * (1.0 - 1e-9)
    both = np.flatnonzero(ok & infeasible)
    # the tail is a prefix of counts (the CDF increases in k): the largest count still in it
    max_correct[j] = int(both[-1]) if both.size and both.size == both[-1] + 1 else -1
  return LazyPlan(
    num_images=int(num_images),
    looks=looks,
    max_correct=max_correct,
    min_correct=m_star,
    alpha_look=alpha_look,
    top_k=int(config.top_k),
    chunk=int(config.chunk),
    alpha=float(config.alpha),
  )


def reward_upper_bound(
  correct: Array,
  images: Array,
  num_images: int,
  cost_ratio: Array,
  acc_target: float,
  speedup: Array | None = None,
) -> np.ndarray:
  """float64 ``[M]``: the largest reward a partly scored candidate can still reach.

  With ``c`` correct of ``n`` images scored, its full-split count lies in ``[c, c + N - n]``.
  Each branch of the reward increases with accuracy, so the bound is the reward at
  ``100 (c + N - n) / N``, or 0 (the infeasible branch's supremum) when the target lies inside
  the interval and that reward is negative (a cost ratio above 1). Deterministic and exact
  (the same float64 expressions as the recorded reward, which are monotone).

  Args:
    correct: int ``[M]`` correct so far.
    images: int ``[M]`` images scored so far.
    num_images: ``N``.
    cost_ratio: ``[M]`` cost ratios.
    acc_target: target accuracy in percent.
    speedup: ``[M]`` ``baseline / cost`` as the environment computes it.
  """
  c = np.asarray(correct, np.int64)
  hi = accuracy_of(c + num_images - np.asarray(images, np.int64), num_images)
  lo = accuracy_of(c, num_images)
  r = np.asarray(reward_lib.reward(hi, cost_ratio, acc_target, xp=np, speedup=speedup), np.float64)
  straddles = (hi >= acc_target) & (lo < acc_target)
  return np.where(straddles, np.maximum(r, 0.0), r)


def top_k_threshold(rewards: Array, exact: Array, top_k: int) -> float:
  """The ``top_k``-th best recorded reward among exact rows (float32 values); -inf if fewer.

  A candidate whose bound (rounded to float32) is below it can enter neither the top ``top_k``
  by recorded reward nor be the best: the exact rows only grow, so the threshold never falls.
  """
  r = np.asarray(rewards, np.float32)[np.asarray(exact, bool)]
  if r.size < top_k or top_k < 1:
    return float("-inf")
  return float(np.partition(r, r.size - top_k)[r.size - top_k])


def evaluate_lazily(
  count: CountFn,
  policies: np.ndarray,
  plan: LazyPlan,
  acc_target: float,
  cost_ratio: Array,
  speedup: Array,
  threshold: float,
) -> LazyOutcome:
  """Scores candidates chunk by chunk with the stopping rules of the module docstring.

  Every look scores all still-active candidates of the batch in one call of ``count``.

  Args:
    count: ``count(policies [m, L, 2], start, stop) -> int [m]`` correct predictions on images
      ``[start, stop)`` of the search split.
    policies: int32 ``[M, L, 2]``.
    plan: :func:`make_plan`.
    acc_target: target accuracy in percent.
    cost_ratio: float64 ``[M]``.
    speedup: float64 ``[M]`` ``baseline / cost``.
    threshold: :func:`top_k_threshold` of the history before this batch.

  Returns:
    The :class:`LazyOutcome`.
  """
  m = policies.shape[0]
  correct = np.zeros(m, np.int64)
  seen = np.zeros(m, np.int64)
  reason = np.full(m, EXACT, np.int8)
  active = np.ones(m, bool)
  start = 0
  for j, stop in enumerate(plan.looks):
    idx = np.flatnonzero(active)
    if idx.size == 0:
      break
    correct[idx] += np.asarray(count(policies[idx], start, int(stop)), np.int64)
    seen[idx] = stop
    start = int(stop)
    if j == len(plan.looks) - 1:
      break
    ub = reward_upper_bound(correct, seen, plan.num_images, cost_ratio, acc_target, speedup)
    by_bound = active & (ub.astype(np.float32) < np.float32(threshold))
    by_test = active & ~by_bound & (correct <= plan.max_correct[j])
    reason[by_bound], reason[by_test] = BY_BOUND, BY_TEST
    active &= ~(by_bound | by_test)
  return LazyOutcome(correct, seen, seen == plan.num_images, reason)


def supports_chunks(source: Any) -> bool:
  """Whether an accuracy source can score slices of its images (lazy evaluation)."""
  return int(getattr(source, "num_images", 0) or 0) > 0 and callable(
    getattr(source, "chunk_correct", None)
  )


class PerImageAccuracy(acc_lib.AccuracySource):
  """An accuracy oracle with given per-image correctness (tests, synthetic benchmarks).

  Args:
    correct_fn: ``policies int32 [M, L, 2] -> bool [M, N]`` whether each image is classified
      correctly (deterministic).
    num_images: ``N``.
    name: label.

  Attributes:
    image_passes: candidates x images scored through this source (full calls and chunks).
  """

  def __init__(
    self, correct_fn: Callable[[np.ndarray], np.ndarray], num_images: int, name="oracle"
  ):
    self.correct_fn, self.num_images, self.name = correct_fn, int(num_images), name
    self.fn = None
    self.image_passes = 0

  def _mask(self, policies: Array) -> np.ndarray:
    p = np.asarray(policies, np.int32)
    p = p[None] if p.ndim == 2 else p
    mask = np.asarray(self.correct_fn(p), bool)
    if mask.shape != (p.shape[0], self.num_images):
      raise ValueError(f"correct_fn gave shape {mask.shape}; expected ({p.shape[0]}, N)")
    return mask

  def __call__(self, policies: Array) -> np.ndarray:
    mask = self._mask(policies)
    self.image_passes += mask.size
    return accuracy_of(mask.sum(axis=1), self.num_images)

  def chunk_correct(self, policies: Array, start: int, stop: int) -> np.ndarray:
    """int64 ``[M]`` correct predictions on images ``[start, stop)``."""
    mask = self._mask(policies)[:, start:stop]
    self.image_passes += mask.size
    return mask.sum(axis=1).astype(np.int64)

  def describe(self) -> dict[str, Any]:
    return {"name": self.name, "kind": "PerImageAccuracy", "images": self.num_images}


def synthetic_per_image(
  source: acc_lib.SyntheticAccuracy, num_images: int, seed: int = 0
) -> PerImageAccuracy:
  """A per-image oracle around a synthetic model: image ``i`` is correct iff
  ``100 u_i < acc(policy)``, with ``u ~ U(0, 1)^N`` drawn from ``default_rng(seed)``.

  Its full-split accuracy is the synthetic accuracy rounded to the split's ``100 / N`` steps
  (up to the sample's spread); images come in random order, as a shuffled split does.
  """
  u = 100.0 * np.random.default_rng(seed).random(num_images)

  def correct(policies: np.ndarray) -> np.ndarray:
    return u[None, :] < source.exact(policies)[:, None]

  return PerImageAccuracy(correct, num_images, name=f"{source.name}-per-image")


__all__ = [
  "BY_BOUND",
  "BY_TEST",
  "DEFAULT_ALPHA",
  "DEFAULT_CHUNK",
  "EXACT",
  "LazyConfig",
  "LazyOutcome",
  "LazyPlan",
  "PerImageAccuracy",
  "accuracy_of",
  "check_config",
  "evaluate_lazily",
  "hypergeom_cdf",
  "look_sizes",
  "make_plan",
  "min_feasible_correct",
  "reward_upper_bound",
  "supports_chunks",
  "synthetic_per_image",
  "top_k_threshold",
]
