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

Structure (pure functions of explicit state, purejaxrl style): the distribution and its update
are in :mod:`cimjax.search.reinforce`, the accuracy model and the planner in
:mod:`cimjax.search.planner`, the mutation rate in :mod:`cimjax.search.mutation`; here
:func:`pg_init`, :func:`pg_ask` and :func:`pg_tell` wire them together over a :class:`PGState`,
with the constants in a :class:`PGSetup`, and :func:`make_pg` returns them as an
:class:`~cimjax.search.agent.Agent`. All are jittable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cimjax import cost as cost_lib
from cimjax.search import mutation as mutation_lib
from cimjax.search import planner as planner_lib
from cimjax.search import reinforce
from cimjax.search import reward as reward_lib
from cimjax.search import space as space_lib
from cimjax.search.agent import Agent, standard_promotion
from cimjax.search.planner import model_features, model_ridge_penalty, model_update, thompson_std
from cimjax.search.reinforce import HEADS, UTILITIES, utilities
from cimjax.spec import LayerSpec


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
      (0: model-free REINFORCE). See :func:`imagine`.
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

  def planner(self) -> planner_lib.PlannerConfig:
    """The settings of the accuracy model and the planner."""
    return planner_lib.PlannerConfig(
      plan=self.plan,
      margins=self.plan_margins,
      thompson=self.plan_thompson,
      min_sigma=self.plan_min_sigma,
      err_rate=self.plan_err_rate,
      ts_scale=self.plan_ts_scale,
      ts_misfit=self.plan_ts_misfit,
      ridge=self.model_ridge,
      tau=self.model_tau,
    )


class PGState(NamedTuple):
  """Agent state.

  Attributes:
    policy: the distribution's parameters and Adam state
      (:class:`~cimjax.search.reinforce.ReinforceState`).
    model: the accuracy model (:class:`~cimjax.search.planner.ModelState`; ``D = 16 L + 17``,
      or ``D = 1`` when model-free).
    step: int32 ``[]`` number of iterations with a valid candidate.
    mutation: float32 ``[]`` probability of redrawing a layer of a sampled candidate (adapted,
      :mod:`cimjax.search.mutation`).
  """

  policy: reinforce.ReinforceState
  model: planner_lib.ModelState
  step: jax.Array
  mutation: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class PGSetup:
  """The constants of one PG agent (closed over by its functions, never traced).

  Attributes:
    config: the hyperparameters.
    space: the search space.
    pdef: the policy distribution's static part.
    tx: the optimiser (Adam).
    cost_table: float64 ``[L, 8, 8]`` latency table (the planner's DP).
    cost32: float32 ``[L, 8, 8]`` the same (costs of imagined candidates).
    base_cost: cost of the 8/8 policy.
    acc_target: float32 ``[]`` the accuracy target (0 when model-free).
    use_model: whether the accuracy model is fitted (``model_steps`` or ``plan``).
  """

  config: PGConfig
  space: space_lib.SearchSpace
  pdef: reinforce.PolicyDef
  tx: optax.GradientTransformation
  cost_table: np.ndarray
  cost32: jax.Array
  base_cost: float
  acc_target: jax.Array
  use_model: bool

  @property
  def n_sample(self) -> int:
    """Sampled (not planned) candidates per iteration."""
    return self.config.population - self.config.plan


def pg_init(setup: PGSetup, key: jax.Array) -> PGState:
  """The initial state: uniform distribution, empty model, no mutation."""
  num = setup.space.num_layers
  dim = planner_lib.model_dim(num) if setup.use_model else 1
  return PGState(
    policy=reinforce.init(setup.pdef, setup.tx, key, setup.config.hidden),
    model=planner_lib.model_init(dim),
    step=jnp.zeros((), jnp.int32),
    mutation=jnp.zeros((), jnp.float32),
  )


