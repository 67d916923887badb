"""Quantization-aware training: FP32 -> INT8 -> any-precision -> mixed-precision fine-tuning.

Building blocks (usable on their own, e.g. by the search's joint mode):

* :class:`TrainState`: an explicit pytree (params, batch statistics, optimizer state, step,
  PRNG key) that orbax saves and restores exactly.
* :func:`make_optimizer`: optax SGD with momentum or AdamW, linear warmup then cosine decay,
  weight decay on kernels only (masked off the clip tables, biases and batch-norm parameters).
* :class:`Trainer`: jitted ``train_step(state, batch, policy)``,
  ``anyprec_step(state, batch, policies [K, L, 2])`` and ``eval_step``. Policies are traced
  arguments, so changing bits never recompiles (``Trainer.trace_counts`` counts traces).
* :func:`calibrate_clips`: MSE-optimal clip tables (every bit-width row) from the weights and
  from a calibration batch of layer inputs.
* :func:`recalibrate_bn`: re-estimates batch-norm running statistics for one policy.
* :func:`evaluate`: accuracy and loss of one policy over a split (jitted, batched over data).

Stages (:func:`run_stage`, used by ``python -m launch.train``), each in ``workdir/<stage>/``,
each starting from the previous stage's final variables:

* ``fp32``: float pretraining (policy None).
* ``int8``: MSE calibration of every clip-table row, then QAT at 8/8 for all layers.
* ``anyprec``: any-precision QAT, one set of weights for every policy. Each step runs the
  "sandwich rule" (BigNAS / once-for-all): the max-bits policy, the min-bits policy and ``K``
  policies sampled uniformly among the allowed (w, a) pairs of each layer (``K = 1`` by
  default); the loss is the mean of their label cross-entropies. In-place distillation from the
  max-bits output is an option (``distill``); measured on Fashion-MNIST it did not beat the
  labels when starting from a converged INT8 model (BUILD_NOTES.md). Clip rows other than the
  max-bits one are re-calibrated from the INT8 weights first.
* ``finetune``: QAT of one given policy, from the anyprec (or int8) variables.

Batch norm: kept in float after the integer conv and its dequantisation scale, not folded into
the weights. Its per-channel affine merges with the per-channel dequantisation scale into the
digital periphery (requantisation) on CIM hardware, so folding would only change the weight
quantisation, not what the hardware can do. Batch statistics depend on the policy, so before
evaluating a policy the running statistics are re-estimated with :func:`recalibrate_bn` (exact
population averages over a few training batches, as in BigNAS/OFA "BN recalibration").

Determinism: the data order is a pure function of (seed, stage, epoch) and a step's randomness
a pure function of (key, step), so a run resumed from a checkpoint reaches bit-identical
parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cimjax import checkpoint as ckpt_lib
from cimjax import data as data_lib
from cimjax import quant
from cimjax.errors import ConfigError, StageError  # noqa: F401 (re-exported)
from cimjax.models import MODEL_NAMES, ModelDef, forward, get_model
from cimjax.optim import standard_promotion
from cimjax.trace import trace_specs

Array = jax.Array
PyTree = Any
STAGES = ("fp32", "int8", "anyprec", "finetune")
OPTIMIZERS = ("sgd", "adamw")
_STAGE_INDEX = {s: i for i, s in enumerate(STAGES)}


# ----------------------------------------------------------------------------------------------
# State and optimizer


@flax.struct.dataclass
class TrainState:
  """Everything a training stage needs to continue exactly where it stopped.

  Attributes:
    params: model parameters (kernels, biases, clip tables ``w_clip [B, C]``, ``a_clip [B]``).
    batch_stats: batch-norm running statistics (``{}`` for models without batch norm).
    opt_state: optax state.
    step: int32 scalar, steps taken in this stage.
    key: uint32 ``[2]`` PRNG key of the stage; a step's randomness is
      ``fold_in(key, step)``.
  """

  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: Array
  key: Array

  @property
  def variables(self) -> dict[str, PyTree]:
    """``{"params", ["batch_stats"]}`` for :func:`cimjax.models.forward`."""
    return variables_dict(self.params, self.batch_stats)


def variables_dict(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  v = {"params": params}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


def as_variables(state_or_variables: TrainState | Mapping[str, PyTree]) -> dict[str, PyTree]:
  """The variables dict of a :class:`TrainState` or of a variables mapping."""
  if isinstance(state_or_variables, TrainState):
    return state_or_variables.variables
  return dict(state_or_variables)


def create_state(
  params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation, key: Array
) -> TrainState:
  """A fresh stage state: new optimizer state, step 0."""
  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(params)
  return TrainState(
    params=params,
    batch_stats=batch_stats or {},
    opt_state=opt_state,
    step=jnp.zeros((), jnp.int32),
    key=jnp.asarray(key, jnp.uint32),
  )


def _leaf_name(path: tuple[Any, ...]) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: PyTree) -> PyTree:
  """True for the leaves that get weight decay: the ``kernel`` weights only."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) == "kernel", params)


def clip_mask(params: PyTree) -> PyTree:
  """True for the clip tables (``w_clip``, ``a_clip``)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: _leaf_name(p) in ("w_clip", "a_clip"), params
  )


def make_schedule(
  lr: float, num_steps: int, warmup_steps: int = 0, end_lr_frac: float = 0.0
) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
  ``lr * end_lr_frac`` at ``num_steps``."""
  num_steps = max(int(num_steps), 1)
  warmup_steps = int(min(max(warmup_steps, 0), num_steps - 1))
  if warmup_steps == 0:
    sched = optax.cosine_decay_schedule(lr, num_steps, alpha=end_lr_frac)
  else:
    sched = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps, num_steps, end_value=lr * end_lr_frac
    )
  # optax mixes the int32 step count with Python floats, which strict dtype promotion
  # (tests/conftest.py) refuses: hand it a float32 count (exact below 2^24 steps).
  return lambda count: sched(jnp.asarray(count, jnp.float32))


def make_optimizer(
  optimizer: str,
  lr: float,
  num_steps: int,
  *,
  warmup_steps: int = 0,
  weight_decay: float = 0.0,
  momentum: float = 0.9,
  nesterov: bool = True,
  end_lr_frac: float = 0.0,
  clip_lr_mult: float = 1.0,
  grad_clip_norm: float = 0.0,
) -> optax.GradientTransformation:
  """Builds the optax optimizer of a stage.

  Args:
    optimizer: ``"sgd"`` (momentum, coupled L2 weight decay) or ``"adamw"`` (decoupled).
    lr: peak learning rate.
    num_steps: length of the cosine schedule.
    warmup_steps: linear warmup steps.
    weight_decay: on kernels only (see :func:`decay_mask`).
    momentum: SGD momentum.
    nesterov: Nesterov momentum for SGD.
    end_lr_frac: final learning rate as a fraction of ``lr``.
    clip_lr_mult: learning-rate multiplier of the clip tables.
    grad_clip_norm: global gradient-norm clipping, 0 to disable.

  Returns:
    The ``optax.GradientTransformation``.

  Raises:
    ConfigError: unknown optimizer.
  """
  sched = make_schedule(lr, num_steps, warmup_steps, end_lr_frac)
  parts = []
  if grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if optimizer == "sgd":
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(optax.sgd(sched, momentum=momentum or None, nesterov=nesterov and momentum > 0))
  elif optimizer == "adamw":
    parts.append(optax.adamw(sched, weight_decay=weight_decay, mask=decay_mask))
  else:
    raise ConfigError(f"optimizer = {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
  if clip_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(clip_lr_mult), clip_mask))
  return standard_promotion(optax.chain(*parts) if len(parts) > 1 else parts[0])


