"""VGG-16 (configuration D) for 224x224 inputs: 13 convs and 3 dense layers."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from cimjax.layers import QuantContext, QuantConv, QuantDense
from cimjax.models.pooling import max_pool_2x2

VGG16_CFG: tuple[int | str, ...] = (
  64,
  64,
  "M",
  128,
  128,
  "M",
  256,
  256,
  256,
  "M",
  512,
  512,
  512,
  "M",
  512,
  512,
  512,
  "M",
)


class VGG(nn.Module):
  """VGG without batch norm (as torchvision's ``vgg16``); dropout omitted (eval geometry).

  Attributes:
    cfg: conv widths and "M" for 2x2 max pooling.
    hidden: widths of the two hidden dense layers.
    num_classes: logits.
  """

  cfg: Sequence[int | str] = VGG16_CFG
  hidden: Sequence[int] = (4096, 4096)
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args: x ``[B, H, W, 3]``. Returns logits ``[B, num_classes]``."""
    i = 0
    for v in self.cfg:
      if v == "M":
        x = max_pool_2x2(x)  # nn.max_pool's values and gradients, bit for bit
        continue
      i += 1
      x = nn.relu(
        QuantConv(int(v), (3, 3), padding=((1, 1), (1, 1)), signed_input=(i == 1), name=f"conv{i}")(
          x, ctx
        )
      )
    x = x.reshape(x.shape[0], -1)
    for j, h in enumerate(self.hidden):
      x = nn.relu(QuantDense(h, name=f"fc{j + 1}")(x, ctx))
    return QuantDense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x, ctx)
