"""Joint mode: the agent's candidates train the shared any-precision weights while it searches.

One jitted :func:`make_joint_step` does, on one training batch:

1. ``ask``: the agent samples ``P`` candidate policies;
2. any-precision QAT on the shared weights with the first ``train_k`` of them
   (:meth:`cimjax.train.Trainer.anyprec_step`: the max-bits "sandwich" policy plus these, the
   latter distilled from it), so the weights specialise toward the policies the agent
   currently prefers;
3. scores every candidate on a fixed validation batch with the updated weights (``lax.map``
   over candidates: on CPU a loop beats a vmapped grouped convolution) and its cost;
4. ``tell``: the agent learns from the rewards.

The weights change every step, so accuracies are not cached: the evaluation count of joint
mode is ``P`` per step. Use the model-free PG agent here (``PGConfig(plan=0)``): the planner's
additive model assumes a fixed accuracy function. :func:`run_joint` loops the jitted step over
training batches (a Python loop: faster than ``lax.scan`` for training on CPU) and finally
re-scores the best candidates seen on a whole split with the final weights.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.models import forward
from cimjax.search import env as env_lib
from cimjax.search.agent import Agent, iteration_keys


class JointState(NamedTuple):
  """Training state (a :class:`cimjax.train.TrainState`), agent state and the run's key."""

  train: Any
  agent: Any
  key: jax.Array


def make_joint_step(
  trainer: Any,
  agent: Agent,
  params: env_lib.EnvParams,
  x_val: np.ndarray,
  y_val: np.ndarray,
  train_k: int = 2,
) -> Callable[[JointState, tuple[Any, Any], jax.Array], tuple[JointState, dict[str, Any]]]:
  """Builds the jitted joint step ``(state, batch, iteration) -> (state, metrics)``.

  Args:
    trainer: a :class:`cimjax.train.Trainer` (its ``anyprec_step``).
    agent: the search agent (population ``P``).
    params: environment arrays (cost table, baseline, accuracy target).
    x_val: ``[V, H, W, C]`` validation images scoring the candidates.
    y_val: ``[V]`` labels.
    train_k: candidates (the first ones) trained on in each step.

  Returns:
    The step; metrics hold the candidates, their accuracy (percent), cost ratio and reward,
    and the QAT loss.
  """
  module = trainer.module
  xv = jnp.asarray(x_val, jnp.float32)
  yv = jnp.asarray(y_val, jnp.int32)
  k = min(int(train_k), agent.population)

  def acc_of(variables: Any, policy: jax.Array) -> jax.Array:
    logits, _ = forward(module, variables, xv, policy)
    hit = (jnp.argmax(logits, -1) == yv).astype(jnp.float32)
    return 100.0 * jnp.mean(hit)

  @jax.jit
  def step(
    state: JointState, batch: tuple[Any, Any], iteration: jax.Array
  ) -> tuple[JointState, dict[str, Any]]:
    k_ask, k_tell = iteration_keys(state.key, iteration)
    pols, aux = agent.ask(state.agent, k_ask)
    train_state, tm = trainer.anyprec_step(state.train, batch, pols[:k])
    variables = train_state.variables
    acc = jax.lax.map(lambda p: acc_of(variables, p), pols)
    ratio, rew = env_lib.score(params, acc, pols)
    n = pols.shape[0]
    out = env_lib.EvalOut(
      accuracy=acc,
      cost_ratio=ratio,
      reward=rew,
      valid=jnp.ones((n,), bool),
      new=jnp.ones((n,), bool),
      slot=jnp.full((n,), -1, jnp.int32),
    )
    agent_state, _ = agent.tell(state.agent, pols, out, aux, k_tell)
    return (
      JointState(train=train_state, agent=agent_state, key=state.key),
      {"policies": pols, "accuracy": acc, "cost_ratio": ratio, "reward": rew, "loss": tm["loss"]},
    )

  return step


@dataclasses.dataclass
class JointResult:
  """Outcome of :func:`run_joint`.

  Attributes:
    state: final :class:`JointState` (trained weights and agent).
    best_policy: the best candidate by its final re-scoring.
    candidates: the ``top_k`` candidates (best step rewards) re-scored with the final weights
      on the given split: ``[{"policy", "step_reward", "accuracy", "cost_ratio", "reward"}]``.
    rewards: per step, the best reward of the population.
    evaluations: candidates scored (``P`` per step).
    wall_s: seconds.
  """

  state: JointState
  best_policy: np.ndarray
  candidates: list[dict[str, Any]]
  rewards: list[float]
  evaluations: int
  wall_s: float


