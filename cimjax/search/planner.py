"""The PG agent's additive accuracy model and its planner, as pure functions of explicit state.

Model: every evaluated candidate feeds ``acc ~ c + sum_l u_l[w_l] + v_l[a_l]``, a weighted ridge
regression on one-hot features (:func:`model_features`; 8 bits is the reference) with per-layer
effects shrunk towards the effect shared by all layers (:func:`model_ridge_penalty`). The
sufficient statistics live in a :class:`ModelState`; the fit (:func:`model_update`) is solved
exactly in float64 on the host, so a plan does not depend on how a sharded program orders its
sums.

Planner: the exact optima of the model at a range of safety margins, by a Pareto DP over layers
(:func:`plan_front`, :func:`cheapest_feasible`); the margins are measured in the model's
out-of-sample error on earlier planned candidates. The DP keeps only the part of the front
that can hold an answer (bound and prune, :mod:`cimjax.search.pareto`) and plans exactly what
the full front (:func:`model_front`, the reference) plans, bit for bit, over 20 times faster
on ViT-B/32's 74 layers (BUILD_NOTES.md). A few planned candidates are Thompson
samples: optima of models drawn from the fit's posterior widened by the additive model's misfit
(:func:`thompson_std`), which keeps trying equal-cost alternatives that the model cannot tell
apart.

Host functions (NumPy in, NumPy out): :func:`plan_policies`, :func:`refit_host`. Their jittable
counterparts :func:`plan_candidates` and :func:`refit` call them through ``jax.pure_callback``.
See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.search import baselines, pareto
from cimjax.search import space as space_lib


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
  """Settings of the accuracy model and the planner (the defaults: :meth:`PGConfig.planner
  <cimjax.search.pg.PGConfig.planner>`).

  Attributes:
    plan: planned candidates per iteration.
    margins: ``(lo, hi)`` margins of the deterministic plans, in model errors above the target.
    thompson: how many of the planned candidates are Thompson samples (at most ``plan``).
    min_sigma: floor of the margin unit (points).
    err_rate: update rate of the moving average of the out-of-sample over-prediction.
    ts_scale: scale of the Thompson posterior's standard deviation.
    ts_misfit: misfit floor of the Thompson posterior (:func:`thompson_std`).
    ridge: per-layer ridge penalty of the fit.
    tau: points below the target at which a sample's fit weight falls by ``e``.
  """

  plan: int
  margins: tuple[float, float]
  thompson: int
  min_sigma: float
  err_rate: float
  ts_scale: float
  ts_misfit: float
  ridge: float
  tau: float

  @property
  def num_thompson(self) -> int:
    """Thompson samples among the planned candidates."""
    return min(self.thompson, self.plan)

  def deterministic_margins(self) -> np.ndarray:
    """float64 ``[plan - num_thompson]``: evenly spaced from ``lo`` to ``hi`` (one: ``lo``,
    at least 0)."""
    lo, hi = self.margins
    n_det = self.plan - self.num_thompson
    return np.linspace(lo, hi, n_det) if n_det > 1 else np.asarray([max(lo, 0.0)] * n_det)


class ModelState(NamedTuple):
  """Sufficient statistics and fit of the accuracy model (float32; ``D = 16 L + 17``).

  Attributes:
    gram: ``[D, D]`` weighted ``X^T X`` of the one-hot features.
    moment: ``[D]`` weighted ``X^T y``.
    coef: ``[D]`` the model's coefficients (the ridge solution).
    yy: ``[]`` weighted sum of squared targets (residual variance).
    wsum: ``[]`` sum of the fit weights.
    plan_err: ``[]`` moving average of how much the model over-predicted the accuracy of
      planned candidates (out of sample; scales the planning margins), points.
    model_sd: ``[]`` weighted in-sample residual std of the model, points.
  """

  gram: jax.Array
  moment: jax.Array
  coef: jax.Array
  yy: jax.Array
  wsum: jax.Array
  plan_err: jax.Array
  model_sd: jax.Array


def model_dim(num_layers: int) -> int:
  """``D = 16 L + 17``: the number of model features."""
  return 16 * num_layers + 17


def model_init(dim: int) -> ModelState:
  """An empty model of ``dim`` features (all zeros)."""
  scalar = jnp.zeros((), jnp.float32)
  return ModelState(
    gram=jnp.zeros((dim, dim), jnp.float32),
    moment=jnp.zeros((dim,), jnp.float32),
    coef=jnp.zeros((dim,), jnp.float32),
    yy=scalar,
    wsum=scalar,
    plan_err=scalar,
    model_sd=scalar,
  )


def model_features(policies: Any, xp: Any = np) -> Any:
  """One-hot features of the additive accuracy model.

  8 bits is the reference (no column), so the ridge penalty pulls an untested lower bit-width
  towards "no damage": optimism that gets it tried.

  Args:
    policies: int ``[N, L, 2]`` (bits 1..8).
    xp: ``numpy`` (host fit, float64) or ``jax.numpy`` (imagined updates, float32).

  Returns:
    ``[N, 16 L + 17]``: per layer 8 weight and 8 activation indicators (the 8-bit columns
    always 0), then 16 counts of layers at each bit-width (the effects shared by all layers),
    then 1 (intercept).
  """
  dtype = np.float64 if xp is np else jnp.float32
  eye = xp.asarray(np.diag([1.0] * 7 + [0.0]), dtype)  # row b - 1; 8 bits -> zeros
  pols = xp.asarray(policies)
  n, num = pols.shape[:2]
  x = xp.concatenate([eye[pols[..., 0] - 1], eye[pols[..., 1] - 1]], axis=-1)  # [N, L, 16]
  return xp.concatenate([x.reshape(n, 16 * num), x.sum(axis=1), xp.ones((n, 1), dtype)], axis=1)


def predict(coef: jax.Array, policies: jax.Array) -> jax.Array:
  """float32 ``[N]`` predicted accuracy minus the target of int ``[N, L, 2]`` (jittable)."""
  return model_features(policies, jnp) @ coef


def model_ridge_penalty(num_layers: int, ridge: float) -> np.ndarray:
  """Ridge penalties ``[16 L + 17]``: ``ridge`` on the per-layer effects, 1e-3 on the rest.

  Per-layer effects are thus shrunk towards the effect shared by all layers (a hierarchical
  prior: an untested bit-width at a layer is expected to hurt like it does elsewhere).
  """
  reg = np.full((16 * num_layers + 17,), ridge, np.float64)
  reg[16 * num_layers :] = 1e-3
  return reg


def model_update(
  gram: np.ndarray,
  moment: np.ndarray,
  yy: np.ndarray,
  wsum: np.ndarray,
  policies: np.ndarray,
  rel: np.ndarray,
  new: np.ndarray,
  ridge: float,
  tau: float,
) -> tuple[np.ndarray, ...]:
  """Adds evaluated candidates to the accuracy model and refits it (float64, on the host).

  The fit is the weighted ridge regression ``min_c sum_i w_i (x_i c - y_i)^2 + sum_j r_j c_j^2``
  with ``w_i = exp(-max(-y_i, 0) / tau)`` (candidates far below the target, where accuracy
  saturates, weigh less), solved directly. It runs on the host in float64 from the exact
  candidates and accuracies, so the result does not depend on how a device program orders its
  sums (the same search on 1 or 8 devices plans the same candidates).

  Args:
    gram: ``[D, D]`` weighted ``X^T X`` so far.
    moment: ``[D]`` weighted ``X^T y`` so far.
    yy: weighted sum of ``y^2`` so far.
    wsum: sum of weights so far.
    policies: int ``[N, L, 2]`` candidates.
    rel: ``[N]`` their accuracy minus the target (points).
    new: bool ``[N]``; only new candidates are added (each policy once).
    ridge: per-layer ridge penalty (:func:`model_ridge_penalty`).
    tau: weight decay scale in points.

  Returns:
    ``(gram, moment, yy, wsum, coef, sd)`` as float32: the updated statistics, the fitted
    coefficients ``[D]`` and the weighted residual standard deviation (points).
  """
  g = np.asarray(gram, np.float64)
  m = np.asarray(moment, np.float64)
  y = np.asarray(rel, np.float64)
  x = model_features(policies)
  wgt = np.where(np.asarray(new, bool), np.exp(-np.maximum(-y, 0.0) / tau), 0.0)
  xw = x * wgt[:, None]
  g = g + xw.T @ x
  m = m + xw.T @ y
  yy = float(yy) + float(np.sum(wgt * y * y))
  wsum = float(wsum) + float(np.sum(wgt))
  reg = model_ridge_penalty(policies.shape[1], ridge)
  coef = np.linalg.solve(g + np.diag(reg), m)
  rss = yy - 2.0 * coef @ m + coef @ g @ coef
  sd = np.sqrt(max(rss, 0.0) / max(wsum - 1.0, 1.0))
  f32 = lambda v: np.asarray(v, np.float32)
  return f32(g), f32(m), f32(yy), f32(wsum), f32(coef), f32(sd)


def thompson_std(diag: np.ndarray, sd: float, num_layers: int, misfit: float) -> np.ndarray:
  """Standard deviations ``[16 L + 17]`` of the planner's Thompson draws of the model.

  The fit's own uncertainty is ``sd / sqrt(diag)`` (a diagonal approximation of the ridge
  posterior), which shrinks as a coefficient's data grow. The additive model's misfit does not:
  interactions between layers and the evaluation noise of a finite search split (0.1-point
  steps on 1,000 images) stay, however much data there is, so that posterior alone soon stops
  the draws from trying equal-cost alternatives (e.g. other weight bits where weight slicing
  costs no latency), among which the measured optimum may hide. ``misfit`` adds a floor in
  quadrature, ``misfit * sd / sqrt(2 L)`` a coefficient, so that a policy's draw spreads by
  about ``misfit * sd`` when all its ``2 L`` operands are below 8 bits.

  Args:
    diag: ``[16 L + 17]`` diagonal of the regularised Gram matrix.
    sd: residual standard deviation of the fit (points, floored by the caller).
    num_layers: ``L``.
    misfit: floor scale (0: the fit's uncertainty only).

  Returns:
    float64 ``[16 L + 17]``; 0 on the effects shared by all layers and the intercept, which
    stay fixed.
  """
  post = sd / np.sqrt(np.maximum(np.asarray(diag, np.float64), 1e-12))
  if misfit:
    post = np.sqrt(post**2 + (misfit * sd) ** 2 / (2.0 * num_layers))
  post[16 * num_layers :] = 0.0
  return post


def model_damage(coef: np.ndarray, num_layers: int) -> np.ndarray:
  """float64 ``[L, 8, 8]`` predicted accuracy loss of each layer's (w, a) pair (0 at 8/8).

  A layer's effect is its own coefficient plus the one shared by all layers.
  """
  num = num_layers
  c = np.asarray(coef, np.float64)
  cw = c[: 16 * num].reshape(num, 16) + c[16 * num : 16 * num + 16][None, :]
  cw[:, 7] = cw[:, 15] = 0.0  # 8 bits: the reference
  return -(cw[:, :8, None] + cw[:, None, 8:])


def model_front(
  space: space_lib.SearchSpace, cost_table: np.ndarray, coef: np.ndarray
) -> tuple[baselines.ParetoDP, np.ndarray]:
  """The exact (cost, predicted accuracy) Pareto front of the model with coefficients ``coef``.

  Args:
    space: the search space (allowed pairs).
    cost_table: float64 ``[L, 8, 8]`` costs.
    coef: ``[16 L + 17]`` model coefficients.

  Returns:
    ``(front, rel)``: the :class:`~cimjax.search.baselines.ParetoDP` front (by cost ascending)
    and float64 ``[K]`` the predicted accuracy minus the target of its points.
  """
  front = baselines.pareto_dp(space, cost_table, model_damage(coef, space.num_layers))
  return front, coef[-1] - front.damage


def plan_front(
  space: space_lib.SearchSpace, cost_table: np.ndarray, coef: np.ndarray, margins: np.ndarray
) -> tuple[baselines.ParetoDP, np.ndarray]:
  """The part of :func:`model_front` that answers ``margins`` (:func:`pareto.constrained_front
  <cimjax.search.pareto.constrained_front>`).

  :func:`cheapest_feasible` of it at any of ``margins`` returns the same policy as on the full
  front (the cheapest predicted at least that far above the target, or the most accurate when
  none is), at a fraction of the cost on many layers.

  Args:
    space: the search space (allowed pairs).
    cost_table: float64 ``[L, 8, 8]`` costs.
    coef: ``[16 L + 17]`` model coefficients.
    margins: float64 ``[Q]`` margins (points above the target).

  Returns:
    ``(front, rel)`` as :func:`model_front`, the front pruned to the margins' answers.
  """
  c = np.asarray(coef, np.float64)
  limits = c[-1] - np.asarray(margins, np.float64)  # rel >= margin <=> damage <= limit
  front = pareto.constrained_front(space, cost_table, model_damage(c, space.num_layers), limits)
  return front, c[-1] - front.damage


def cheapest_feasible(front: baselines.ParetoDP, rel: np.ndarray, margin: float) -> np.ndarray:
  """The cheapest front policy predicted at least ``margin`` above the target (none: the most
  accurate). int ``[L, 2]``."""
  ok = np.flatnonzero(rel >= margin)
  i = int(ok[0]) if ok.size else int(np.argmax(rel))
  return front.policy(i)


def plan_policies(
  coef: np.ndarray,
  sigma: np.ndarray,
  diag: np.ndarray,
  seed: np.ndarray,
  *,
  space: space_lib.SearchSpace,
  cost_table: np.ndarray,
  config: PlannerConfig,
  pruned: bool = True,
) -> np.ndarray:
  """The planned candidates (host function, NumPy in and out).

  The first ``plan - num_thompson`` are the model's optima at the deterministic margins (times
  the margin unit ``max(sigma, min_sigma)``); the rest are Thompson samples: optima at margin 0
  of models drawn around the fit with standard deviations :func:`thompson_std`. The optima come
  from :func:`plan_front`, which gives the same policies as the full front of
  :func:`model_front` (``pruned=False``, the reference) in a fraction of the time.

  Args:
    coef: ``[D]`` the model's coefficients.
    sigma: ``[]`` margin unit before the floor (points).
    diag: ``[D]`` diagonal of the regularised Gram matrix.
    seed: ``[]`` integer seed of the Thompson draws.
    space: the search space.
    cost_table: float64 ``[L, 8, 8]`` costs.
    config: the planner's settings.
    pruned: use :func:`plan_front` (default) rather than the full :func:`model_front`.

  Returns:
    int32 ``[plan, L, 2]``.
  """
  cfg = config

  def front_of(coef_: np.ndarray, margins_: np.ndarray):
    if pruned:
      return plan_front(space, cost_table, coef_, margins_)
    return model_front(space, cost_table, coef_)

  num = space.num_layers
  c = np.asarray(coef, np.float64)
  sd = max(float(sigma), cfg.min_sigma)
  out = np.zeros((cfg.plan, num, 2), np.int32)
  det = cfg.plan - cfg.num_thompson
  if det:  # the model's optimum per margin
    margins = cfg.deterministic_margins()
    front, rel = front_of(c, margins * sd)
    for k in range(det):
      out[k] = cheapest_feasible(front, rel, float(margins[k]) * sd)
  # Thompson samples: optima of models drawn around the fit (diagonal posterior), so the
  # planner also tries what the data leave uncertain (e.g. equal-cost alternatives)
  rng = np.random.default_rng(int(seed))
  post = thompson_std(diag, sd, num, cfg.ts_misfit)
  for k in range(det, cfg.plan):
    drawn = c + cfg.ts_scale * post * rng.standard_normal(c.shape)
    front, rel = front_of(drawn, np.zeros(1))
    out[k] = cheapest_feasible(front, rel, 0.0)
  return out


def plan_candidates(
  model: ModelState,
  key: jax.Array,
  *,
  space: space_lib.SearchSpace,
  cost_table: np.ndarray,
  config: PlannerConfig,
) -> jax.Array:
  """:func:`plan_policies` of the current model (jittable, through ``jax.pure_callback``).

  The margin unit is the larger of the in-sample residual std and the out-of-sample error; the
  Thompson seed is drawn from ``fold_in(key, 7)``.

  Returns:
    int32 ``[plan, L, 2]``.
  """
  reg = jnp.asarray(model_ridge_penalty(space.num_layers, config.ridge), jnp.float32)
  seed = jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1, jnp.int32)
  host = functools.partial(plan_policies, space=space, cost_table=cost_table, config=config)
  return jax.pure_callback(
    host,
    jax.ShapeDtypeStruct((config.plan, space.num_layers, 2), jnp.int32),
    model.coef,
    jnp.maximum(model.model_sd, model.plan_err),
    jnp.diagonal(model.gram) + reg,
    seed,
  )


def refit_host(
  model: ModelState,
  policies: np.ndarray,
  accuracy: np.ndarray,
  new: np.ndarray,
  planned: np.ndarray,
  *,
  acc_target: float,
  config: PlannerConfig,
) -> ModelState:
  """Adds a scored batch to the model and refits it (host function, NumPy in and out).

  Before the refit, the planned candidates' out-of-sample over-prediction updates the moving
  average ``plan_err`` (the planner exploits the model's errors; this measures them).

  Args:
    model: the model so far (arrays).
    policies: int ``[N, L, 2]``.
    accuracy: ``[N]`` accuracies (percent).
    new: bool ``[N]`` first evaluations (the only ones added to the fit).
    planned: bool ``[N]`` valid planned candidates.
    acc_target: the accuracy target (percent).
    config: the planner's settings.

  Returns:
    The updated :class:`ModelState` (float32 NumPy arrays).
  """
  # NumPy only in here: outside jit the arguments may arrive as jax Arrays, and a jax
  # operation in a callback (e.g. indexing one) can deadlock against the dispatching thread
  policies, new, planned = np.asarray(policies), np.asarray(new), np.asarray(planned, bool)
  rel = np.asarray(accuracy, np.float64) - float(acc_target)
  plan_err = np.float32(model.plan_err)
  if config.plan and np.any(planned):
    pred = model_features(policies[planned]) @ np.asarray(model.coef, np.float64)
    err = float(np.mean(np.maximum(pred - rel[planned], 0.0)))
    plan_err = np.float32((1.0 - config.err_rate) * float(plan_err) + config.err_rate * err)
  gram, moment, yy, wsum, coef, sd = model_update(
    model.gram, model.moment, model.yy, model.wsum, policies, rel, new, config.ridge, config.tau
  )
  return ModelState(gram, moment, coef, yy, wsum, plan_err, sd)


def refit(
  model: ModelState,
  policies: jax.Array,
  accuracy: jax.Array,
  new: jax.Array,
  planned: jax.Array,
  *,
  acc_target: float,
  config: PlannerConfig,
) -> ModelState:
  """:func:`refit_host` through ``jax.pure_callback`` (jittable; same arguments)."""
  host = functools.partial(refit_host, acc_target=acc_target, config=config)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), model)
  return jax.pure_callback(
    host, shapes, model, policies, jnp.asarray(accuracy, jnp.float32), new, planned
  )


__all__ = [
  "ModelState",
  "PlannerConfig",
  "cheapest_feasible",
  "model_damage",
  "model_dim",
  "model_features",
  "model_front",
  "model_init",
  "model_ridge_penalty",
  "model_update",
  "plan_candidates",
  "plan_front",
  "plan_policies",
  "predict",
  "refit",
  "refit_host",
  "thompson_std",
]
