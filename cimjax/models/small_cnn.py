"""A small CNN for small images (28x28 grey Fashion-MNIST by default): five quantizable layers.

Nothing in the module fixes the input shape: the dense layer takes its input width from the
image, so any ``H x W x C`` with ``H, W >= 8`` works (three 2x2 max pools); the run takes the
shape from the data (:func:`cimjax.train.build_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from cimjax.layers import QuantContext, QuantConv, QuantDense
from cimjax.models.pooling import max_pool_2x2


class SmallCNN(nn.Module):
  """conv3x3-relu-pool x3, dense-relu, dense. No batch norm (integer-friendly, see BUILD_NOTES).

  Layer order (policy rows): conv1 (signed image input), conv2, conv3, fc1, fc2.

  Attributes:
    channels: output channels of the three convs.
    hidden: width of the hidden dense layer.
    num_classes: logits.
  """

  channels: Sequence[int] = (16, 32, 32)
  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args: x ``[B, H, W, C]`` normalised images. Returns logits ``[B, num_classes]``."""
    for i, c in enumerate(self.channels):
      x = QuantConv(c, (3, 3), signed_input=(i == 0), name=f"conv{i + 1}")(x, ctx)
      x = nn.relu(x)
      x = max_pool_2x2(x)  # nn.max_pool's values and gradients, bit for bit
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QuantDense(self.hidden, name="fc1")(x, ctx))
    return QuantDense(self.num_classes, name="fc2")(x, ctx)
