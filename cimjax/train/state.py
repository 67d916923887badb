"""Training state, optimizer and the losses of the training steps.

* :class:`TrainState`: an explicit pytree (params, batch statistics, optimizer state, step,
  PRNG key) that orbax saves and restores exactly.
* :class:`Optimizer` (built by :func:`make_optimizer`): optax SGD with momentum or AdamW,
  linear warmup then cosine decay, weight decay on kernels only (masked off the clip tables,
  biases and batch-norm parameters). It is hashable by its hyperparameters, so the jitted steps
  of :mod:`cimjax.train.steps` that take it as a static argument compile once per setup.
* :func:`cross_entropy` (from :mod:`cimjax.evaluate`) and :func:`distill_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cimjax.errors import ConfigError
from cimjax.evaluate import cross_entropy
from cimjax.optim import standard_promotion

Array = jax.Array
PyTree = Any
OPTIMIZERS = ("sgd", "adamw")


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
  """``{"params": params}``, plus ``"batch_stats"`` when there are any."""
  v = {"params": params}
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


def as_variables(state_or_variables: TrainState | Mapping[str, PyTree]) -> dict[str, PyTree]:
  """The variables dict of a :class:`TrainState` or of a variables mapping."""
  if isinstance(state_or_variables, TrainState):
    return state_or_variables.variables
  return dict(state_or_variables)


def create_state(params: PyTree, batch_stats: PyTree, tx: Any, key: Array) -> TrainState:
  """A fresh stage state: new optimizer state, step 0.

  Args:
    params: model parameters.
    batch_stats: batch-norm statistics (``{}`` or None without batch norm).
    tx: an optax transformation or an :class:`Optimizer`.
    key: uint32 ``[2]`` PRNG key of the stage.
  """
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


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A stage's optimizer: hashable hyperparameters that act as an optax transformation.

  ``init`` and ``update`` are those of the optax chain the hyperparameters describe (built once
  per object). Equal hyperparameters compare and hash equal, so a jitted step taking the
  optimizer as a static argument compiles once per stage setup, however often the stage runs.

  Attributes:
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
  """

  optimizer: str
  lr: float
  num_steps: int
  warmup_steps: int = 0
  weight_decay: float = 0.0
  momentum: float = 0.9
  nesterov: bool = True
  end_lr_frac: float = 0.0
  clip_lr_mult: float = 1.0
  grad_clip_norm: float = 0.0

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ConfigError(f"optimizer = {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")

  @functools.cached_property
  def transformation(self) -> optax.GradientTransformation:
    """The optax chain (clipping, weight decay, SGD/AdamW, clip-table scaling)."""
    sched = make_schedule(self.lr, self.num_steps, self.warmup_steps, self.end_lr_frac)
    parts = []
    if self.grad_clip_norm > 0:
      parts.append(optax.clip_by_global_norm(self.grad_clip_norm))
    if self.optimizer == "sgd":
      if self.weight_decay > 0:
        parts.append(optax.add_decayed_weights(self.weight_decay, mask=decay_mask))
      nesterov = self.nesterov and self.momentum > 0
      parts.append(optax.sgd(sched, momentum=self.momentum or None, nesterov=nesterov))
    else:
      parts.append(optax.adamw(sched, weight_decay=self.weight_decay, mask=decay_mask))
    if self.clip_lr_mult != 1.0:
      parts.append(optax.masked(optax.scale(self.clip_lr_mult), clip_mask))
    return standard_promotion(optax.chain(*parts) if len(parts) > 1 else parts[0])

  def init(self, params: PyTree) -> PyTree:
    """The optax state for ``params``."""
    return self.transformation.init(params)

  def update(
    self, updates: PyTree, state: PyTree, params: PyTree | None = None
  ) -> tuple[PyTree, PyTree]:
    """``(updates, new_state)`` as optax's ``update``."""
    return self.transformation.update(updates, state, params)


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
) -> Optimizer:
  """Builds the optimizer of a stage (arguments: see :class:`Optimizer`).

  Returns:
    An :class:`Optimizer`, usable wherever an ``optax.GradientTransformation`` is.

  Raises:
    ConfigError: unknown optimizer.
  """
  return Optimizer(
    optimizer,
    float(lr),
    int(num_steps),
    warmup_steps=int(warmup_steps),
    weight_decay=float(weight_decay),
    momentum=float(momentum),
    nesterov=bool(nesterov),
    end_lr_frac=float(end_lr_frac),
    clip_lr_mult=float(clip_lr_mult),
    grad_clip_norm=float(grad_clip_norm),
  )


def distill_loss(student: Array, teacher: Array, temperature: float = 1.0) -> Array:
  """Per-example cross-entropy ``[B]`` to the teacher's softened distribution, times ``T^2``.

  Equal to KL(teacher || student) up to the teacher's entropy (same gradient).

  Args:
    student: ``[B, C]`` logits being trained.
    teacher: ``[B, C]`` logits (no gradient flows into them).
    temperature: softening temperature ``T``.
  """
  t = jax.nn.softmax(jax.lax.stop_gradient(teacher) / temperature, axis=-1)
  return optax.softmax_cross_entropy(student / temperature, t) * temperature**2


__all__ = [
  "OPTIMIZERS",
  "Optimizer",
  "TrainState",
  "as_variables",
  "clip_mask",
  "create_state",
  "cross_entropy",
  "decay_mask",
  "distill_loss",
  "make_optimizer",
  "make_schedule",
  "variables_dict",
]
