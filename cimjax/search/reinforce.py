"""The REINFORCE core of the policy-gradient agent, as pure functions of explicit state.

The policy is a product of independent categorical distributions, one per layer and operand
(``head="factored"``: ``p(w_l) p(a_l)`` over the allowed bits) or one per layer over the
allowed (w, a) pairs (``head="joint"``). Logits are ``theta[l, b] + prior(features(l, b))``:
free per-layer logits plus, optionally, a small MLP shared across layers that scores each option
from the layer's geometry and hardware cost (:mod:`cimjax.search.features`); it starts at zero
(uniform distribution). Masked choices get logit :data:`NEG`, so their probability is exactly
zero.

Pieces (optax style: small pure functions, NamedTuple state):

- :class:`PolicyDef` (the static description: masks, prior inputs, cost ratios) from
  :func:`make_policy_def`;
- :func:`init_params`, :func:`logits`, :func:`sample`, :func:`log_prob`, :func:`entropy`,
  :func:`expected_cost_ratio`: the distribution;
- :func:`utilities` (rank, z-score or elite advantages) and :func:`update`, one optax step of
  the score-function loss on a :class:`ReinforceState`.

Everything is jittable; see docs/architecture.md for how the agent uses it.
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
from cimjax.search import space as space_lib
from cimjax.spec import LayerSpec

NEG = -1e9
HEADS = ("factored", "joint")
UTILITIES = ("rank", "zscore", "elite")


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyDef:
  """The static part of a policy distribution (closed over, never traced).

  Attributes:
    head: one of :data:`HEADS`.
    prior: whether the feature-conditioned prior network is used.
    w_mask: bool ``[L, 8]`` allowed weight bits (index ``b - 1``).
    a_mask: bool ``[L, 8]`` allowed activation bits.
    j_mask: bool ``[L, 64]`` allowed (w, a) pairs, flattened ``(w - 1) * 8 + a - 1``.
    x_w: float32 ``[L, 8, F]`` prior-network inputs of the weight options
      (``F = NUM_LAYER_FEATURES + NUM_OPTION_FEATURES``).
    x_a: float32 ``[L, 8, F]`` prior-network inputs of the activation options.
    x_j: float32 ``[L, 64, F]`` prior-network inputs of the joint options.
    ratio_table: float32 ``[L, 8, 8]`` cost table over the baseline (8/8) cost.
  """

  head: str
  prior: bool
  w_mask: jax.Array
  a_mask: jax.Array
  j_mask: jax.Array
  x_w: jax.Array
  x_a: jax.Array
  x_j: jax.Array
  ratio_table: jax.Array

  @property
  def num_layers(self) -> int:
    return self.w_mask.shape[0]

  @property
  def in_dim(self) -> int:
    return self.x_w.shape[-1]


class ReinforceState(NamedTuple):
  """Learnt state of the distribution.

  Attributes:
    params: ``{"theta_w" [L, 8], "theta_a" [L, 8]}`` (factored) or ``{"theta" [L, 64]}``
      (joint), plus ``"prior_w"``/``"prior_a"`` (factored) or ``"prior"`` (joint) MLP weights
      when the prior is enabled.
    opt_state: the optimiser's state.
  """

  params: Any
  opt_state: Any


def make_policy_def(
  space: space_lib.SearchSpace,
  specs: Sequence[LayerSpec],
  cost_table: Any,
  *,
  head: str = "factored",
  prior: bool = True,
  tiles: Any = None,
) -> PolicyDef:
  """The :class:`PolicyDef` of a space.

  Args:
    space: the search space (masks).
    specs: layer geometry (prior features).
    cost_table: ``[L, 8, 8]`` latency table.
    head: one of :data:`HEADS`.
    prior: use the prior network.
    tiles: optional ``[L, 8, 8]`` tile table (a feature).
  """
  num = space.num_layers
  table = np.asarray(cost_table, np.float64)
  lfeat = jnp.asarray(feat_lib.layer_features(specs, table, space, tiles))
  wf, af, jf = (jnp.asarray(x) for x in feat_lib.option_features(table))

  def prior_input(opt_feats: jax.Array) -> jax.Array:
    k = opt_feats.shape[1]
    lf = jnp.broadcast_to(lfeat[:, None, :], (num, k, lfeat.shape[-1]))
    return jnp.concatenate([lf, opt_feats], axis=-1)

  return PolicyDef(
    head=head,
    prior=prior,
    w_mask=jnp.asarray(space.w_mask),
    a_mask=jnp.asarray(space.a_mask),
    j_mask=jnp.asarray(space.mask.reshape(num, 64)),
    x_w=prior_input(wf),
    x_a=prior_input(af),
    x_j=prior_input(jf),
    ratio_table=jnp.asarray(table / cost_lib.baseline_cost(table), jnp.float32),
  )


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
  """He-normal MLP weights of layer ``sizes``; the last layer starts at zero (output 0)."""
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


def mlp(layers: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  """ReLU MLP with a scalar output: ``[..., F] -> [...]``."""
  for i, p in enumerate(layers):
    x = x @ p["w"] + p["b"]
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x[..., 0]


def init_params(pdef: PolicyDef, key: jax.Array, hidden: int) -> dict[str, Any]:
  """Zero logits (the uniform distribution over the allowed bits) and the prior's weights.

  Args:
    pdef: the policy definition.
    key: PRNG key of the prior network.
    hidden: width of the prior's two hidden layers.
  """
  num = pdef.num_layers
  kw, ka = jax.random.split(key)
  sizes = (pdef.in_dim, hidden, hidden, 1)
  if pdef.head == "factored":
    params = {
      "theta_w": jnp.zeros((num, 8), jnp.float32),
      "theta_a": jnp.zeros((num, 8), jnp.float32),
    }
    if pdef.prior:
      params["prior_w"] = mlp_init(kw, sizes)
      params["prior_a"] = mlp_init(ka, sizes)
  else:
    params = {"theta": jnp.zeros((num, 64), jnp.float32)}
    if pdef.prior:
      params["prior"] = mlp_init(kw, sizes)
  return params


def init(
  pdef: PolicyDef, tx: optax.GradientTransformation, key: jax.Array, hidden: int
) -> ReinforceState:
  """The initial :class:`ReinforceState` (see :func:`init_params`)."""
  params = init_params(pdef, key, hidden)
  return ReinforceState(params=params, opt_state=tx.init(params))


def logits(pdef: PolicyDef, params: Any) -> tuple[jax.Array, ...]:
  """Masked logits: ``(w [L, 8], a [L, 8])`` (factored) or ``(wa [L, 64],)`` (joint)."""
  if pdef.head == "factored":
    lw, la = params["theta_w"], params["theta_a"]
    if pdef.prior:
      lw = lw + mlp(params["prior_w"], pdef.x_w)
      la = la + mlp(params["prior_a"], pdef.x_a)
    return jnp.where(pdef.w_mask, lw, NEG), jnp.where(pdef.a_mask, la, NEG)
  lj = params["theta"]
  if pdef.prior:
    lj = lj + mlp(params["prior"], pdef.x_j)
  return (jnp.where(pdef.j_mask, lj, NEG),)


def sample(pdef: PolicyDef, params: Any, key: jax.Array, n: int) -> jax.Array:
  """``n`` policies from the distribution: int32 ``[n, L, 2]`` (bits 1..8)."""
  num = pdef.num_layers
  lg = logits(pdef, params)
  if pdef.head == "factored":
    kw, ka = jax.random.split(key)
    w = jax.random.categorical(kw, lg[0], axis=-1, shape=(n, num))
    a = jax.random.categorical(ka, lg[1], axis=-1, shape=(n, num))
  else:
    j = jax.random.categorical(key, lg[0], axis=-1, shape=(n, num))
    w, a = j // 8, j % 8
  return jnp.stack([w + 1, a + 1], axis=-1).astype(jnp.int32)


def log_prob(pdef: PolicyDef, params: Any, policies: jax.Array) -> jax.Array:
  """float32 ``[N]`` log-probabilities of int ``[N, L, 2]`` policies (summed over layers)."""
  lg = logits(pdef, params)
  l_idx = jnp.arange(pdef.num_layers)
  if pdef.head == "factored":
    lw = jax.nn.log_softmax(lg[0], axis=-1)
    la = jax.nn.log_softmax(lg[1], axis=-1)
    lp = lw[l_idx, policies[..., 0] - 1] + la[l_idx, policies[..., 1] - 1]
  else:
    lj = jax.nn.log_softmax(lg[0], axis=-1)
    lp = lj[l_idx, (policies[..., 0] - 1) * 8 + policies[..., 1] - 1]
  return lp.sum(axis=-1)


def entropy(pdef: PolicyDef, params: Any) -> jax.Array:
  """float32 ``[]`` entropy per layer (nats; factored: weight + activation), mean over layers."""
  ent = 0.0
  for lg in logits(pdef, params):
    logp = jax.nn.log_softmax(lg, axis=-1)
    ent = ent - jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.mean(ent)


def expected_cost_ratio(pdef: PolicyDef, params: Any) -> jax.Array:
  """float32 ``[]`` exact expected cost ratio of a sampled policy (differentiable)."""
  lg = logits(pdef, params)
  if pdef.head == "factored":
    return cost_lib.expected_cost_factored(pdef.ratio_table, lg[0], lg[1])
  return cost_lib.expected_cost(pdef.ratio_table, lg[0].reshape(pdef.num_layers, 8, 8))


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


def update(
  pdef: PolicyDef,
  tx: optax.GradientTransformation,
  state: ReinforceState,
  policies: jax.Array,
  reward: jax.Array,
  valid: jax.Array,
  *,
  entropy_coef: float,
  cost_coef: float = 0.0,
  utility: str = "rank",
  elite_frac: float = 0.25,
) -> tuple[ReinforceState, dict[str, jax.Array]]:
  """One optimiser step of the score-function loss on a scored population.

  The loss is ``-sum_i u_i log p(x_i) / n_valid - entropy_coef * H + cost_coef * E[ratio]``
  with ``u`` the :func:`utilities`. Nothing changes when no candidate is valid (e.g. the budget
  ran out mid-batch).

  Args:
    pdef: the policy definition.
    tx: the optimiser.
    state: the current state.
    policies: int ``[N, L, 2]``.
    reward: float ``[N]``.
    valid: bool ``[N]``: the candidates that enter the update.
    entropy_coef: weight of the mean per-layer entropy bonus.
    cost_coef: weight of the exact expected-cost-ratio term (0: off).
    utility: one of :data:`UTILITIES`.
    elite_frac: elite share for ``"elite"``.

  Returns:
    ``(state, {"loss", "entropy", "expected_cost_ratio"})``.
  """
  u = utilities(reward, valid, utility, elite_frac)
  nv = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)

  def loss_fn(p):
    lp = log_prob(pdef, p, policies)
    ent = entropy(pdef, p)
    loss = -jnp.sum(u * lp) / nv - entropy_coef * ent
    er = expected_cost_ratio(pdef, p) if cost_coef else jnp.zeros((), jnp.float32)
    return loss + cost_coef * er, (ent, er)

  params, opt_state = state
  (loss, (ent, er)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ok = jnp.any(valid)
  keep = lambda new, old: jnp.where(ok, new, old)
  new_state = ReinforceState(
    params=jax.tree.map(keep, new_params, params), opt_state=jax.tree.map(keep, new_opt, opt_state)
  )
  return new_state, {"loss": loss, "entropy": ent, "expected_cost_ratio": er}


__all__ = [
  "HEADS",
  "NEG",
  "UTILITIES",
  "PolicyDef",
  "ReinforceState",
  "entropy",
  "expected_cost_ratio",
  "init",
  "init_params",
  "log_prob",
  "logits",
  "make_policy_def",
  "mlp",
  "mlp_init",
  "sample",
  "update",
  "utilities",
]
