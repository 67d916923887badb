"""Pure, jitted training steps: one policy (QAT or float) and the any-precision sandwich step.

A step is ``step(state, batch, policy_or_policies, *, config) -> (state, metrics)``: a pure
function of its arguments. :class:`StepConfig` is the static part (model, optimizer, loss
recipe; hashable, so equal setups share one compilation); policies are traced arguments, so
changing bits never recompiles. :func:`jit_step` is the one way the steps are jitted (tests wrap
the plain functions with ``chex.assert_max_traces`` before it). :class:`Trainer` binds a config
to the jitted steps (immutable; used by the search's joint mode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cimjax.layers import resolve_int_dtype
from cimjax.models import ModelDef, forward
from cimjax.policy import uniform_policy
from cimjax.trace import trace_specs
from cimjax.train.state import TrainState, cross_entropy, distill_loss, variables_dict
from cimjax.variables import FAST_COMPILE

Array = jax.Array
PyTree = Any
Metrics = dict[str, Array]


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


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of the training steps (hashable; equal configs share compilations).

  Attributes:
    module: the model's Flax module.
    tx: the optimizer: an :class:`cimjax.train.state.Optimizer` (hashed by value) or any optax
      transformation (hashed by identity).
    label_smoothing: of the label cross-entropy.
    max_policy: the max-bits (teacher) policy of :func:`anyprec_step`, ``[L, 2]`` as nested
      tuples.
    anyprec: the any-precision recipe.
    int_mode: integer-product mode of the QAT forward (:data:`cimjax.layers.INT_MODES`),
      resolved when a step is traced (``"auto"``: int8 on GPU/TPU, float32 on CPU). The int8
      product keeps the float path's gradients (:func:`cimjax.layers.int8_with_float_grad`).
  """

  module: nn.Module
  tx: Any
  label_smoothing: float = 0.0
  max_policy: tuple[tuple[int, int], ...] = ()
  anyprec: AnyPrecConfig = AnyPrecConfig()
  int_mode: str = "auto"

  @classmethod
  def create(
    cls,
    model: ModelDef,
    tx: Any,
    *,
    label_smoothing: float = 0.0,
    max_policy: Any = None,
    anyprec: AnyPrecConfig = AnyPrecConfig(),
    int_mode: str = "auto",
  ) -> StepConfig:
    """The config of ``model``; ``max_policy`` int ``[L, 2]`` defaults to 8/8 everywhere."""
    if max_policy is None:
      max_policy = uniform_policy(len(trace_specs(model)), 8, 8)
    rows = tuple((int(w), int(a)) for w, a in np.asarray(max_policy).tolist())
    resolve_int_dtype(int_mode)  # checks the mode now (ConfigError), resolved again at trace
    return cls(model.module, tx, float(label_smoothing), rows, anyprec, int_mode)


def _apply(
  module: nn.Module,
  params: PyTree,
  batch_stats: PyTree,
  x: Array,
  policy: Array | None,
  int_mode: str = "auto",
) -> tuple[Array, PyTree]:
  """Training-mode logits and the updated batch statistics."""
  variables = variables_dict(params, batch_stats)
  int_dtype = resolve_int_dtype(int_mode)  # once per trace (the config is static)
  logits, st = forward(module, variables, x, policy, train=True, int_dtype=int_dtype)
  return logits, st.get("batch_stats", batch_stats)


def _update(
  config: StepConfig, state: TrainState, grads: PyTree, batch_stats: PyTree
) -> TrainState:
  with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
    updates, opt_state = config.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(
    params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1
  )


