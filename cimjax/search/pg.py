"""Policy-gradient (REINFORCE) search over per-layer bit-widths, batched.

The policy is a product of independent categorical distributions, one per layer and operand:
``p(w_l)`` over the layer's allowed weight bits and ``p(a_l)`` over its activation bits
(``head="factored"``; ``head="joint"`` uses one categorical over the allowed (w, a) pairs).
Masked choices have probability exactly zero, so forced layers and bits outside the space are
never sampled. Logits are ``theta[l, b] + prior(features(l), features(l, b))``: free per-layer
logits plus a small MLP shared across layers that scores each option from the layer's geometry
and hardware cost (latency share, latency saved by the option, tiles, type, position). The MLP
starts at zero (uniform distribution) and lets what is learnt on one layer transfer to layers
that look alike (the 12 identical blocks of ViT-B/32); the free logits fit each layer.

Why factored and a population: CIM latency is ``~ tiles(w) x a`` and the accuracy loss of a
policy is close to additive over layers and operands, so a mean-field product distribution fits
the structure with few parameters (16 logits a layer rather than 64) and learns fastest. A
population of ``P`` candidates is sampled per iteration and scored in one batched call.

Update (one per iteration): the score-function gradient with rank-based advantages (centered
ranks over the valid candidates, invariant to the reward's scale and its jump at the accuracy
threshold), plus entropy regularisation and, optionally, the exact gradient of the expected
cost ratio (:func:`cimjax.cost.expected_cost_factored`), with Adam.

Model and planner (default on; ``plan=0`` gives plain REINFORCE). Every evaluated candidate also
feeds an additive accuracy model ``acc ~ c + sum_l u_l[w_l] + v_l[a_l]`` (weighted ridge
regression with 8 bits as the reference and per-layer effects shrunk towards the effect shared
by all layers; sufficient statistics in the state, solved exactly in float64 on the host, so the
plan does not depend on how a sharded program orders its sums). ``plan`` of the ``population``
candidates of each iteration are the exact optima of the model at a range of safety margins (a
Pareto DP over layers on the host, called with ``jax.pure_callback``); the margins are measured
in the model's out-of-sample error on earlier planned candidates; a few are Thompson samples,
optima of models drawn from the fit's posterior widened by the additive model's misfit
(:func:`thompson_std`), which keeps trying equal-cost alternatives that the model cannot tell
apart (on Fashion-MNIST with 4-bit cells, weight bits cost no latency and the optimum hides
among them; tuning seeds 100-112 found it by 600 evaluations in 2 of 13 runs without the misfit
term, 12 of 13 with it). The sampled candidates keep exploring (and only they enter the
REINFORCE update, the planned ones being off-policy); the planned ones exploit what the model
has learnt. Plain REINFORCE stalls in local optima of this constrained problem: near the
accuracy threshold an improvement needs coordinated changes in several layers (e.g. weights 8 ->
4 and activations 4 -> 5 in the same layers), which a concentrated product distribution almost
never samples; the planner finds them on the model. On the synthetic tasks (ResNet-18, VGG-16,
ViT-B/32, tuning seeds 100-101) this took the best speedup at 3,000 evaluations from 0.80-0.96
of the exact optimum (REINFORCE alone) to 0.999-1.000 (BUILD_NOTES.md).

All functions are pure and jittable; :func:`make_pg` returns an :class:`~cimjax.search.agent.Agent`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cimjax import cost as cost_lib
from cimjax.search import features as feat_lib
from cimjax.search import reward as reward_lib
from cimjax.search import space as space_lib
from cimjax.search.agent import Agent, standard_promotion
from cimjax.spec import LayerSpec

NEG = -1e9
HEADS = ("factored", "joint")
UTILITIES = ("rank", "zscore", "elite")


@dataclasses.dataclass(frozen=True)
class PGConfig:
  """Hyperparameters of the policy-gradient agent.

  Attributes:
    population: candidates per iteration.
    learning_rate: Adam step size on the logits and the prior network.
    entropy_coef: weight of the mean per-layer entropy bonus.
    utility: ``"rank"`` (centered ranks), ``"zscore"`` (standardised rewards) or ``"elite"``
      (CEM-like: top ``elite_frac`` get ``1/k``, the rest ``-1/(n-k)``).
    elite_frac: fraction of elites for ``"elite"``.
    head: ``"factored"`` or ``"joint"``.
    prior: use the feature-conditioned prior network.
    hidden: width of the prior network's two hidden layers.
    cost_coef: weight of the exact expected-cost-ratio term (0: off).
    b1: Adam beta1.
    model_steps: imagined updates per iteration on a learned additive accuracy model
      (0: model-free REINFORCE). See :func:`make_pg`.
    model_population: imagined candidates per imagined update.
    model_ridge: ridge penalty of the accuracy model.
    model_tau: points below the target at which a sample's weight in the model fit falls by
      ``e`` (far-off samples, where accuracy saturates, matter less).
    model_entropy_coef: entropy bonus of the imagined updates (keeps real samples diverse).
    plan: candidates per iteration proposed by the planner instead of sampled: the exact
      optimum of the additive accuracy model (Pareto DP on the host through
      ``jax.pure_callback``) at each accuracy margin of ``plan_margins`` (cycled). They are
      evaluated and fit the model but are not used in the REINFORCE update (off-policy).
    plan_margins: ``(lo, hi)``: the planned candidates demand predicted accuracies from
      ``lo`` to ``hi`` (evenly spaced) model errors above the target (the error is at least
      ``plan_min_sigma`` points); negative margins probe just past the predicted boundary.
    plan_min_sigma: floor of the residual std used for the margins (points).
    plan_err_rate: update rate of the moving average of the planner's out-of-sample
      over-prediction; the margin unit is the larger of it and the in-sample residual std.
    plan_thompson: how many of the planned candidates are Thompson samples: optima (at
      margin 0) of models drawn from a diagonal Gaussian posterior around the fit, so the
      planner keeps exploring what the data leave uncertain.
    plan_ts_scale: scale of the Thompson posterior's standard deviation.
    plan_ts_misfit: floor of the Thompson posterior for the additive model's misfit, in
      residual standard deviations a policy (see :func:`thompson_std`; 0: none).
    mutation_target: the share of sampled candidates that should be new policies (0: no
      mutation). A collapsed distribution only repeats policies, which costs no budget but
      wastes iterations; while fewer than this share of the samples are new, the mutation
      rate (the probability of redrawing each layer of a sample uniformly) is multiplied by
      ``mutation_gain`` (from ``mutation_min``), otherwise divided by it (to 0 below the
      minimum): Rechenberg's success rule, so the rest of the budget explores around the mode.
    mutation_gain: factor of the mutation-rate adaptation.
    mutation_min: smallest non-zero mutation rate.
  """

  population: int = 32
  learning_rate: float = 0.03
  entropy_coef: float = 0.01
  utility: str = "rank"
  elite_frac: float = 0.25
  head: str = "factored"
  prior: bool = True
  hidden: int = 32
  cost_coef: float = 0.0
  b1: float = 0.9
  model_steps: int = 0
  model_population: int = 256
  model_ridge: float = 0.1
  model_tau: float = 20.0
  model_entropy_coef: float = 0.0
  plan: int = 16
  plan_margins: tuple[float, float] = (-0.5, 1.0)
  plan_min_sigma: float = 0.02
  plan_err_rate: float = 0.3
  plan_thompson: int = 4
  plan_ts_scale: float = 1.0
  plan_ts_misfit: float = 2.0
  mutation_target: float = 0.25
  mutation_gain: float = 1.5
  mutation_min: float = 0.02

  def __post_init__(self):
    if self.population < 2:
      raise ValueError(f"population = {self.population}; allowed: an integer >= 2")
    if self.head not in HEADS:
      raise ValueError(f"head = {self.head!r}; allowed: {', '.join(HEADS)}")
    if self.utility not in UTILITIES:
      raise ValueError(f"utility = {self.utility!r}; allowed: {', '.join(UTILITIES)}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate = {self.learning_rate}; allowed: a number > 0")
    if not 0.0 <= self.mutation_target <= 1.0:
      raise ValueError(f"mutation_target = {self.mutation_target}; allowed: 0 .. 1")
    if not self.mutation_gain > 1.0:
      raise ValueError(f"mutation_gain = {self.mutation_gain}; allowed: a number > 1")
    if not self.plan_ts_misfit >= 0.0:
      raise ValueError(f"plan_ts_misfit = {self.plan_ts_misfit}; allowed: a number >= 0")
    if not 0.0 < self.mutation_min <= 1.0:
      raise ValueError(f"mutation_min = {self.mutation_min}; allowed: a number in (0, 1]")


class PGState(NamedTuple):
  """Agent state.

  Attributes:
    params: ``{"theta_w" [L, 8], "theta_a" [L, 8]}`` (factored) or ``{"theta" [L, 64]}``
      (joint), plus ``"prior"`` (MLP weights) when enabled.
    opt_state: Adam state.
    step: int32 number of updates.
    gram: float32 ``[D, D]`` weighted ``X^T X`` of the accuracy model's one-hot features
      (``D = 16 L + 17``; ``[1, 1]`` when model-free).
    moment: float32 ``[D]`` weighted ``X^T y``.
    coef: float32 ``[D]`` the model's coefficients (the ridge solution).
    yy: float32 weighted sum of squared targets (residual variance).
    wsum: float32 sum of the fit weights.
    plan_err: float32 moving average of how much the model over-predicted the accuracy of
      planned candidates (out of sample; scales the planning margins).
    model_sd: float32 weighted in-sample residual std of the model (points).
    mutation: float32 probability of redrawing a layer of a sampled candidate (adapted).
  """

  params: Any
  opt_state: Any
  step: jax.Array
  gram: jax.Array
  moment: jax.Array
  coef: jax.Array
  yy: jax.Array
  wsum: jax.Array
  plan_err: jax.Array
  model_sd: jax.Array
  mutation: jax.Array


def _mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
  layers = []
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (k, din, dout) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    last = i == len(sizes) - 2
    w = (
      jnp.zeros((din, dout), jnp.float32)
      if last
      else jax.random.normal(k, (din, dout), jnp.float32) * jnp.sqrt(2.0 / din)
    )
    layers.append({"w": w, "b": jnp.zeros((dout,), jnp.float32)})
  return layers


def _mlp(layers: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  for i, p in enumerate(layers):
    x = x @ p["w"] + p["b"]
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x[..., 0]


def utilities(
  reward: jax.Array, valid: jax.Array, kind: str = "rank", elite_frac: float = 0.25
) -> jax.Array:
  """Advantages of a population (0 on invalid candidates; zero-mean over the valid ones).

  Args:
    reward: float ``[N]``.
    valid: bool ``[N]``.
    kind: one of :data:`UTILITIES`.
    elite_frac: elite share for ``"elite"``.

  Returns:
    float32 ``[N]``. Ties (e.g. repeated policies) get equal utilities.
  """
  r = jnp.asarray(reward, jnp.float32)
  v = jnp.asarray(valid, bool)
  vf = v.astype(jnp.float32)
  nv = jnp.maximum(jnp.sum(vf), 1.0)
  if kind == "zscore":
    mean = jnp.sum(r * vf) / nv
    std = jnp.sqrt(jnp.sum(((r - mean) * vf) ** 2) / nv)
    return jnp.where(v, (r - mean) / (std + 1e-8), 0.0)
  less = jnp.sum(v[None, :] & (r[None, :] < r[:, None]), axis=1).astype(jnp.float32)
  eq = jnp.sum(v[None, :] & (r[None, :] == r[:, None]), axis=1).astype(jnp.float32)
  rank = less + 0.5 * (eq - 1.0)  # 0 .. nv-1, ties averaged
  if kind == "rank":
    u = rank / jnp.maximum(nv - 1.0, 1.0) - 0.5
    return jnp.where(v, u, 0.0)
  k = jnp.maximum(jnp.round(elite_frac * nv), 1.0)
  elite = rank >= nv - k
  u = jnp.where(elite, 1.0 / k, -1.0 / jnp.maximum(nv - k, 1.0))
  return jnp.where(v & (nv > 1.0), u, 0.0)


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
  f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
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


def make_pg(
  space: space_lib.SearchSpace,
  specs: Sequence[LayerSpec],
  cost_table: Any,
  config: PGConfig = PGConfig(),
  tiles: Any = None,
  acc_target: float | None = None,
) -> Agent:
  """Builds the policy-gradient agent.

  Model-based updates (``config.model_steps > 0``, Dyna style): besides the REINFORCE step on
  the real candidates, each ``tell`` fits an additive accuracy model
  ``acc ~ c + sum_l u_l[w_l] + v_l[a_l]`` by weighted ridge regression on every candidate
  evaluated so far (sufficient statistics in the state, so the fit costs ``O(D^3)`` with
  ``D = 16 L + 17``, whatever the history length), then takes ``model_steps`` more REINFORCE
  steps on ``model_population`` imagined candidates scored by the model's accuracy and the
  exact cost, with the real reward formula. Real evaluations then go where the model (which
  is corrected by every batch) expects the best policies. Quantisation damage is close to
  additive over layers for small perturbations (the assumption behind HAWQ's ILP), so the
  model is accurate exactly where it matters, near the accuracy target.

  Args:
    space: the search space (masks).
    specs: layer geometry (features).
    cost_table: ``[L, 8, 8]`` latency table (features; cost of imagined candidates).
    config: hyperparameters.
    tiles: optional ``[L, 8, 8]`` tile table (a feature).
    acc_target: the accuracy target, required by model-based updates.

  Returns:
    The :class:`~cimjax.search.agent.Agent` (``name="pg"``).
  """
  cfg = config
  use_model = bool(cfg.model_steps or cfg.plan)
  if use_model and acc_target is None:
    raise ValueError("model-based PG (model_steps > 0 or plan > 0) needs acc_target")
  if cfg.plan >= cfg.population:
    raise ValueError(f"plan = {cfg.plan} must be below population = {cfg.population}")
  num = space.num_layers
  table = np.asarray(cost_table, np.float64)
  lfeat = jnp.asarray(feat_lib.layer_features(specs, table, space, tiles))
  wf, af, jf = (jnp.asarray(x) for x in feat_lib.option_features(table))
  w_mask = jnp.asarray(space.w_mask)
  a_mask = jnp.asarray(space.a_mask)
  j_mask = jnp.asarray(space.mask.reshape(num, 64))
  ratio_table = jnp.asarray(table / cost_lib.baseline_cost(table), jnp.float32)
  in_dim = feat_lib.NUM_LAYER_FEATURES + feat_lib.NUM_OPTION_FEATURES
  tx = standard_promotion(optax.adam(cfg.learning_rate, b1=cfg.b1))
  dim = 16 * num + 17 if use_model else 1
  reg32 = jnp.asarray(model_ridge_penalty(num, cfg.model_ridge), jnp.float32)
  base_cost = float(cost_lib.baseline_cost(table))
  cost32 = jnp.asarray(table, jnp.float32)
  target32 = jnp.asarray(0.0 if acc_target is None else acc_target, jnp.float32)

  def prior_input(opt_feats: jax.Array) -> jax.Array:
    k = opt_feats.shape[1]
    lf = jnp.broadcast_to(lfeat[:, None, :], (num, k, lfeat.shape[-1]))
    return jnp.concatenate([lf, opt_feats], axis=-1)

  x_w, x_a, x_j = prior_input(wf), prior_input(af), prior_input(jf)

  def logits(params: Any) -> tuple[jax.Array, ...]:
    if cfg.head == "factored":
      lw, la = params["theta_w"], params["theta_a"]
      if cfg.prior:
        lw = lw + _mlp(params["prior_w"], x_w)
        la = la + _mlp(params["prior_a"], x_a)
      return jnp.where(w_mask, lw, NEG), jnp.where(a_mask, la, NEG)
    lj = params["theta"]
    if cfg.prior:
      lj = lj + _mlp(params["prior"], x_j)
    return (jnp.where(j_mask, lj, NEG),)

  def init(key: jax.Array) -> PGState:
    kw, ka = jax.random.split(key)
    sizes = (in_dim, cfg.hidden, cfg.hidden, 1)
    if cfg.head == "factored":
      params = {
        "theta_w": jnp.zeros((num, 8), jnp.float32),
        "theta_a": jnp.zeros((num, 8), jnp.float32),
      }
      if cfg.prior:
        params["prior_w"] = _mlp_init(kw, sizes)
        params["prior_a"] = _mlp_init(ka, sizes)
    else:
      params = {"theta": jnp.zeros((num, 64), jnp.float32)}
      if cfg.prior:
        params["prior"] = _mlp_init(kw, sizes)
    return PGState(
      params=params,
      opt_state=tx.init(params),
      step=jnp.zeros((), jnp.int32),
      gram=jnp.zeros((dim, dim), jnp.float32),
      moment=jnp.zeros((dim,), jnp.float32),
      coef=jnp.zeros((dim,), jnp.float32),
      yy=jnp.zeros((), jnp.float32),
      wsum=jnp.zeros((), jnp.float32),
      plan_err=jnp.zeros((), jnp.float32),
      model_sd=jnp.zeros((), jnp.float32),
      mutation=jnp.zeros((), jnp.float32),
    )

  def sample(params: Any, key: jax.Array, n: int) -> jax.Array:
    lg = logits(params)
    if cfg.head == "factored":
      kw, ka = jax.random.split(key)
      w = jax.random.categorical(kw, lg[0], axis=-1, shape=(n, num))
      a = jax.random.categorical(ka, lg[1], axis=-1, shape=(n, num))
    else:
      j = jax.random.categorical(key, lg[0], axis=-1, shape=(n, num))
      w, a = j // 8, j % 8
    return jnp.stack([w + 1, a + 1], axis=-1).astype(jnp.int32)

  n_sample = cfg.population - cfg.plan
  lo, hi = cfg.plan_margins
  n_det = cfg.plan - min(cfg.plan_thompson, cfg.plan)
  margins_det = np.linspace(lo, hi, n_det) if n_det > 1 else np.asarray([max(lo, 0.0)] * n_det)

  n_ts = min(cfg.plan_thompson, cfg.plan)

  def plan_front(c: np.ndarray) -> tuple[Any, np.ndarray]:
    """The exact (cost, predicted accuracy) Pareto front of the model with coefficients c."""
    from cimjax.search import baselines  # pylint: disable=g-import-not-at-top

    cw = c[: 16 * num].reshape(num, 16) + c[16 * num : 16 * num + 16][None, :]
    cw[:, 7] = cw[:, 15] = 0.0  # 8 bits: the reference
    damage = -(cw[:, :8, None] + cw[:, None, 8:])  # [L, 8, 8], 0 at 8/8
    front = baselines.pareto_dp(space, table, damage)
    return front, c[-1] - front.damage  # predicted acc - target

  def pick(front: Any, rel: np.ndarray, margin: float) -> np.ndarray:
    ok = np.flatnonzero(rel >= margin)
    i = int(ok[0]) if ok.size else int(np.argmax(rel))  # cheapest predicted-feasible
    return front.policy(i)

  def host_plan(
    coef: np.ndarray, sigma: np.ndarray, diag: np.ndarray, seed: np.ndarray
  ) -> np.ndarray:
    c = np.asarray(coef, np.float64)
    sd = max(float(sigma), cfg.plan_min_sigma)
    out = np.zeros((cfg.plan, num, 2), np.int32)
    det = cfg.plan - n_ts
    if det:  # the model's optimum per margin
      front, rel = plan_front(c)
      for k in range(det):
        out[k] = pick(front, rel, float(margins_det[k]) * sd)
    # Thompson samples: optima of models drawn around the fit (diagonal posterior), so the
    # planner also tries what the data leave uncertain (e.g. equal-cost alternatives)
    rng = np.random.default_rng(int(seed))
    post = thompson_std(diag, sd, num, cfg.plan_ts_misfit)
    for k in range(det, cfg.plan):
      front, rel = plan_front(c + cfg.plan_ts_scale * post * rng.standard_normal(c.shape))
      out[k] = pick(front, rel, 0.0)
    return out

  def mutate(pols: jax.Array, key: jax.Array, rate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Redraws each layer's (w, a) uniformly among the allowed pairs with probability rate.

    Returns the candidates and which of them were changed (bool ``[N]``).
    """
    from cimjax import policy as policy_lib  # pylint: disable=g-import-not-at-top

    ku, kr = jax.random.split(key)
    fresh = policy_lib.random_policies(kr, j_mask.reshape(num, 8, 8), pols.shape[0])
    flip = jax.random.uniform(ku, pols.shape[:2]) < rate
    out = jnp.where(flip[..., None], fresh, pols)
    return out, jnp.any(out != pols, axis=(1, 2))

  def ask(state: PGState, key: jax.Array) -> tuple[jax.Array, Any]:
    pols = sample(state.params, key, cfg.population)
    extra = pols[n_sample:]  # fill the planned slots while the model has no data
    pols = pols[:n_sample]
    on_policy = jnp.ones((n_sample,), bool)
    if cfg.mutation_target:
      # once the distribution has collapsed it only repeats policies (which cost no budget)
      # and the search would stall with budget left: mutate the samples at the adapted rate,
      # so the rest of the budget explores around the mode. Changed samples are off-policy:
      # they feed the model, not the REINFORCE update.
      pols, changed = mutate(pols, jax.random.fold_in(key, 11), state.mutation)
      on_policy = on_policy & ~changed
    if not cfg.plan:
      return pols, on_policy
    no_data = state.wsum <= 0.0
    seed = jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1, jnp.int32)
    planned = jax.pure_callback(
      host_plan,
      jax.ShapeDtypeStruct((cfg.plan, num, 2), jnp.int32),
      state.coef,
      jnp.maximum(state.model_sd, state.plan_err),
      jnp.diagonal(state.gram) + reg32,
      seed,
    )
    planned = jnp.where(no_data, extra, planned)
    on_policy = jnp.concatenate([on_policy, jnp.broadcast_to(no_data, (cfg.plan,))])
    return jnp.concatenate([pols, planned], axis=0), on_policy

  def log_prob(params: Any, policies: jax.Array) -> jax.Array:
    lg = logits(params)
    l_idx = jnp.arange(num)
    if cfg.head == "factored":
      lw = jax.nn.log_softmax(lg[0], axis=-1)
      la = jax.nn.log_softmax(lg[1], axis=-1)
      lp = lw[l_idx, policies[..., 0] - 1] + la[l_idx, policies[..., 1] - 1]
    else:
      lj = jax.nn.log_softmax(lg[0], axis=-1)
      lp = lj[l_idx, (policies[..., 0] - 1) * 8 + policies[..., 1] - 1]
    return lp.sum(axis=-1)

  def entropy(params: Any) -> jax.Array:
    ent = 0.0
    for lg in logits(params):
      logp = jax.nn.log_softmax(lg, axis=-1)
      ent = ent - jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.mean(ent)

  def expected_ratio(params: Any) -> jax.Array:
    lg = logits(params)
    if cfg.head == "factored":
      return cost_lib.expected_cost_factored(ratio_table, lg[0], lg[1])
    return cost_lib.expected_cost(ratio_table, lg[0].reshape(num, 8, 8))

  def pg_step(
    params: Any,
    opt_state: Any,
    policies: jax.Array,
    reward: jax.Array,
    valid: jax.Array,
    entropy_coef: float = cfg.entropy_coef,
  ) -> tuple[Any, Any, dict[str, jax.Array]]:
    u = utilities(reward, valid, cfg.utility, cfg.elite_frac)
    nv = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)

    def loss_fn(p):
      lp = log_prob(p, policies)
      ent = entropy(p)
      loss = -jnp.sum(u * lp) / nv - entropy_coef * ent
      er = expected_ratio(p) if cfg.cost_coef else jnp.zeros((), jnp.float32)
      return loss + cfg.cost_coef * er, (ent, er)

    (loss, (ent, er)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # No update when nothing was valid (e.g. the budget ran out mid-batch).
    ok = jnp.any(valid)
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    return (
      jax.tree.map(keep, new_params, params),
      jax.tree.map(keep, new_opt, opt_state),
      {"loss": loss, "entropy": ent, "expected_cost_ratio": er},
    )

  def host_model(gram, moment, yy, wsum, plan_err, coef, policies, accuracy, new, planned):
    # NumPy only in here: outside jit the arguments may arrive as jax Arrays, and a jax
    # operation in a callback (e.g. indexing one) can deadlock against the dispatching thread
    policies, new, planned = np.asarray(policies), np.asarray(new), np.asarray(planned, bool)
    rel = np.asarray(accuracy, np.float64) - float(target32)
    err_rate = cfg.plan_err_rate
    plan_err = np.float32(plan_err)
    if cfg.plan and np.any(planned):
      # out-of-sample over-prediction of the planned candidates (the planner exploits errors)
      pred = model_features(policies[planned]) @ np.asarray(coef, np.float64)
      err = float(np.mean(np.maximum(pred - rel[planned], 0.0)))
      plan_err = np.float32((1.0 - err_rate) * float(plan_err) + err_rate * err)
    out = model_update(gram, moment, yy, wsum, policies, rel, new, cfg.model_ridge, cfg.model_tau)
    return (*out, plan_err)

  def predict(coef: jax.Array, policies: jax.Array) -> jax.Array:
    return model_features(policies, jnp) @ coef

  def adapt_mutation(rate: jax.Array, new: jax.Array) -> jax.Array:
    if not cfg.mutation_target:
      return rate
    share = jnp.mean(new[:n_sample].astype(jnp.float32))  # new policies among the samples
    up = jnp.minimum(jnp.maximum(rate * cfg.mutation_gain, cfg.mutation_min), 1.0)
    down = rate / cfg.mutation_gain
    return jnp.where(
      share < cfg.mutation_target, up, jnp.where(down < cfg.mutation_min, 0.0, down)
    ).astype(jnp.float32)

  def tell(
    state: PGState, policies: jax.Array, out: Any, aux: Any = None, key: jax.Array | None = None
  ) -> tuple[PGState, dict[str, Any]]:
    # on-policy samples: not planned (off-policy), not mutated
    sampled = (jnp.arange(cfg.population) < n_sample) if aux is None else aux
    params, opt_state, metrics = pg_step(
      state.params, state.opt_state, policies, out.reward, out.valid & sampled
    )
    gram, moment, coef, yy, wsum = state.gram, state.moment, state.coef, state.yy, state.wsum
    plan_err, model_sd = state.plan_err, state.model_sd
    if use_model:
      # the model's statistics and fit live on the host in float64 (see model_update)
      planned = out.valid & (jnp.arange(cfg.population) >= n_sample) & ~sampled
      f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
      gram, moment, yy, wsum, coef, model_sd, plan_err = jax.pure_callback(
        host_model,
        (f32(dim, dim), f32(dim), f32(), f32(), f32(dim), f32(), f32()),
        gram,
        moment,
        yy,
        wsum,
        plan_err,
        state.coef,
        policies,
        jnp.asarray(out.accuracy, jnp.float32),
        out.new,
        planned,
      )
    if cfg.model_steps:
      keys = jax.random.split(key, cfg.model_steps)

      def imagine(carry, k):
        p, o = carry
        pols = sample(p, k, cfg.model_population)
        acc_hat = predict(coef, pols) + target32
        ratio = cost_lib.policy_cost(cost32, pols) / base_cost
        rew = reward_lib.reward(acc_hat, ratio, target32)
        p, o, m = pg_step(
          p, o, pols, rew, jnp.ones((cfg.model_population,), bool), cfg.model_entropy_coef
        )
        return (p, o), m["entropy"]

      (params, opt_state), _ = jax.lax.scan(imagine, (params, opt_state), keys)
    new_state = PGState(
      params=params,
      opt_state=opt_state,
      step=state.step + jnp.any(out.valid).astype(jnp.int32),
      gram=gram,
      moment=moment,
      coef=coef,
      yy=yy,
      wsum=wsum,
      plan_err=plan_err,
      model_sd=model_sd,
      mutation=adapt_mutation(state.mutation, out.new),
    )
    return new_state, metrics

  return Agent(
    name="pg",
    population=cfg.population,
    init=init,
    ask=ask,
    tell=tell,
    config={"agent": "pg", **dataclasses.asdict(cfg)},
  )


__all__ = ["HEADS", "PGConfig", "PGState", "UTILITIES", "make_pg", "thompson_std", "utilities"]
