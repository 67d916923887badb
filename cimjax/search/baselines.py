"""Baselines and exact optima: random search, exhaustive enumeration, dynamic programming.

- :func:`make_random`: uniform random policies over the space (the floor every agent must beat).
- :func:`make_exhaustive`: enumerates the space in mixed-radix order, ``P`` at a time; with a
  budget of ``space.size`` it evaluates every policy once (feasible for small spaces, e.g. the
  small CNN under both constraints: 2,744 policies at 4-bit cells).
- :func:`exhaustive_optimum`: the best policy of a fully evaluated space (from its accuracies).
- :func:`dp_optimum`: the exact optimum for accuracy models that are a decreasing function of
  a per-layer additive damage (:class:`~cimjax.search.accuracy.SyntheticAccuracy` ``"additive"``
  and ``"saturating"``), by a Pareto dynamic programme over layers: after each layer it keeps
  the (total cost, total damage) pairs that no other partial policy beats in both. The reward
  decreases in both cost and damage, so its maximiser lies on the final front, which is exact
  (no discretisation). The front is also the true cost/accuracy Pareto front.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import cost as cost_lib
from cimjax import policy as policy_lib
from cimjax.search import reward as reward_lib
from cimjax.search import space as space_lib
from cimjax.search.agent import Agent


def make_random(space: space_lib.SearchSpace, population: int = 32) -> Agent:
  """Uniform random search: each layer's (w, a) uniform over its allowed pairs."""
  mask = jnp.asarray(space.mask)

  def init(key: jax.Array) -> jax.Array:
    del key
    return jnp.zeros((), jnp.int32)

  def ask(state: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
    del state
    return policy_lib.random_policies(key, mask, population), None

  def tell(state, policies, out, aux=None, key=None):
    del policies, out, aux, key
    return state + 1, {}

  return Agent(
    name="random",
    population=population,
    init=init,
    ask=ask,
    tell=tell,
    config={"agent": "random", "population": population},
  )


def make_exhaustive(space: space_lib.SearchSpace, population: int = 256) -> Agent:
  """Enumerates the whole space (``space.size < 2^31``), ``population`` policies an iteration.

  Past the end, ``ask`` repeats the last policy (a repeat costs no budget).
  """
  size = space.size
  if size >= 2**31:
    raise ValueError(f"the space has {size:.3g} policies; exhaustive enumeration needs < 2^31")

  def init(key: jax.Array) -> jax.Array:
    del key
    return jnp.zeros((), jnp.int32)

  def ask(state: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
    del key
    idx = jnp.minimum(state + jnp.arange(population, dtype=jnp.int32), size - 1)
    return space_lib.enumerate_policies_jnp(space, idx), None

  def tell(state, policies, out, aux=None, key=None):
    del policies, aux, key
    return state + jnp.where(jnp.any(out.valid), population, 0).astype(jnp.int32), {}

  return Agent(
    name="exhaustive",
    population=population,
    init=init,
    ask=ask,
    tell=tell,
    config={"agent": "exhaustive", "population": population, "size": size},
  )


class Optimum(NamedTuple):
  """The best policy of a task.

  Attributes:
    policy: int32 ``[L, 2]``.
    reward: its reward.
    accuracy: its accuracy (percent).
    cost_ratio: cost / baseline cost.
    speedup: 1 / cost_ratio.
    feasible: whether it meets the accuracy target.
    front_cost_ratio: cost ratios of the Pareto front (ascending).
    front_accuracy: accuracies of the Pareto front.
  """

  policy: np.ndarray
  reward: float
  accuracy: float
  cost_ratio: float
  speedup: float
  feasible: bool
  front_cost_ratio: np.ndarray
  front_accuracy: np.ndarray


def exhaustive_optimum(
  space: space_lib.SearchSpace,
  cost_table: Any,
  accuracy: np.ndarray,
  acc_target: float,
  chunk: int = 1 << 16,
) -> Optimum:
  """The exact optimum of a fully evaluated space.

  Args:
    space: the space.
    cost_table: ``[L, 8, 8]`` cost table.
    accuracy: ``[space.size]`` accuracies in enumeration order.
    acc_target: target accuracy.
    chunk: policies per vectorised block.

  Returns:
    :class:`Optimum` (ties: the first in enumeration order); the front is over all policies.
  """
  table = np.asarray(cost_table, np.float64)
  base = cost_lib.baseline_cost(table)
  size = space.size
  acc = np.asarray(accuracy, np.float64)
  ratio = np.empty(size)
  for s in range(0, size, chunk):
    pols = space_lib.enumerate_policies(space, s, chunk)
    ratio[s : s + pols.shape[0]] = cost_lib.policy_cost(table, pols) / base
  rew = reward_lib.reward(acc, ratio, acc_target, xp=np)
  i = int(np.argmax(rew))
  from cimjax.search import env as env_lib  # pylint: disable=g-import-not-at-top

  front = env_lib.pareto_front(ratio, acc)
  return Optimum(
    policy=space_lib.enumerate_policies(space, i, 1)[0],
    reward=float(rew[i]),
    accuracy=float(acc[i]),
    cost_ratio=float(ratio[i]),
    speedup=float(1.0 / ratio[i]),
    feasible=bool(acc[i] >= acc_target),
    front_cost_ratio=ratio[front],
    front_accuracy=acc[front],
  )


class ParetoDP(NamedTuple):
  """The exact (cost, damage) Pareto front of an additive problem, with back-pointers.

  Attributes:
    cost: float64 ``[F]`` total cost of each front point, ascending.
    damage: float64 ``[F]`` total damage, strictly decreasing.
    parents: per layer, int64 ``[F_l]`` index of the point after the previous layer.
    choices: per layer, int16 ``[F_l]`` the layer's pair code ``(w - 1) * 8 + (a - 1)``.
  """

  cost: np.ndarray
  damage: np.ndarray
  parents: list[np.ndarray]
  choices: list[np.ndarray]

  def policy(self, index: int) -> np.ndarray:
    """The policy of front point ``index``, int32 ``[L, 2]``."""
    num = len(self.choices)
    pol = np.zeros((num, 2), np.int32)
    j = int(index)
    for l in range(num - 1, -1, -1):
      code = int(self.choices[l][j])
      pol[l] = (code // 8 + 1, code % 8 + 1)
      j = int(self.parents[l][j])
    return pol


def pareto_dp(
  space: space_lib.SearchSpace, cost_table: Any, damage: np.ndarray, max_front: int = 5_000_000
) -> ParetoDP:
  """Pareto dynamic programme over layers for ``sum_l cost`` and ``sum_l damage``.

  After each layer only the (cost, damage) pairs that no other partial policy beats in both
  are kept (ties: the first), which is exact: any completion of a dominated partial policy is
  dominated by the same completion of the dominating one.

  Args:
    space: the space (allowed pairs).
    cost_table: ``[L, 8, 8]`` costs.
    damage: ``[L, 8, 8]`` damages (any sign).
    max_front: guard on the number of points kept after a layer.

  Raises:
    RuntimeError: the front grew beyond ``max_front``.
  """
  table = np.asarray(cost_table, np.float64)
  dmg = np.asarray(damage, np.float64)
  cost = np.zeros(1)
  dam = np.zeros(1)
  parents: list[np.ndarray] = []
  choices: list[np.ndarray] = []
  opts = [np.flatnonzero(r) for r in space.mask.reshape(space.num_layers, -1)]
  for l in range(space.num_layers):
    codes = opts[l]
    c_l = table[l].reshape(-1)[codes]
    d_l = dmg[l].reshape(-1)[codes]
    cc = (cost[:, None] + c_l[None, :]).reshape(-1)
    dd = (dam[:, None] + d_l[None, :]).reshape(-1)
    order = np.lexsort((dd, cc))  # cost ascending, then damage
    cc, dd = cc[order], dd[order]
    run_min = np.minimum.accumulate(dd)
    keep = np.ones(cc.shape[0], bool)
    keep[1:] = dd[1:] < run_min[:-1]  # strictly better damage than all cheaper
    sel = order[keep]
    parents.append((sel // len(codes)).astype(np.int64))
    choices.append(codes[sel % len(codes)].astype(np.int16))
    cost, dam = cc[keep], dd[keep]
    if cost.shape[0] > max_front:
      raise RuntimeError(
        f"Pareto front has {cost.shape[0]} points after layer {l}; above max_front = {max_front}"
      )
  return ParetoDP(cost=cost, damage=dam, parents=parents, choices=choices)


def dp_optimum(
  space: space_lib.SearchSpace,
  cost_table: Any,
  damage: np.ndarray,
  acc_of_damage: Any,
  acc_target: float,
  max_front: int = 5_000_000,
) -> Optimum:
  """Exact optimum when ``acc = acc_of_damage(sum_l damage[l, w_l - 1, a_l - 1])``.

  The reward decreases in both cost and damage, so its maximiser lies on the final front of
  :func:`pareto_dp`; the optimum is exact (no discretisation).

  Args:
    space: the space.
    cost_table: ``[L, 8, 8]`` cost table (float64 for exactness).
    damage: ``[L, 8, 8]`` per-layer damage (``SyntheticAccuracy.damage``).
    acc_of_damage: decreasing ``D -> accuracy`` (``SyntheticAccuracy.acc_of_damage``, NumPy).
    acc_target: target accuracy.
    max_front: guard on the number of Pareto points kept after a layer.

  Returns:
    :class:`Optimum` with the exact front.
  """
  table = np.asarray(cost_table, np.float64)
  base = cost_lib.baseline_cost(table)
  dp = pareto_dp(space, table, damage, max_front)
  acc = np.asarray(acc_of_damage(dp.damage), np.float64)
  ratio = dp.cost / base
  rew = reward_lib.reward(acc, ratio, acc_target, xp=np)
  i = int(np.argmax(rew))
  return Optimum(
    policy=dp.policy(i),
    reward=float(rew[i]),
    accuracy=float(acc[i]),
    cost_ratio=float(ratio[i]),
    speedup=float(1.0 / ratio[i]),
    feasible=bool(acc[i] >= acc_target),
    front_cost_ratio=ratio,
    front_accuracy=acc,
  )


__all__ = [
  "Optimum",
  "ParetoDP",
  "dp_optimum",
  "exhaustive_optimum",
  "make_exhaustive",
  "make_random",
  "pareto_dp",
]