# ----------------------------------------------------------------------------------------------
# Losses and policies


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
  """Per-example softmax cross-entropy ``[B]`` with integer labels ``[B]``."""
  n = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, n)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / n
  return optax.softmax_cross_entropy(logits, onehot)


def distill_loss(student: Array, teacher: Array, temperature: float = 1.0) -> Array:
  """Per-example cross-entropy to the teacher's softened distribution, times ``T^2``.

  Equal to KL(teacher || student) up to the teacher's entropy (same gradient).
  """
  t = jax.nn.softmax(jax.lax.stop_gradient(teacher) / temperature, axis=-1)
  return optax.softmax_cross_entropy(student / temperature, t) * temperature**2


def uniform(num_layers: int, w_bits: int, a_bits: int | None = None) -> Array:
  """int32 ``[L, 2]`` policy with every layer at (w_bits, a_bits)."""
  a_bits = w_bits if a_bits is None else a_bits
  return jnp.tile(jnp.asarray([[w_bits, a_bits]], jnp.int32), (num_layers, 1))


def bits_mask(
  num_layers: int,
  *,
  min_bits: int = 2,
  max_bits: int = 8,
  constraint: str = "none",
  cell_bits: int | None = None,
  table_bits: int = 8,
) -> np.ndarray:
  """Allowed (w, a) pairs ``bool [L, table_bits, table_bits]`` (see cimjax.policy.action_mask)."""
  from cimjax import policy as policy_lib  # pylint: disable=g-import-not-at-top

  mask = policy_lib.action_mask(
    num_layers,
    constraint,
    cell_bits=cell_bits or None,
    min_bits=min_bits,
    max_bits=max_bits,
    io_bits=max_bits,
  )
  if mask.shape[1] < table_bits:
    pad = table_bits - mask.shape[1]
    mask = np.pad(mask, ((0, 0), (0, pad), (0, pad)))
  return mask


def extreme_policy(mask: Any, which: str = "max") -> Array:
  """Per layer the largest (``"max"``) or smallest (``"min"``) allowed w and a bits.

  Args:
    mask: bool ``[L, B, B]`` allowed pairs (each layer's set is a product of a weight set
      and an activation set).
    which: ``"max"`` or ``"min"``.

  Returns:
    int32 ``[L, 2]``.
  """
  m = np.asarray(mask, bool)
  w_ok, a_ok = m.any(axis=2), m.any(axis=1)
  bits = np.arange(1, m.shape[1] + 1)
  pick = np.max if which == "max" else np.min
  w = [pick(bits[r]) for r in w_ok]
  a = [pick(bits[r]) for r in a_ok]
  return jnp.asarray(np.stack([w, a], axis=1), jnp.int32)