def _batch_accuracy_fn(module: Any, x_val: np.ndarray, y_val: np.ndarray) -> Callable:
  """``final(variables, policies) -> accuracy % [N]`` on one validation batch."""

  def final(v, ps):
    def acc(p):
      logits = forward(module, v, jnp.asarray(x_val, jnp.float32), p)[0]
      hit = jnp.argmax(logits, -1) == jnp.asarray(y_val, jnp.int32)
      return 100.0 * jnp.mean(hit.astype(jnp.float32))

    fn = jax.jit(acc)
    return np.asarray([float(fn(jnp.asarray(p))) for p in ps])

  return final


def _rescore(
  params: env_lib.EnvParams, acc: Any, pols: np.ndarray, top: list[tuple[float, np.ndarray]]
) -> tuple[list[dict[str, Any]], np.ndarray]:
  """The re-scored candidates (policy, step reward, accuracy, cost ratio, reward) and rewards."""
  acc = np.asarray(acc, np.float64)
  ratio, rew = env_lib.score(params, jnp.asarray(acc, jnp.float32), jnp.asarray(pols))
  cands = [
    {
      "policy": pols[j].tolist(),
      "step_reward": top[j][0],
      "accuracy": float(acc[j]),
      "cost_ratio": float(ratio[j]),
      "reward": float(rew[j]),
    }
    for j in range(len(top))
  ]
  return cands, np.asarray(rew)


def run_joint(
  trainer: Any,
  agent: Agent,
  params: env_lib.EnvParams,
  train_state: Any,
  batches: Any,
  x_val: np.ndarray,
  y_val: np.ndarray,
  *,
  steps: int,
  seed: int = 0,
  train_k: int = 2,
  final: Any = None,
  top_k: int = 5,
  progress: Callable[[int, float], None] | None = None,
) -> JointResult:
  """Runs joint search + any-precision training for ``steps`` steps.

  Args:
    trainer: :class:`cimjax.train.Trainer` with the any-precision recipe.
    agent: the agent (model-free PG recommended).
    params: environment arrays.
    train_state: the initial :class:`cimjax.train.TrainState` (e.g. from the anyprec stage).
    batches: iterator of ``(images, labels)`` training batches.
    x_val: validation images scoring candidates every step.
    y_val: their labels.
    steps: joint steps.
    seed: the agent's seed.
    train_k: candidates trained on per step.
    final: optional ``final(variables, policies [N, L, 2]) -> accuracy % [N]`` re-scoring the
      best candidates with the final weights (default: the step's validation batch).
    top_k: candidates re-scored.
    progress: ``progress(step, best_reward)``.

  Returns:
    :class:`JointResult`.
  """
  t0 = time.perf_counter()
  key = jax.random.PRNGKey(seed)
  k_init, k_run = jax.random.split(key)
  state = JointState(train=train_state, agent=agent.init(k_init), key=k_run)
  step = make_joint_step(trainer, agent, params, x_val, y_val, train_k)
  seen: dict[bytes, tuple[float, np.ndarray]] = {}
  best_per_step = []
  for i in range(steps):
    x, y = next(batches)
    state, m = step(state, (jnp.asarray(x), jnp.asarray(y)), jnp.asarray(i, jnp.int32))
    pols, rew = np.asarray(m["policies"]), np.asarray(m["reward"], np.float64)
    for p, r in zip(pols, rew):
      kb = p.astype(np.int8).tobytes()
      if kb not in seen or r > seen[kb][0]:
        seen[kb] = (float(r), p.astype(np.int32))
    best_per_step.append(float(rew.max()))
    if progress is not None:
      progress(i + 1, best_per_step[-1])
  top = sorted(seen.values(), key=lambda t: -t[0])[: max(top_k, 1)]
  pols = np.stack([p for _, p in top])
  final = final or _batch_accuracy_fn(trainer.module, x_val, y_val)
  cands, rew = _rescore(params, final(state.train.variables, pols), pols, top)
  best = int(np.argmax(np.asarray(rew)))
  return JointResult(
    state=state,
    best_policy=pols[best],
    candidates=cands,
    rewards=best_per_step,
    evaluations=steps * agent.population,
    wall_s=time.perf_counter() - t0,
  )


__all__ = ["JointResult", "JointState", "make_joint_step", "run_joint"]
