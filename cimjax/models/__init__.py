"""Model zoo and the functional forward pass shared by training, evaluation and compilation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimjax.layers import MvmFn, QuantContext
from cimjax.models.resnet import BasicBlock, ResNet, resnet18, resnet20
from cimjax.models.small_cnn import SmallCNN
from cimjax.models.vgg import VGG
from cimjax.models.vit import ViT

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """A zoo entry: the Flax module and the input it expects.

  Attributes:
    name: zoo name.
    module: the Flax linen module (``__call__(x, ctx)``).
    input_shape: one input without the batch axis, ``(H, W, C)``.
    num_classes: number of logits.
    description: one line for listings.
  """

  name: str
  module: nn.Module
  input_shape: tuple[int, int, int]
  num_classes: int
  description: str = ""


def _small_cnn(num_classes: int = 10, **kw: Any) -> ModelDef:
  return ModelDef(
    "small_cnn",
    SmallCNN(num_classes=num_classes, **kw),
    (28, 28, 1),
    num_classes,
    "3-conv CNN for 28x28 grayscale (Fashion-MNIST), 5 quantizable layers",
  )


def _resnet20(num_classes: int = 10, image_size: int = 32) -> ModelDef:
  return ModelDef(
    "resnet20",
    resnet20(num_classes),
    (image_size, image_size, 3),
    num_classes,
    "ResNet-20 (CIFAR style), 22 quantizable layers",
  )


def _resnet18(num_classes: int = 1000, image_size: int = 224) -> ModelDef:
  return ModelDef(
    "resnet18",
    resnet18(num_classes),
    (image_size, image_size, 3),
    num_classes,
    "ResNet-18 (ImageNet), 21 quantizable layers",
  )


def _vgg16(num_classes: int = 1000, image_size: int = 224, **kw: Any) -> ModelDef:
  return ModelDef(
    "vgg16",
    VGG(num_classes=num_classes, **kw),
    (image_size, image_size, 3),
    num_classes,
    "VGG-16 (ImageNet), 16 quantizable layers",
  )


def _vit_b32(num_classes: int = 1000, image_size: int = 224, **kw: Any) -> ModelDef:
  return ModelDef(
    "vit_b32",
    ViT(num_classes=num_classes, **kw),
    (image_size, image_size, 3),
    num_classes,
    "ViT-B/32 (ImageNet), 74 quantizable layers",
  )


MODELS: dict[str, Callable[..., ModelDef]] = {
  "small_cnn": _small_cnn,
  "resnet20": _resnet20,
  "resnet18": _resnet18,
  "vgg16": _vgg16,
  "vit_b32": _vit_b32,
}
MODEL_NAMES = tuple(MODELS)


def get_model(name: str, **overrides: Any) -> ModelDef:
  """Builds a zoo model by name.

  Args:
    name: one of :data:`MODEL_NAMES`.
    **overrides: model options, e.g. ``num_classes``, ``image_size`` (ResNets, VGG, ViT) or
      module attributes (``channels`` for the small CNN, ``depth`` for ViT).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
  return MODELS[name](**overrides)


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
  """Applies a zoo model with a bit policy.

  Args:
    module: the Flax module.
    variables: ``{"params": ..., ["batch_stats": ...]}``.
    x: ``[B, H, W, C]`` inputs.
    policy: ``[L, 2]`` int (weight_bits, activation_bits) per quantizable layer, or None for
      the float forward pass. May be traced (vmapped, jitted): bits are data.
    train: batch norm in training mode; the updated ``batch_stats`` are returned.
    mvm: integer-product hook (crossbar simulator), see :class:`cimjax.layers.QuantContext`.
    int_dtype: float32 or int32 integer operands in the native product.
    capture: also return each layer's integer operands (``"cim"`` collection).
    calibrate: also return samples of each layer's input (``"calib"`` collection).
    rngs: PRNG keys for stochastic layers, if any.

  Returns:
    ``(logits [B, classes], state)`` where ``state`` holds the mutated collections
    (``batch_stats`` when training, ``cim``, ``calib``), possibly empty.

  Raises:
    cimjax.layers.PolicyLengthError: the policy length differs from the model's layer count.
  """
  ctx = QuantContext(
    policy=policy, train=train, mvm=mvm, int_dtype=int_dtype, capture=capture, calibrate=calibrate
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
  """Initialises a zoo model's variables (float forward pass, batch of zeros)."""
  x = jnp.zeros((batch, *model.input_shape), jnp.float32)
  return dict(model.module.init(key, x, QuantContext()))


__all__ = [
  "BasicBlock",
  "MODELS",
  "MODEL_NAMES",
  "ModelDef",
  "ResNet",
  "SmallCNN",
  "VGG",
  "ViT",
  "forward",
  "get_model",
  "init",
  "resnet18",
  "resnet20",
]