def train_step(
  state: TrainState,
  batch: tuple[Array, Array],
  policy: Array | None = None,
  *,
  config: StepConfig,
) -> tuple[TrainState, Metrics]:
  """One step on one policy (None: float).

  Args:
    state: the training state.
    batch: ``(images [B, H, W, C], labels int [B])``.
    policy: int ``[L, 2]`` (traced) or None.
    config: the static setup.

  Returns:
    ``(new_state, {"loss", "accuracy"})``; accuracy is the batch's fraction correct.
  """
  x, y = batch

  def loss_fn(params):
    logits, bs = _apply(config.module, params, state.batch_stats, x, policy, config.int_mode)
    loss = jnp.mean(cross_entropy(logits, y, config.label_smoothing))
    return loss, (logits, bs)

  (loss, (logits, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return _update(config, state, grads, bs), {"loss": loss, "accuracy": acc}


def _anyprec_losses(
  config: StepConfig, params: PyTree, state: TrainState, x: Array, y: Array, policies: Array
) -> tuple[Array, tuple[Metrics, PyTree]]:
  """The sandwich loss of :func:`anyprec_step`, its metrics and the new batch statistics."""
  cfg, smooth = config.anyprec, config.label_smoothing
  losses, metrics = [], {}
  teacher, bs_out = None, state.batch_stats
  if cfg.sandwich:
    max_policy = jnp.asarray(config.max_policy, jnp.int32)
    teacher, bs_out = _apply(
      config.module, params, state.batch_stats, x, max_policy, config.int_mode
    )
    l_max = jnp.mean(cross_entropy(teacher, y, smooth))
    losses.append(l_max)
    metrics["loss_max"] = l_max
    metrics["accuracy"] = jnp.mean(jnp.argmax(teacher, -1) == y)
  accs, pl, stats = [], [], []
  for i in range(policies.shape[0]):
    logits, bs = _apply(config.module, params, state.batch_stats, x, policies[i], config.int_mode)
    stats.append(bs)
    ce = jnp.mean(cross_entropy(logits, y, smooth))
    if cfg.distill and teacher is not None:
      kd = jnp.mean(distill_loss(logits, teacher, cfg.temperature))
      l = cfg.distill_weight * kd + (1.0 - cfg.distill_weight) * ce
    else:
      l = ce
    losses.append(l)
    pl.append(ce)
    accs.append(jnp.mean(jnp.argmax(logits, -1) == y))
  if policies.shape[0]:
    metrics["loss_policies"] = jnp.mean(jnp.stack(pl))
    metrics["accuracy_policies"] = jnp.mean(jnp.stack(accs))
    if not cfg.sandwich:
      metrics["accuracy"] = metrics["accuracy_policies"]
      bs_out = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *stats)
  return jnp.mean(jnp.stack(losses)), (metrics, bs_out)


def anyprec_step(
  state: TrainState, batch: tuple[Array, Array], policies: Array, *, config: StepConfig
) -> tuple[TrainState, Metrics]:
  """One any-precision step: the mean loss over the max-bits policy and ``policies``.

  Args:
    state: the training state.
    batch: ``(images [B, H, W, C], labels int [B])``.
    policies: int ``[K, L, 2]`` (traced; only K is static).
    config: the static setup (``max_policy``, the ``anyprec`` recipe).

  Returns:
    ``(new_state, metrics)`` with ``loss`` (the mean), ``loss_max``/``accuracy`` (max-bits
    policy, when ``sandwich``), ``loss_policies``/``accuracy_policies`` (means over K).
  """
  chex.assert_rank(policies, 3)
  x, y = batch

  def loss_fn(params):
    return _anyprec_losses(config, params, state, x, y, policies)

  (loss, (metrics, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics["loss"] = loss
  return _update(config, state, grads, bs), metrics


def jit_step(fn: Callable[..., Any], fast_compile: bool = False) -> Callable[..., Any]:
  """``jax.jit`` of a step with its ``config`` static.

  Args:
    fn: a step (:func:`train_step`, :func:`anyprec_step`, or one wrapped by
      ``chex.assert_max_traces``).
    fast_compile: compile without XLA's expensive optimisations (about half the compile time,
      several times slower steps): for tests and runs of a few dozen steps.
  """
  return jax.jit(
    fn, static_argnames="config", compiler_options=FAST_COMPILE if fast_compile else None
  )


# The jitted steps, one per compile mode: jax's cache (keyed by the static config) reuses a
# compilation for every later run of the same stage setup in this process.
JITTED = {
  fast: {"train": jit_step(train_step, fast), "anyprec": jit_step(anyprec_step, fast)}
  for fast in (False, True)
}


@dataclasses.dataclass(frozen=True, init=False)
class Trainer:
  """The jitted steps bound to one :class:`StepConfig` (immutable).

  Args:
    model: the zoo model (its ``input_shape`` must match the data).
    tx: the optimizer (:func:`cimjax.train.make_optimizer` or any optax transformation).
    label_smoothing: for the label cross-entropy.
    max_policy: int ``[L, 2]`` max-bits (teacher) policy of ``anyprec_step``; default all 8/8.
    anyprec: the any-precision recipe.
    fast_compile: compile without XLA's expensive optimisations.
    int_mode: integer-product mode of the QAT forward (see :class:`StepConfig`).
  """

  config: StepConfig
  fast_compile: bool

  def __init__(
    self,
    model: ModelDef,
    tx: Any,
    *,
    label_smoothing: float = 0.0,
    max_policy: Any = None,
    anyprec: AnyPrecConfig = AnyPrecConfig(),
    fast_compile: bool = False,
    int_mode: str = "auto",
  ):
    config = StepConfig.create(
      model,
      tx,
      label_smoothing=label_smoothing,
      max_policy=max_policy,
      anyprec=anyprec,
      int_mode=int_mode,
    )
    object.__setattr__(self, "config", config)
    object.__setattr__(self, "fast_compile", bool(fast_compile))

  @property
  def module(self) -> nn.Module:
    """The model's Flax module."""
    return self.config.module

  @property
  def tx(self) -> Any:
    """The optimizer."""
    return self.config.tx

  def train_step(
    self, state: TrainState, batch: tuple[Array, Array], policy: Array | None = None
  ) -> tuple[TrainState, Metrics]:
    """Jitted :func:`train_step` with this config."""
    return JITTED[self.fast_compile]["train"](state, batch, policy, config=self.config)

  def anyprec_step(
    self, state: TrainState, batch: tuple[Array, Array], policies: Array
  ) -> tuple[TrainState, Metrics]:
    """Jitted :func:`anyprec_step` with this config."""
    return JITTED[self.fast_compile]["anyprec"](state, batch, policies, config=self.config)


__all__ = [
  "JITTED",
  "AnyPrecConfig",
  "StepConfig",
  "Trainer",
  "anyprec_step",
  "jit_step",
  "train_step",
]
