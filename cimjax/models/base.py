"""The model record (:class:`ModelDef`) and the functional forward pass of every model.

Shared by the zoo, the models built from references (:mod:`cimjax.models.registry`) and the
plain Flax models run through :func:`cimjax.models.quantize_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimjax.layers import MvmFn, QuantContext, resolve_int_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A model: the Flax module and the input it expects.

  Attributes:
    name: the reference that rebuilds it (:func:`cimjax.models.resolve_model`): a zoo or
      registered name, ``package.module:factory``, ``path/file.py:factory`` or ``file.onnx``.
    module: the Flax linen module (``__call__(x, ctx)``; a plain Flax module is wrapped by
      :func:`cimjax.models.quantize_model`).
    input_shape: one input without the batch axis, e.g. ``(H, W, C)``.
    num_classes: number of logits.
    description: one line for listings.
  """

  name: str
  module: nn.Module
  input_shape: tuple[int, ...]
  num_classes: int
  description: str = ""


def forward(
  module: nn.Module,
  variables: Any,
  x: Array,
  policy: Array | None = None,
  *,
  train: bool = False,
  mvm: MvmFn | None = None,
  int_dtype: Any = jnp.float32,
  capture: bool = False,
  calibrate: bool = False,
  rngs: Any = None,
) -> tuple[Array, dict[str, Any]]:
  """Applies a model with a bit policy.

  Args:
    module: the Flax module.
    variables: ``{"params": ..., ["batch_stats": ...]}``.
    x: ``[B, H, W, C]`` inputs.
    policy: ``[L, 2]`` int (weight_bits, activation_bits) per quantizable layer, or None for
      the float forward pass. May be traced (vmapped, jitted): bits are data.
    train: batch norm in training mode; the updated ``batch_stats`` are returned.
    mvm: integer-product hook (crossbar simulator), see :class:`cimjax.layers.QuantContext`.
    int_dtype: integer operands of the native product: a dtype (float32, int32, int8) or a
      mode of :data:`cimjax.layers.INT_MODES` (``"auto"``: int8 on GPU/TPU, float32 on CPU),
      resolved by :func:`cimjax.layers.resolve_int_dtype`. Callers that build a forward once
      (the evaluator, the training steps) resolve the mode there and pass the dtype.
    capture: also return each layer's integer operands (``"cim"`` collection).
    calibrate: also return samples of each layer's input (``"calib"`` collection).
    rngs: PRNG keys for stochastic layers, if any.

  Returns:
    ``(logits [B, classes], state)`` where ``state`` holds the mutated collections
    (``batch_stats`` when training, ``cim``, ``calib``), possibly empty.

  Raises:
    cimjax.layers.PolicyLengthError: the policy length differs from the model's layer count.
    cimjax.errors.ConfigError: an unknown ``int_dtype``.
  """
  ctx = QuantContext(
    policy=policy,
    train=train,
    mvm=mvm,
    int_dtype=resolve_int_dtype(int_dtype),
    capture=capture,
    calibrate=calibrate,
  )
  mutable = []
  if train and "batch_stats" in variables:
    mutable.append("batch_stats")
  if capture:
    mutable.append("cim")
  if calibrate:
    mutable.append("calib")
  if mutable:
    out, state = module.apply(variables, x, ctx, mutable=mutable, rngs=rngs)
  else:
    out, state = module.apply(variables, x, ctx, rngs=rngs), {}
  ctx.finish()
  return out, dict(state)


def init(model: ModelDef, key: Array, batch: int = 1) -> dict[str, Any]:
  """Initialises a model's variables (float forward pass, batch of zeros)."""
  x = jnp.zeros((batch, *model.input_shape), jnp.float32)
  return dict(model.module.init(key, x, QuantContext()))


__all__ = ["ModelDef", "forward", "init"]
