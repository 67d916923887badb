"""ResNets: ResNet-20 (CIFAR-style, 32x32) and ResNet-18 (ImageNet-style, 224x224).

Blocks apply their projection shortcut before the main path, so the layer (policy) order is
shortcut 1x1, conv_a, conv_b, as in the reference work's policies.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimjax.layers import QuantContext, QuantConv, QuantDense


def _bn(ctx: QuantContext, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not ctx.train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs with batch norm; 1x1 projection shortcut when the shape changes.

  The block input comes after a ReLU, so every conv here sees unsigned activations.
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args: x ``[B, H, W, C]``. Returns ``[B, H/s, W/s, features]``."""
    s = (self.strides, self.strides)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = QuantConv(
        self.features, (1, 1), s, padding="VALID", use_bias=False, name="shortcut"
      )(x, ctx)
      shortcut = _bn(ctx, "shortcut_bn")(shortcut)
    y = QuantConv(
      self.features, (3, 3), s, padding=((1, 1), (1, 1)), use_bias=False, name="conv_a"
    )(x, ctx)
    y = nn.relu(_bn(ctx, "bn_a")(y))
    y = QuantConv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv_b")(
      y, ctx
    )
    y = _bn(ctx, "bn_b")(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet with basic blocks.

  Attributes:
    stage_sizes: blocks per stage.
    widths: output channels per stage.
    stem: "cifar" (3x3 conv, no pooling) or "imagenet" (7x7/2 conv and 3x3/2 max pool).
    stem_width: stem output channels.
    num_classes: logits.
  """

  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  stem: str = "cifar"
  stem_width: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args: x ``[B, H, W, 3]`` normalised images. Returns logits ``[B, num_classes]``."""
    if self.stem == "imagenet":
      x = QuantConv(
        self.stem_width,
        (7, 7),
        (2, 2),
        padding=((3, 3), (3, 3)),
        use_bias=False,
        signed_input=True,
        name="conv1",
      )(x, ctx)
      x = nn.relu(_bn(ctx, "bn1")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      x = QuantConv(
        self.stem_width,
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        signed_input=True,
        name="conv1",
      )(x, ctx)
      x = nn.relu(_bn(ctx, "bn1")(x))
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(width, stride, name=f"stage{i + 1}_block{j + 1}")(x, ctx)
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, name="fc")(x, ctx)


def resnet20(num_classes: int = 10) -> ResNet:
  """ResNet-20 for 32x32 inputs (He et al. 2016, CIFAR variant, projection shortcuts)."""
  return ResNet((3, 3, 3), (16, 32, 64), "cifar", 16, num_classes)


def resnet18(num_classes: int = 1000) -> ResNet:
  """ResNet-18 for 224x224 inputs."""
  return ResNet((2, 2, 2, 2), (64, 128, 256, 512), "imagenet", 64, num_classes)