def sample_policies(key: Array, weights: Any, n: int) -> Array:
  """Samples ``n`` policies, each layer independently.

  Args:
    key: PRNG key.
    weights: ``[L, B, B]`` non-negative weights of the (w, a) pairs of each layer: a bool mask
      gives the uniform distribution over the allowed pairs, probabilities a given
      distribution. Every layer needs a positive entry.
    n: number of policies (static).

  Returns:
    int32 ``[n, L, 2]``.
  """
  w = jnp.asarray(weights, jnp.float32)
  num_layers, b1, b2 = w.shape
  logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
  idx = jax.random.categorical(
    key, logits.reshape(num_layers, b1 * b2), axis=-1, shape=(n, num_layers)
  )
  return jnp.stack([idx // b2 + 1, idx % b2 + 1], axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Jitted steps


@dataclasses.dataclass(frozen=True)
class AnyPrecConfig:
  """Any-precision recipe (static: changing it recompiles).

  Attributes:
    sandwich: also train the max-bits policy each step (on the labels).
    distill: train the other policies on the max-bits output (in-place distillation) instead
      of the labels; needs ``sandwich``.
    distill_weight: mix of distillation (1.0) and label loss (0.0) for the other policies.
    temperature: distillation temperature.
  """

  sandwich: bool = True
  distill: bool = False
  distill_weight: float = 1.0
  temperature: float = 1.0


class Trainer:
  """Jitted training and evaluation steps of one model and optimizer.

  Args:
    model: the zoo model (its ``input_shape`` must match the data).
    tx: the optax optimizer.
    label_smoothing: for the label cross-entropy.
    max_policy: int ``[L, 2]`` max-bits (teacher) policy of ``anyprec_step``; default all 8/8.
    anyprec: the any-precision recipe.
    fast_compile: compile without XLA's expensive optimisations (about half the compile time,
      several times slower steps): for tests and runs of a few dozen steps.
  """

  def __init__(
    self,
    model: ModelDef,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    max_policy: Any = None,
    anyprec: AnyPrecConfig = AnyPrecConfig(),
    fast_compile: bool = False,
  ):
    self.model = model
    self.module = model.module
    self.tx = tx
    self.label_smoothing = float(label_smoothing)
    self.num_layers = len(trace_specs(model))
    self.max_policy = (
      uniform(self.num_layers, 8) if max_policy is None else jnp.asarray(max_policy, jnp.int32)
    )
    self.anyprec = anyprec
    self.trace_counts: dict[str, int] = {"train_step": 0, "anyprec_step": 0}
    self.train_step = _jit(self._train_step, fast_compile)
    self.anyprec_step = _jit(self._anyprec_step, fast_compile)

  def _apply(
    self, params: PyTree, batch_stats: PyTree, x: Array, policy: Array | None
  ) -> tuple[Array, PyTree]:
    logits, st = forward(self.module, variables_dict(params, batch_stats), x, policy, train=True)
    return logits, st.get("batch_stats", batch_stats)

  def _update(self, state: TrainState, grads: PyTree, batch_stats: PyTree) -> TrainState:
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(
      params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1
    )

  def _train_step(
    self, state: TrainState, batch: tuple[Array, Array], policy: Array | None = None
  ) -> tuple[TrainState, dict[str, Array]]:
    """One step on one policy (None: float).

    Args:
      state: the training state.
      batch: ``(images [B, H, W, C], labels int [B])``.
      policy: int ``[L, 2]`` (traced) or None.

    Returns:
      ``(new_state, {"loss", "accuracy"})``.
    """
    self.trace_counts["train_step"] += 1
    x, y = batch

    def loss_fn(params):
      logits, bs = self._apply(params, state.batch_stats, x, policy)
      loss = jnp.mean(cross_entropy(logits, y, self.label_smoothing))
      return loss, (logits, bs)

    (loss, (logits, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return self._update(state, grads, bs), {"loss": loss, "accuracy": acc}

  def _anyprec_step(
    self, state: TrainState, batch: tuple[Array, Array], policies: Array
  ) -> tuple[TrainState, dict[str, Array]]:
    """One any-precision step: the mean loss over the max-bits policy and ``policies``.

    Args:
      state: the training state.
      batch: ``(images [B, H, W, C], labels int [B])``.
      policies: int ``[K, L, 2]`` (traced; only K is static).

    Returns:
      ``(new_state, metrics)`` with ``loss`` (the mean), ``loss_max``/``accuracy`` (max-bits
      policy, when ``sandwich``), ``loss_policies``/``accuracy_policies`` (means over K).
    """
    self.trace_counts["anyprec_step"] += 1
    chex.assert_rank(policies, 3)
    x, y = batch
    cfg = self.anyprec
    k = policies.shape[0]

    def loss_fn(params):
      losses, metrics = [], {}
      teacher, bs_out = None, state.batch_stats
      if cfg.sandwich:
        teacher, bs_out = self._apply(params, state.batch_stats, x, self.max_policy)
        l_max = jnp.mean(cross_entropy(teacher, y, self.label_smoothing))
        losses.append(l_max)
        metrics["loss_max"] = l_max
        metrics["accuracy"] = jnp.mean(jnp.argmax(teacher, -1) == y)
      accs, pl, stats = [], [], []
      for i in range(k):
        logits, bs = self._apply(params, state.batch_stats, x, policies[i])
        stats.append(bs)
        ce = jnp.mean(cross_entropy(logits, y, self.label_smoothing))
        if cfg.distill and teacher is not None:
          kd = jnp.mean(distill_loss(logits, teacher, cfg.temperature))
          l = cfg.distill_weight * kd + (1.0 - cfg.distill_weight) * ce
        else:
          l = ce
        losses.append(l)
        pl.append(ce)
        accs.append(jnp.mean(jnp.argmax(logits, -1) == y))
      if k:
        metrics["loss_policies"] = jnp.mean(jnp.stack(pl))
        metrics["accuracy_policies"] = jnp.mean(jnp.stack(accs))
        if not cfg.sandwich:
          metrics["accuracy"] = metrics["accuracy_policies"]
          bs_out = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *stats)
      loss = jnp.mean(jnp.stack(losses))
      return loss, (metrics, bs_out)

    (loss, (metrics, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics["loss"] = loss
    return self._update(state, grads, bs), metrics


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn: Callable[..., Any], fast_compile: bool = False) -> Callable[..., Any]:
  return jax.jit(fn, compiler_options=_FAST_COMPILE if fast_compile else None)


@functools.lru_cache(maxsize=32)
def _eval_fn(module: nn.Module, fast_compile: bool) -> Callable[..., tuple[Array, Array]]:
  def fn(variables, x, y, mask, policy):
    logits, _ = forward(module, variables, x, policy)
    m = mask.astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32) * m)
    loss = jnp.sum(cross_entropy(logits, y) * m)
    return correct, loss

  return _jit(fn, fast_compile)


@functools.lru_cache(maxsize=32)
def _bn_fn(module: nn.Module, fast_compile: bool) -> Callable[..., PyTree]:
  def fn(params, batch_stats, x, policy):
    _, st = forward(module, {"params": params, "batch_stats": batch_stats}, x, policy, train=True)
    return st["batch_stats"]

  return _jit(fn, fast_compile)


@functools.lru_cache(maxsize=32)
def _calib_fn(module: nn.Module) -> Callable[..., PyTree]:
  def fn(variables, x):
    return forward(module, variables, x, None, calibrate=True)[1]["calib"]

  return _jit(fn, True)  # runs once per stage: compile fast


def _module(model: ModelDef | nn.Module) -> nn.Module:
  return getattr(model, "module", model)


def evaluate(
  state_or_variables: TrainState | Mapping[str, PyTree],
  model: ModelDef | nn.Module,
  split: data_lib.Dataset,
  policy: Any = None,
  *,
  batch_size: int = 1000,
  fast_compile: bool = False,
) -> dict[str, float]:
  """Accuracy and mean loss of one policy over a whole split (batched over data, jitted).

  Batch-norm models use the running statistics in ``state_or_variables`` as they are; call
  :func:`recalibrate_bn` first for a policy other than the one they were trained with.

  Args:
    state_or_variables: a :class:`TrainState` or ``{"params", ["batch_stats"]}``.
    model: the zoo model (or its module).
    split: the data.
    policy: int ``[L, 2]`` or None (float).
    batch_size: images a batch (the last batch is padded and masked).
    fast_compile: compile without expensive optimisations (small splits, tests).

  Returns:
    ``{"accuracy": fraction, "loss": mean cross-entropy, "count": images}``.
  """
  variables = as_variables(state_or_variables)
  fn = _eval_fn(_module(model), fast_compile)
  pol = None if policy is None else jnp.asarray(policy, jnp.int32)
  correct, loss, n = 0.0, 0.0, 0
  outs = []
  for x, y, mask in data_lib.eval_batches(split, batch_size):
    outs.append(fn(variables, x, y, mask, pol))
    n += int(mask.sum())
  for c, l in jax.device_get(outs):
    correct += float(c)
    loss += float(l)
  if n == 0:
    return {"accuracy": float("nan"), "loss": float("nan"), "count": 0}
  return {"accuracy": correct / n, "loss": loss / n, "count": n}


def recalibrate_bn(
  state_or_variables: TrainState | Mapping[str, PyTree],
  model: ModelDef | nn.Module,
  policy: Any,
  batches: Iterable[Any],
  *,
  fast_compile: bool = False,
) -> TrainState | dict[str, PyTree]:
  """Re-estimates batch-norm running statistics for ``policy`` (exact population averages).

  Runs the forward pass in training mode on each batch and averages the per-batch means and
  second moments (every batch counts equally, not the exponential moving average), so a few
  batches give the statistics the policy's integer layers actually produce.

  Args:
    state_or_variables: a :class:`TrainState` or a variables dict.
    model: the zoo model or module.
    policy: int ``[L, 2]`` or None (float).
    batches: iterable of image arrays ``[B, H, W, C]`` or ``(images, labels, ...)`` tuples.
    fast_compile: compile without expensive optimisations.

  Returns:
    The same kind of object with ``batch_stats`` replaced (unchanged if the model has none
    or ``batches`` is empty).
  """
  variables = as_variables(state_or_variables)
  bs = variables.get("batch_stats")
  if not bs:
    return state_or_variables
  fn = _bn_fn(_module(model), fast_compile)
  params = variables["params"]
  pol = None if policy is None else jnp.asarray(policy, jnp.int32)
  zeros = jax.tree.map(jnp.zeros_like, bs)
  ones = jax.tree.map(jnp.ones_like, bs)
  sum_mean = sum_sq = momentum = None
  n = 0
  for batch in batches:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    out0 = fn(params, zeros, x, pol)  # (1 - m) * batch statistic
    if momentum is None:
      momentum = jax.tree.map(lambda a, b: a - b, fn(params, ones, x, pol), out0)
    stat = jax.tree.map(lambda o, m: o / (1.0 - m), out0, momentum)
    # stat holds per-BN {"mean": mu_b, "var": var_b}; accumulate mu_b and E[x^2]_b.
    mean_b = _bn_leaves(stat, "mean")
    sq_b = jax.tree.map(lambda v, mu: v + mu * mu, _bn_leaves(stat, "var"), mean_b)
    sum_mean = mean_b if sum_mean is None else jax.tree.map(jnp.add, sum_mean, mean_b)
    sum_sq = sq_b if sum_sq is None else jax.tree.map(jnp.add, sum_sq, sq_b)
    n += 1
  if n == 0:
    return state_or_variables
  mean = jax.tree.map(lambda s: s / n, sum_mean)
  var = jax.tree.map(lambda s, mu: jnp.maximum(s / n - mu * mu, 0.0), sum_sq, mean)
  new_bs = _merge_bn(bs, mean, var)
  if isinstance(state_or_variables, TrainState):
    return state_or_variables.replace(batch_stats=new_bs)
  out = dict(variables)
  out["batch_stats"] = new_bs
  return out


def _bn_leaves(stats: PyTree, name: str) -> PyTree:
  """The ``mean`` or ``var`` leaves of a batch_stats tree, keyed by the BN module path."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
  return {k[:-1]: v for k, v in flat.items() if k[-1] == name}


def _merge_bn(bs: PyTree, mean: PyTree, var: PyTree) -> PyTree:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(bs))
  out = {}
  for k, v in flat.items():
    src = mean if k[-1] == "mean" else var
    out[k] = src[k[:-1]].astype(v.dtype)
  return flax.traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------------------------
# Calibration


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _first(v: Any) -> np.ndarray:
  return np.asarray(v[0] if isinstance(v, (tuple, list)) else v)


def calibrate_clips(
  variables: Mapping[str, PyTree],
  model: ModelDef,
  images: Any,
  *,
  bits: Iterable[int] | None = None,
) -> PyTree:
  """MSE-optimal clip tables for every quantized layer and bit-width row.

  Weights: per output channel (or per tensor, as the table's shape says) from the kernel,
  symmetric narrow range. Activations: per tensor from a sample of each layer's float input on
  ``images`` (``forward(..., calibrate=True)``), signed or unsigned as the layer's
  ``signed_input`` says. Row ``b-1`` gets the clip for bit-width ``b``; the degenerate 1-bit
  narrow weight row (a single code, 0) copies the 2-bit row.

  Args:
    variables: ``{"params", ["batch_stats"]}``.
    model: the zoo model (``input_shape`` matching ``images``).
    images: float32 ``[N, H, W, C]`` calibration batch.
    bits: the bit-widths whose rows to set (default: all rows ``1..B``).

  Returns:
    ``params`` with new ``w_clip``/``a_clip`` tables (all finite and positive).
  """
  specs = trace_specs(model)
  calib = flax.core.unfreeze(
    jax.device_get(_calib_fn(model.module)(dict(variables), jnp.asarray(images)))
  )
  params = jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"]))
  for spec in specs:
    path = spec.name.split("/")
    p = _get(params, path)
    c = _get(calib, path)
    num_rows = p["a_clip"].shape[0]
    rows = sorted(set(range(1, num_rows + 1) if bits is None else bits))
    w_src = p["kernel"] if "kernel" in p else _first(c["w"])
    w_tab = np.array(p["w_clip"], np.float32)
    a_tab = np.array(p["a_clip"], np.float32)
    x = _first(c["x"])
    per_channel = w_tab.ndim == 2 and w_tab.shape[1] > 1
    w2d = np.asarray(w_src).reshape(-1, w_src.shape[-1]) if per_channel else np.asarray(w_src)
    for b in rows:
      wb = max(b, 2)  # a 1-bit narrow range has the single code 0: reuse the 2-bit clip
      wc = quant.mse_optimal_clip(
        w2d, wb, signed=True, narrow=True, axis=1 if per_channel else None
      )
      w_tab[b - 1] = np.reshape(wc, w_tab.shape[1:]) if w_tab.ndim == 2 else wc
      a_tab[b - 1] = quant.mse_optimal_clip(x, b, signed=spec.signed_input, narrow=False)
    p["w_clip"] = jnp.asarray(np.maximum(w_tab, 1e-6))
    p["a_clip"] = jnp.asarray(np.maximum(a_tab, 1e-6))
  return jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------------
# Configs


def stage_config(
  epochs: float, lr: float, optimizer: str = "adamw", **kw: Any
) -> ml_collections.ConfigDict:
  """Optimizer and length of one stage (fields documented in :func:`default_config`)."""
  c = ml_collections.ConfigDict()
  c.epochs = float(epochs)
  c.steps = 0
  c.optimizer = optimizer
  c.lr = float(lr)
  c.warmup_epochs = 0.0
  c.end_lr_frac = 0.0
  c.weight_decay = 1e-4
  c.momentum = 0.9
  c.nesterov = True
  c.label_smoothing = 0.0
  c.clip_lr_mult = 1.0
  c.grad_clip_norm = 0.0
  c.update(kw)
  return c


def default_config() -> ml_collections.ConfigDict:
  """All config fields with defaults (small CNN on full Fashion-MNIST).

  Top level: ``model`` (zoo name), ``model_kwargs`` (e.g. ``channels``), ``data`` (see
  :func:`cimjax.data.load_dataset`; -1 means default/all, 0 for image_size/channels means
  native), ``seed``, ``batch_size``, ``eval_batch_size``, ``checkpoint_every`` (steps; 0: only
  at the end), ``max_to_keep``, ``log_every`` (steps), ``eval_every`` (steps; 0: every epoch;
  negative: never), ``progress`` (rich bar), ``fast_compile`` (skip XLA's expensive
  optimisations: faster compiles, slower steps; for runs of a few dozen steps),
  ``throttle_s`` (sleep after each step; tests),
  ``bn_recal_batches``, ``calib_images``, ``bits`` (min/max bits, constraint, cell_bits for
  the anyprec sampling mask), ``eval_bits`` (uniform bit-widths reported after anyprec).

  Per stage (``fp32``, ``int8``, ``anyprec``, ``finetune``): ``epochs`` (float) or ``steps``
  (>0 overrides), ``optimizer`` (sgd|adamw), ``lr``, ``warmup_epochs``, ``end_lr_frac``,
  ``weight_decay``, ``momentum``, ``nesterov``, ``label_smoothing``, ``clip_lr_mult``,
  ``grad_clip_norm``. ``anyprec`` adds ``num_policies`` (K sampled), ``include_min``,
  ``sandwich``, ``distill``, ``distill_weight``, ``temperature``, ``recalibrate_clips``;
  ``finetune`` adds ``source`` (auto|anyprec|int8).
  """
  c = ml_collections.ConfigDict()
  c.model = "small_cnn"
  c.model_kwargs = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(
    dict(
      name="fashion_mnist",
      data_dir="",
      train_size=-1,
      val_size=-1,
      test_size=-1,
      split_seed=0,
      image_size=0,
      channels=0,
    )
  )
  c.seed = 0
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.checkpoint_every = 500
  c.max_to_keep = 2
  c.log_every = 50
  c.eval_every = 0
  c.progress = True
  c.fast_compile = False
  c.throttle_s = 0.0
  c.bn_recal_batches = 10
  c.calib_images = 512
  c.bits = ml_collections.ConfigDict(dict(min_bits=2, max_bits=8, constraint="none", cell_bits=0))
  c.eval_bits = (8, 6, 4, 3, 2)
  c.fp32 = stage_config(6, 2e-3, "adamw", warmup_epochs=0.2)
  c.int8 = stage_config(1, 2e-4, "adamw")
  c.anyprec = stage_config(
    2,
    5e-4,
    "adamw",
    num_policies=1,
    include_min=True,
    sandwich=True,
    distill=False,
    distill_weight=1.0,
    temperature=1.0,
    recalibrate_clips=True,
  )
  c.finetune = stage_config(1, 2e-4, "adamw", source="auto")
  return c


def _err(field: str, value: Any, allowed: str) -> ConfigError:
  return ConfigError(f"config.{field} = {value!r}; allowed: {allowed}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the stages use.

  Raises:
    ConfigError: naming the first bad field and what is allowed.
  """
  if config.model not in MODEL_NAMES:
    raise _err("model", config.model, ", ".join(MODEL_NAMES))
  if config.data.name not in data_lib.DATASET_NAMES:
    raise _err("data.name", config.data.name, ", ".join(data_lib.DATASET_NAMES))
  for f in ("batch_size", "eval_batch_size"):
    if not isinstance(config[f], int) or config[f] < 1:
      raise _err(f, config[f], "an integer >= 1")
  for f in ("checkpoint_every", "log_every", "max_to_keep", "bn_recal_batches", "calib_images"):
    if not isinstance(config[f], int) or config[f] < 0:
      raise _err(f, config[f], "an integer >= 0")
  if config.max_to_keep < 1:
    raise _err("max_to_keep", config.max_to_keep, "an integer >= 1")
  b = config.bits
  if not (1 <= b.min_bits <= b.max_bits <= 8):
    raise _err("bits", (b.min_bits, b.max_bits), "1 <= min_bits <= max_bits <= 8")
  if b.constraint not in ("none", "io", "weight", "both"):
    raise _err("bits.constraint", b.constraint, "none, io, weight, both")
  if b.constraint in ("weight", "both") and not b.cell_bits:
    raise _err("bits.cell_bits", b.cell_bits, "an integer >= 1 with constraint weight|both")
  for e in config.eval_bits:
    if not isinstance(e, int) or not 1 <= e <= 8:
      raise _err("eval_bits", tuple(config.eval_bits), "bit-widths in 1..8")
  for s in STAGES:
    sc = config[s]
    if sc.optimizer not in OPTIMIZERS:
      raise _err(f"{s}.optimizer", sc.optimizer, ", ".join(OPTIMIZERS))
    if not sc.lr > 0:
      raise _err(f"{s}.lr", sc.lr, "a number > 0")
    if sc.epochs < 0 or sc.steps < 0:
      raise _err(f"{s}.epochs/steps", (sc.epochs, sc.steps), "numbers >= 0")
    if not 0 <= sc.label_smoothing < 1:
      raise _err(f"{s}.label_smoothing", sc.label_smoothing, "0 <= x < 1")
  a = config.anyprec
  if a.num_policies < 0 or (a.num_policies == 0 and not a.include_min and not a.sandwich):
    raise _err(
      "anyprec.num_policies", a.num_policies, "an integer >= 0 (with at least one policy a step)"
    )
  if a.distill and not a.sandwich:
    raise _err("anyprec.distill", a.distill, "False unless anyprec.sandwich is True")
  if config.finetune.source not in ("auto", "anyprec", "int8"):
    raise _err("finetune.source", config.finetune.source, "auto, anyprec, int8")


# ----------------------------------------------------------------------------------------------
# Stage runner


def load_splits(config: ml_collections.ConfigDict) -> data_lib.Splits:
  """The config's dataset (see :func:`cimjax.data.load_dataset`)."""
  d = config.data
  opt = lambda v: None if v < 0 else v  # noqa: E731
  return data_lib.load_dataset(
    d.name,
    data_dir=d.data_dir or None,
    train_size=opt(d.train_size),
    val_size=opt(d.val_size),
    test_size=opt(d.test_size),
    split_seed=d.split_seed,
    image_size=d.image_size or None,
    channels=d.channels or None,
  )


def build_model(config: ml_collections.ConfigDict, splits: data_lib.Splits) -> ModelDef:
  """The zoo model of the config, with its input shape taken from the data."""
  kw = {
    k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model_kwargs.to_dict().items()
  }
  model = get_model(config.model, num_classes=splits.num_classes, **kw)
  if tuple(model.input_shape) != tuple(splits.input_shape):
    logging.info(
      "model %s expects %s; using the data's shape %s",
      config.model,
      model.input_shape,
      splits.input_shape,
    )
    model = dataclasses.replace(model, input_shape=tuple(splits.input_shape))
  return model


def init_variables(model: ModelDef, key: Array) -> dict[str, PyTree]:
  """Random initial variables for ``model.input_shape``."""
  _, compiled = _init_fn(model.module, tuple(model.input_shape))
  return flax.core.unfreeze(compiled(jnp.asarray(key, jnp.uint32)))


def abstract_variables(model: ModelDef) -> dict[str, PyTree]:
  """Shapes and dtypes of the model's variables (nothing is computed)."""
  jitted, _ = _init_fn(model.module, tuple(model.input_shape))
  return flax.core.unfreeze(jax.eval_shape(jitted, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=32)
def _init_fn(
  module: nn.Module, input_shape: tuple[int, ...]
) -> tuple[Callable[[Array], PyTree], Callable[[Array], PyTree]]:
  from cimjax.layers import QuantContext  # pylint: disable=g-import-not-at-top

  x = jnp.zeros((1, *input_shape), jnp.float32)
  # One compiled program instead of one small compilation per initializer, without the
  # expensive XLA passes: it runs once (0.6 s instead of 3-5 s on the 2-core CPU).
  fn = jax.jit(lambda key: module.init(key, x, QuantContext()))
  return fn, fn.lower(jax.random.PRNGKey(0)).compile(compiler_options=_FAST_COMPILE)


def stage_dir(workdir: str | os.PathLike[str], stage: str, policy_name: str | None = None) -> Path:
  """``workdir/<stage>`` (``workdir/finetune/<policy_name>`` for fine-tuning)."""
  d = Path(workdir) / stage
  return d / policy_name if stage == "finetune" and policy_name else d


def is_done(sdir: str | os.PathLike[str]) -> bool:
  """Whether the stage in ``sdir`` finished (its ``result.json`` exists)."""
  return (Path(sdir) / "result.json").is_file()


def save_variables(path: str | os.PathLike[str], variables: Mapping[str, PyTree]) -> None:
  """Exports final model variables (params, batch_stats) with orbax (overwrites)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with ocp.StandardCheckpointer() as c:
    c.save(Path(path).absolute(), dict(variables), force=True)
    c.wait_until_finished()


def load_variables(
  path: str | os.PathLike[str], model: ModelDef | None = None
) -> dict[str, PyTree]:
  """Loads variables written by :func:`save_variables` (a stage's ``variables/``).

  Args:
    path: the ``variables`` directory, or a stage directory holding one.
    model: optional; gives the restore target (shapes, dtypes) so nothing is guessed.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  p = Path(path).absolute()
  if (p / "variables").is_dir():
    p = p / "variables"
  if not p.is_dir():
    raise StageError(f"no saved variables at {p}")
  with ocp.StandardCheckpointer() as c:
    if model is None:
      target = None
      meta = c.metadata(p)
      tree = getattr(meta, "item_metadata", meta)
      target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
        tree.tree if hasattr(tree, "tree") else tree,
      )
    else:
      target = abstract_variables(model)
    return dict(c.restore(p, ckpt_lib.abstract_like(target)))


class MetricsWriter:
  """Appends JSON lines to ``metrics.jsonl``; on resume drops records past the restart step."""

  def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.is_file():
      keep = []
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= resume_step:
            keep.append(line)
        except json.JSONDecodeError:
          pass  # a line cut by a kill
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(k + "\n" for k in keep))
      os.replace(tmp, self.path)
    elif resume_step is None and self.path.is_file():
      self.path.unlink()
    self._f = open(self.path, "a")

  def write(self, record: Mapping[str, Any]) -> None:
    self._f.write(json.dumps(dict(record), default=_to_py) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _to_py(o: Any) -> Any:
  if hasattr(o, "tolist"):
    return o.tolist()
  return str(o)


class _Progress:
  """A rich progress bar (disabled when off or when stderr is not a terminal)."""

  def __init__(self, enabled: bool, description: str, total: int, completed: int):
    self.bar = None
    if enabled and sys.stderr.isatty():
      from rich import progress as rp  # pylint: disable=g-import-not-at-top
      from rich.console import Console  # pylint: disable=g-import-not-at-top

      self.bar = rp.Progress(
        rp.TextColumn("[bold]{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        rp.TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
      )
      self.bar.start()
      self.task = self.bar.add_task(description, total=total, completed=completed, info="")

  def update(self, completed: int, info: str = "") -> None:
    if self.bar is not None:
      self.bar.update(self.task, completed=completed, info=info)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.stop()


def _num_steps(sc: ml_collections.ConfigDict, spe: int) -> int:
  return int(sc.steps) if sc.steps > 0 else int(math.ceil(sc.epochs * spe))


def _policy_label(policy: Any) -> str:
  if policy is None:
    return "float"
  p = np.asarray(policy)
  if (p == p[0]).all():
    return f"w{p[0, 0]}a{p[0, 1]}"
  return "policy"


def _stage_key(seed: int, stage: str) -> Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), _STAGE_INDEX[stage])


def _recal_batches(splits: data_lib.Splits, config: ml_collections.ConfigDict) -> list[np.ndarray]:
  bs = min(config.batch_size, len(splits.train))
  it = data_lib.epoch_batches(splits.train, bs, config.seed + 7919, 0)
  return [x for x, _ in itertools.islice(it, config.bn_recal_batches)]


_TRAINERS: dict[Any, Trainer] = {}


@functools.lru_cache(maxsize=16)
def _policy_sampler(k: int, include_min: bool) -> Callable[..., Array]:
  """``(key, step, mask, min_policy) -> [K (+1), L, 2]``: the anyprec stage's policies of a
  step, a pure function of ``fold_in(key, step)``."""

  def fn(key, step, mask, min_policy):
    pols = sample_policies(jax.random.fold_in(key, step), mask, k)
    if include_min:
      pols = jnp.concatenate([pols, min_policy[None]], axis=0)
    return pols

  return _jit(fn, True)


def _stage_trainer(
  model: ModelDef,
  sc: ml_collections.ConfigDict,
  num_steps: int,
  spe: int,
  max_pol: Array,
  ap: ml_collections.ConfigDict,
  fast: bool,
) -> Trainer:
  """The stage's optimizer and jitted steps, reused by later runs of the same stage setup in
  this process (a resumed or repeated stage does not compile again)."""
  warmup = int(round(sc.warmup_epochs * spe))
  opt = tuple(
    sc[f]
    for f in (
      "optimizer",
      "lr",
      "end_lr_frac",
      "weight_decay",
      "momentum",
      "nesterov",
      "label_smoothing",
      "clip_lr_mult",
      "grad_clip_norm",
    )
  )
  recipe = tuple(ap[f] for f in ("sandwich", "distill", "distill_weight", "temperature"))
  key = (
    model.module,
    tuple(model.input_shape),
    opt,
    num_steps,
    warmup,
    tuple(np.asarray(max_pol).ravel().tolist()),
    recipe,
    fast,
  )
  if key not in _TRAINERS:
    tx = make_optimizer(
      sc.optimizer,
      sc.lr,
      num_steps,
      warmup_steps=warmup,
      weight_decay=sc.weight_decay,
      momentum=sc.momentum,
      nesterov=sc.nesterov,
      end_lr_frac=sc.end_lr_frac,
      clip_lr_mult=sc.clip_lr_mult,
      grad_clip_norm=sc.grad_clip_norm,
    )
    if len(_TRAINERS) >= 8:
      _TRAINERS.pop(next(iter(_TRAINERS)))
    _TRAINERS[key] = Trainer(
      model,
      tx,
      label_smoothing=sc.label_smoothing,
      max_policy=max_pol,
      anyprec=AnyPrecConfig(
        sandwich=ap.sandwich,
        distill=ap.distill,
        distill_weight=ap.distill_weight,
        temperature=ap.temperature,
      ),
      fast_compile=fast,
    )
  return _TRAINERS[key]


def evaluate_policy(
  variables: Mapping[str, PyTree],
  model: ModelDef,
  splits: data_lib.Splits,
  config: ml_collections.ConfigDict,
  policy: Any,
  split_names: Sequence[str] = ("val", "test"),
  recal: bool = True,
) -> dict[str, float]:
  """Accuracy of ``policy`` on named splits, batch norm re-estimated first (if any)."""
  v = dict(variables)
  if recal and v.get("batch_stats"):
    v = recalibrate_bn(
      v, model, policy, _recal_batches(splits, config), fast_compile=config.fast_compile
    )
  out = {}
  for s in split_names:
    if len(splits[s]):
      r = evaluate(
        v,
        model,
        splits[s],
        policy,
        batch_size=config.eval_batch_size,
        fast_compile=config.fast_compile,
      )
      out[s] = r["accuracy"]
      out[f"{s}_loss"] = r["loss"]
  return out


def run_stage(
  config: ml_collections.ConfigDict,
  stage: str,
  workdir: str | os.PathLike[str],
  *,
  policy: Any = None,
  policy_name: str | None = None,
  splits: data_lib.Splits | None = None,
) -> dict[str, Any]:
  """Runs (or resumes, or skips if finished) one training stage.

  Layout: ``workdir/<stage>/`` holds ``checkpoints/`` (orbax, every ``checkpoint_every``
  steps and at the end), ``variables/`` (final params and batch_stats), ``metrics.jsonl`` and
  ``result.json`` (written last: its presence marks the stage done). Fine-tuning uses
  ``workdir/finetune/<policy_name>/``.

  Args:
    config: see :func:`default_config`.
    stage: one of :data:`STAGES`.
    workdir: the experiment directory.
    policy: int ``[L, 2]`` policy to fine-tune (``finetune`` only).
    policy_name: name of the fine-tuning directory (default ``"policy"``).
    splits: preloaded data (else loaded from the config).

  Returns:
    The stage's result dict (also in ``result.json``).

  Raises:
    ConfigError: a bad config field.
    StageError: missing prerequisite stage, missing/bad policy, or a workdir written by
      another stage setup.
    cimjax.data.DataError: missing data files.
  """
  if stage not in STAGES:
    raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
  validate_config(config)
  workdir = Path(workdir)
  if stage == "finetune":
    if policy is None:
      raise StageError("stage finetune needs a policy (--policy=FILE.npy)")
    policy_name = policy_name or "policy"
  sdir = stage_dir(workdir, stage, policy_name)
  if is_done(sdir):
    logging.info("stage %s already finished in %s; not redone", stage, sdir)
    return ckpt_lib.read_json(sdir / "result.json")

  source = None
  if stage == "int8":
    source = "fp32"
  elif stage == "anyprec":
    source = "int8"
  elif stage == "finetune":
    source = config.finetune.source
    if source == "auto":
      source = "anyprec" if is_done(stage_dir(workdir, "anyprec")) else "int8"
  if source is not None and not is_done(stage_dir(workdir, source)):
    raise StageError(
      f"stage {stage} needs the finished {source} stage in "
      f"{stage_dir(workdir, source)}; run --stage={source} first"
    )

  t_start = time.time()
  if splits is None:
    splits = load_splits(config)
  model = build_model(config, splits)
  specs = trace_specs(model)
  num_layers = len(specs)
  sc = config[stage]
  bs = config.batch_size
  spe = data_lib.steps_per_epoch(len(splits.train), bs)
  num_steps = _num_steps(sc, spe)

  b = config.bits
  mask = bits_mask(
    num_layers,
    min_bits=b.min_bits,
    max_bits=b.max_bits,
    constraint=b.constraint,
    cell_bits=b.cell_bits or None,
  )
  max_pol = extreme_policy(mask, "max")
  min_pol = extreme_policy(mask, "min")
  if stage == "finetune":
    from cimjax import policy as policy_lib  # pylint: disable=g-import-not-at-top

    try:
      pol = policy_lib.validate_policy(
        policy, num_layers, min_bits=1, max_bits=8, layer_names=[s.name for s in specs]
      )
    except policy_lib.PolicyError as e:
      raise StageError(f"bad policy for {config.model}: {e}") from None
    train_policy = jnp.asarray(pol, jnp.int32)
  elif stage in ("int8", "anyprec"):
    train_policy = uniform(num_layers, 8) if stage == "int8" else max_pol
  else:
    train_policy = None

  ap = config.anyprec
  trainer = _stage_trainer(model, sc, num_steps, spe, max_pol, ap, config.fast_compile)
  tx = trainer.tx
  key = _stage_key(config.seed, stage)
  meta = {
    "stage": stage,
    "num_steps": num_steps,
    "config": config.to_dict(),
    "policy": None if stage != "finetune" else np.asarray(train_policy).tolist(),
    "source": source,
    "model": model.name,
    "input_shape": list(model.input_shape),
    "layers": [s.name for s in specs],
  }
  ckpt = ckpt_lib.Checkpointer(sdir / "checkpoints", max_to_keep=config.max_to_keep)
  extra: dict[str, Any] = {}
  latest = ckpt.latest_step()
  if latest is not None:
    av = abstract_variables(model)
    target = jax.eval_shape(
      lambda p, b: create_state(p, b, tx, key), av["params"], av.get("batch_stats", {})
    )
    state, saved = ckpt.restore(target, latest)
    _check_resume(saved, meta, sdir)
    extra = saved.get("extra", {})
    logging.info("stage %s: resuming from step %d in %s", stage, latest, sdir)
  else:
    if stage == "fp32":
      v = init_variables(model, key)
    else:
      v = load_variables(stage_dir(workdir, source), model)
    params, batch_stats = v["params"], v.get("batch_stats", {})
    # int8: every row from the FP32 weights. anyprec (and finetune straight from int8): the
    # rows INT8 QAT did not train, from the INT8 weights; an anyprec source's rows are trained.
    if (
      stage == "int8"
      or (stage == "anyprec" and ap.recalibrate_clips)
      or (stage == "finetune" and source == "int8")
    ):
      calib_x = _calib_images(splits, config)
      rows = None if stage == "int8" else [r for r in range(1, 9) if r != 8]
      params = calibrate_clips(variables_dict(params, batch_stats), model, calib_x, bits=rows)
      if stage == "int8":
        ptq = evaluate_policy(
          variables_dict(params, batch_stats), model, splits, config, train_policy, ("val",)
        )
        extra["ptq_val_w8a8"] = ptq.get("val")
        logging.info("int8 post-training (calibrated, no QAT) val accuracy: %s", ptq.get("val"))
    if stage == "finetune" and batch_stats:
      v2 = recalibrate_bn(
        variables_dict(params, batch_stats),
        model,
        train_policy,
        _recal_batches(splits, config),
        fast_compile=config.fast_compile,
      )
      batch_stats = v2["batch_stats"]
    state = create_state(params, batch_stats, tx, key)

  if stage == "anyprec":
    k_sampled, include_min = int(ap.num_policies), bool(ap.include_min)
    policies_at = _policy_sampler(k_sampled, include_min)
    mask_j = jnp.asarray(mask)

    def step_fn(state, batch):
      return trainer.anyprec_step(state, batch, policies_at(state.key, state.step, mask_j, min_pol))
  else:

    def step_fn(state, batch):
      return trainer.train_step(state, batch, train_policy)

  writer = MetricsWriter(
    sdir / "metrics.jsonl", resume_step=None if latest is None else int(state.step)
  )

  def eval_fn(state):
    v = state.variables
    if len(splits.val) == 0:
      return {}
    r = evaluate(
      v,
      model,
      splits.val,
      train_policy,
      batch_size=config.eval_batch_size,
      fast_compile=config.fast_compile,
    )
    return {
      f"val_accuracy_{_policy_label(train_policy)}": r["accuracy"],
      f"val_loss_{_policy_label(train_policy)}": r["loss"],
    }

  def save(state, done: bool):
    ckpt.save(
      int(state.step), state, {**meta, "step": int(state.step), "done": done, "extra": extra}
    )

  train_t0 = time.time()
  state, stats = fit(
    step_fn,
    state,
    splits.train,
    num_steps=num_steps,
    batch_size=bs,
    data_seed=[config.seed, _STAGE_INDEX[stage]],
    writer=writer,
    save_fn=save,
    checkpoint_every=config.checkpoint_every,
    log_every=config.log_every,
    eval_fn=eval_fn,
    eval_every=config.eval_every if config.eval_every != 0 else spe,
    progress=config.progress,
    description=stage,
    throttle_s=config.throttle_s,
  )
  train_time = time.time() - train_t0
  if ckpt.latest_step() != num_steps:
    save(state, True)
  save_variables(sdir / "variables", state.variables)

  # Final numbers.
  evals: dict[str, Any] = {}
  if stage == "fp32":
    evals["float"] = evaluate_policy(state.variables, model, splits, config, None)
  elif stage == "int8":
    evals["w8a8"] = evaluate_policy(state.variables, model, splits, config, train_policy)
  elif stage == "anyprec":
    for e in sorted(set(config.eval_bits), reverse=True):
      evals[f"w{e}a{e}"] = evaluate_policy(
        state.variables, model, splits, config, uniform(num_layers, e)
      )
  else:
    evals["policy"] = evaluate_policy(state.variables, model, splits, config, train_policy)
  result = {
    "stage": stage,
    "model": model.name,
    "dataset": splits.name,
    "source": source,
    "steps": num_steps,
    "epochs": num_steps / spe,
    "batch_size": bs,
    "train_images": len(splits.train),
    "val_images": len(splits.val),
    "test_images": len(splits.test),
    "train_time_s": round(train_time, 2),
    "stage_time_s": round(time.time() - t_start, 2),
    "images_per_s": stats.get("images_per_s"),
    "final_train_loss": stats.get("loss"),
    "eval": evals,
    **extra,
    "policy": meta["policy"],
  }
  writer.write({"step": num_steps, "final": True, "eval": evals})
  writer.close()
  ckpt.close()
  ckpt_lib.write_json_atomic(sdir / "result.json", result)
  logging.info("stage %s done: %s", stage, json.dumps(evals))
  return result


_RESUME_IGNORED = (
  "progress",
  "log_every",
  "throttle_s",
  "fast_compile",
  "checkpoint_every",
  "max_to_keep",
  "eval_every",
  "eval_batch_size",
)


def _check_resume(saved: Mapping[str, Any], meta: Mapping[str, Any], sdir: Path) -> None:
  """A resumed stage must use the config it started with (bar logging fields and the other
  stages' settings)."""
  old, new = dict(saved.get("config", {})), json.loads(json.dumps(meta["config"], default=_to_py))
  others = set(STAGES) - {meta["stage"]}
  diff = sorted(
    k
    for k in set(old) | set(new)
    if k not in _RESUME_IGNORED and k not in others and old.get(k) != new.get(k)
  )
  if diff or saved.get("policy") != meta["policy"] or saved.get("num_steps") != meta["num_steps"]:
    what = ", ".join(diff) or "policy/num_steps"
    raise StageError(
      f"{sdir} holds checkpoints of a run with a different config ({what}); "
      f"use another --workdir or the same config"
    )


def _calib_images(splits: data_lib.Splits, config: ml_collections.ConfigDict) -> np.ndarray:
  n = min(config.calib_images or 1, len(splits.train))
  perm = data_lib.epoch_permutation(config.seed + 104729, 0, len(splits.train))
  return splits.train.images[np.sort(perm[:n])]


def fit(
  step_fn: Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, dict]],
  state: TrainState,
  train: data_lib.Dataset,
  *,
  num_steps: int,
  batch_size: int,
  data_seed: Any,
  writer: MetricsWriter | None = None,
  save_fn: Callable[[TrainState, bool], None] | None = None,
  checkpoint_every: int = 0,
  log_every: int = 50,
  eval_fn: Callable[[TrainState], dict] | None = None,
  eval_every: int = 0,
  progress: bool = True,
  description: str = "train",
  throttle_s: float = 0.0,
) -> tuple[TrainState, dict[str, float]]:
  """The training loop: a Python loop of jitted steps from ``state.step`` to ``num_steps``.

  Batch ``s`` is a pure function of ``(data_seed, s)`` (see :func:`cimjax.data.train_batches`),
  so resuming from a checkpoint replays the same data.

  Args:
    step_fn: ``(state, (images, labels)) -> (state, metrics)``.
    state: the state to continue from.
    train: the training split.
    num_steps: the stage's total steps.
    batch_size: images a step.
    data_seed: int or sequence of ints seeding the epoch permutations.
    writer: JSON-lines metrics sink.
    save_fn: ``save_fn(state, done)`` checkpoints (called every ``checkpoint_every`` steps).
    checkpoint_every: steps between checkpoints (0: none here).
    log_every: steps between logged training metrics.
    eval_fn: ``eval_fn(state) -> metrics`` run every ``eval_every`` steps (<= 0: never).
    eval_every: steps between evaluations.
    progress: show a rich progress bar on a terminal.
    description: progress label.
    throttle_s: sleep after each step (tests use it to kill a run mid-way).

  Returns:
    ``(state, {"loss", "accuracy", "images_per_s"})`` of the last logging window.
  """
  start = int(state.step)
  seed = np.asarray(data_seed, np.uint32).reshape(-1)
  batches = data_lib.train_batches(train, batch_size, seed, start)
  bar = _Progress(progress, description, num_steps, start)
  window: list[dict[str, Array]] = []
  last: dict[str, float] = {}
  t_win, n_win = time.time(), 0
  rate_t, rate_n = 0.0, 0
  try:
    for step in range(start, num_steps):
      x, y = next(batches)
      state, metrics = step_fn(state, (x, y))
      window.append(metrics)
      n_win += 1
      done = step + 1
      if throttle_s:
        time.sleep(throttle_s)
      if done % max(log_every, 1) == 0 or done == num_steps:
        host = jax.device_get(window)
        rec = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        dt = time.time() - t_win
        ips = n_win * batch_size / max(dt, 1e-9)
        if done - n_win > start:  # not the first (compiling) window
          rate_t, rate_n = rate_t + dt, rate_n + n_win * batch_size
        rec["images_per_s"] = rate_n / rate_t if rate_t else ips
        rec.update(step=done, epoch=done * batch_size / len(train))
        last = rec
        if writer:
          writer.write({"kind": "train", **rec})
        bar.update(
          done,
          f"loss {rec['loss']:.4f} acc {rec.get('accuracy', 0):.3f} "
          f"{rec['images_per_s']:.0f} img/s",
        )
        logging.info(
          "%s step %d/%d loss %.4f acc %.4f %.0f img/s",
          description,
          done,
          num_steps,
          rec["loss"],
          rec.get("accuracy", float("nan")),
          rec["images_per_s"],
        )
        window, t_win, n_win = [], time.time(), 0
      if eval_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == num_steps):
        t0 = time.time()
        ev = eval_fn(state)
        if ev:
          if writer:
            writer.write({"kind": "eval", "step": done, **ev})
          logging.info("%s step %d eval %s", description, done, json.dumps(ev))
        t_win += time.time() - t0  # evaluation time does not count as training throughput
      if save_fn is not None and checkpoint_every > 0 and done % checkpoint_every == 0:
        t0 = time.time()
        save_fn(state, done == num_steps)
        t_win += time.time() - t0
  finally:
    bar.close()
  return state, last


__all__ = [
  "AnyPrecConfig",
  "ConfigError",
  "MetricsWriter",
  "STAGES",
  "StageError",
  "TrainState",
  "Trainer",
  "abstract_variables",
  "as_variables",
  "bits_mask",
  "build_model",
  "calibrate_clips",
  "clip_mask",
  "create_state",
  "cross_entropy",
  "decay_mask",
  "default_config",
  "distill_loss",
  "evaluate",
  "evaluate_policy",
  "extreme_policy",
  "fit",
  "init_variables",
  "is_done",
  "load_splits",
  "load_variables",
  "make_optimizer",
  "make_schedule",
  "recalibrate_bn",
  "run_stage",
  "sample_policies",
  "save_variables",
  "stage_config",
  "stage_dir",
  "standard_promotion",
  "uniform",
  "validate_config",
  "variables_dict",
]