def pg_ask(setup: PGSetup, state: PGState, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The next population: ``n_sample`` (mutated) samples, then ``plan`` planned candidates.

  Mutated samples are off-policy: they feed the model, not the REINFORCE update; so are the
  planned ones, except before the model has data, when samples fill the planned slots.

  Returns:
    ``(policies int32 [P, L, 2], on_policy bool [P])``.
  """
  cfg = setup.config
  n_sample = setup.n_sample
  pols = reinforce.sample(setup.pdef, state.policy.params, key, cfg.population)
  extra = pols[n_sample:]  # fill the planned slots while the model has no data
  pols = pols[:n_sample]
  on_policy = jnp.ones((n_sample,), bool)
  if cfg.mutation_target:
    # once the distribution has collapsed it only repeats policies (which cost no budget)
    # and the search would stall with budget left: mutate the samples at the adapted rate
    pair_mask = setup.pdef.j_mask.reshape(setup.space.num_layers, 8, 8)
    pols, changed = mutation_lib.mutate(
      pols, jax.random.fold_in(key, 11), state.mutation, pair_mask
    )
    on_policy = on_policy & ~changed
  if not cfg.plan:
    return pols, on_policy
  no_data = state.model.wsum <= 0.0
  planned = planner_lib.plan_candidates(
    state.model, key, space=setup.space, cost_table=setup.cost_table, config=cfg.planner()
  )
  planned = jnp.where(no_data, extra, planned)
  on_policy = jnp.concatenate([on_policy, jnp.broadcast_to(no_data, (cfg.plan,))])
  return jnp.concatenate([pols, planned], axis=0), on_policy


def reinforce_step(
  setup: PGSetup,
  policy: reinforce.ReinforceState,
  policies: jax.Array,
  reward: jax.Array,
  valid: jax.Array,
  entropy_coef: float,
) -> tuple[reinforce.ReinforceState, dict[str, jax.Array]]:
  """:func:`cimjax.search.reinforce.update` with the agent's hyperparameters."""
  cfg = setup.config
  return reinforce.update(
    setup.pdef,
    setup.tx,
    policy,
    policies,
    reward,
    valid,
    entropy_coef=entropy_coef,
    cost_coef=cfg.cost_coef,
    utility=cfg.utility,
    elite_frac=cfg.elite_frac,
  )


def imagine(
  setup: PGSetup, policy: reinforce.ReinforceState, coef: jax.Array, key: jax.Array
) -> reinforce.ReinforceState:
  """``model_steps`` REINFORCE steps on imagined candidates (model-based updates, Dyna style).

  Each step samples ``model_population`` candidates, scores them with the accuracy model's
  prediction and the exact cost through the real reward formula, and updates the distribution
  (entropy bonus ``model_entropy_coef``). Real evaluations then go where the model (corrected by
  every batch) expects the best policies. Quantisation damage is close to additive over layers
  for small perturbations (the assumption behind HAWQ's ILP), so the model is accurate exactly
  where it matters, near the accuracy target.

  Args:
    setup: the agent's constants.
    policy: the distribution after the real update.
    coef: float32 ``[D]`` the model's coefficients.
    key: PRNG key (split into one key per step).
  """
  cfg = setup.config
  target = setup.acc_target

  def step(pol: reinforce.ReinforceState, k: jax.Array):
    pols = reinforce.sample(setup.pdef, pol.params, k, cfg.model_population)
    acc_hat = planner_lib.predict(coef, pols) + target
    ratio = cost_lib.policy_cost(setup.cost32, pols) / setup.base_cost
    rew = reward_lib.reward(acc_hat, ratio, target)
    valid = jnp.ones((cfg.model_population,), bool)
    pol, m = reinforce_step(setup, pol, pols, rew, valid, cfg.model_entropy_coef)
    return pol, m["entropy"]

  policy, _ = jax.lax.scan(step, policy, jax.random.split(key, cfg.model_steps))
  return policy


def pg_tell(
  setup: PGSetup,
  state: PGState,
  policies: jax.Array,
  out: Any,
  aux: Any = None,
  key: jax.Array | None = None,
) -> tuple[PGState, dict[str, jax.Array]]:
  """Learns from a scored population (``out`` an :class:`~cimjax.search.env.EvalOut`).

  The on-policy candidates (``aux`` from :func:`pg_ask`; default: the sampled slots) enter the
  REINFORCE update; every new candidate refits the accuracy model on the host; then come the
  imagined updates (``model_steps``) and the mutation-rate adaptation.

  Returns:
    ``(state, {"loss", "entropy", "expected_cost_ratio"})`` (metrics of the real update).
  """
  cfg = setup.config
  n_sample = setup.n_sample
  slots = jnp.arange(cfg.population)
  sampled = (slots < n_sample) if aux is None else aux
  policy, metrics = reinforce_step(
    setup, state.policy, policies, out.reward, out.valid & sampled, cfg.entropy_coef
  )
  model = state.model
  if setup.use_model:
    # the model's statistics and fit live on the host in float64 (planner.model_update)
    planned = out.valid & (slots >= n_sample) & ~sampled
    model = planner_lib.refit(
      model,
      policies,
      out.accuracy,
      out.new,
      planned,
      acc_target=float(setup.acc_target),
      config=cfg.planner(),
    )
  if cfg.model_steps:
    policy = imagine(setup, policy, model.coef, key)
  mutation = mutation_lib.adapt_rate(
    state.mutation,
    out.new[:n_sample],  # new policies among the samples
    target=cfg.mutation_target,
    gain=cfg.mutation_gain,
    min_rate=cfg.mutation_min,
  )
  new_state = PGState(
    policy=policy,
    model=model,
    step=state.step + jnp.any(out.valid).astype(jnp.int32),
    mutation=mutation,
  )
  return new_state, metrics


def make_pg(
  space: space_lib.SearchSpace,
  specs: Sequence[LayerSpec],
  cost_table: Any,
  config: PGConfig = PGConfig(),
  tiles: Any = None,
  acc_target: float | None = None,
) -> Agent:
  """Builds the policy-gradient agent (:func:`pg_init`, :func:`pg_ask`, :func:`pg_tell`).

  Args:
    space: the search space (masks).
    specs: layer geometry (features).
    cost_table: ``[L, 8, 8]`` latency table (features; the planner; imagined candidates).
    config: hyperparameters.
    tiles: optional ``[L, 8, 8]`` tile table (a feature).
    acc_target: the accuracy target, required by the model and the planner.

  Returns:
    The :class:`~cimjax.search.agent.Agent` (``name="pg"``).

  Raises:
    ValueError: a model-based agent without ``acc_target``, or ``plan >= population``.
  """
  cfg = config
  use_model = bool(cfg.model_steps or cfg.plan)
  if use_model and acc_target is None:
    raise ValueError("model-based PG (model_steps > 0 or plan > 0) needs acc_target")
  if cfg.plan >= cfg.population:
    raise ValueError(f"plan = {cfg.plan} must be below population = {cfg.population}")
  table = np.asarray(cost_table, np.float64)
  setup = PGSetup(
    config=cfg,
    space=space,
    pdef=reinforce.make_policy_def(
      space, specs, table, head=cfg.head, prior=cfg.prior, tiles=tiles
    ),
    tx=standard_promotion(optax.adam(cfg.learning_rate, b1=cfg.b1)),
    cost_table=table,
    cost32=jnp.asarray(table, jnp.float32),
    base_cost=float(cost_lib.baseline_cost(table)),
    acc_target=jnp.asarray(0.0 if acc_target is None else acc_target, jnp.float32),
    use_model=use_model,
  )
  return Agent(
    name="pg",
    population=config.population,
    init=functools.partial(pg_init, setup),
    ask=functools.partial(pg_ask, setup),
    tell=functools.partial(pg_tell, setup),
    config={"agent": "pg", **dataclasses.asdict(config)},
  )


__all__ = [
  "HEADS",
  "PGConfig",
  "PGSetup",
  "PGState",
  "UTILITIES",
  "imagine",
  "make_pg",
  "model_features",
  "model_ridge_penalty",
  "model_update",
  "pg_ask",
  "pg_init",
  "pg_tell",
  "reinforce_step",
  "thompson_std",
  "utilities",
]
