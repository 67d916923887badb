"""Layer geometry records shared by the tracer, the cost model, the search and the compiler."""

from __future__ import annotations

import dataclasses
from typing import Literal

LayerKind = Literal["Conv2D", "Dense", "MatMul"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Geometry of one quantizable layer, as the CIM cost model sees it (docs/architecture.md).

  A layer is one matrix of ``n`` rows (input dim) by ``m`` columns (output dim), programmed into
  crossbars and applied ``invocations`` times per inference, ``repeat`` times over (groups of a
  grouped conv, heads of an attention matmul).

  Attributes:
    name: module path of the layer inside the model, e.g. ``"block1/conv_a"``.
    kind: ``"Conv2D"``, ``"Dense"`` or ``"MatMul"`` (activation x activation, e.g. Q.K^T).
    m: output dimension (columns before bit slicing) of one matrix.
    n: input dimension (rows) of one matrix.
    invocations: MVMs per inference and per matrix (output pixels, tokens, or 1).
    repeat: number of independent matrices (conv groups, attention heads).
    in_channels: input channels (conv) or input features (dense/matmul contraction size).
    out_channels: output channels or features.
    kernel: (kh, kw); (1, 1) for dense and matmul layers.
    stride: conv stride (first spatial dim); 0 for dense and matmul layers.
    groups: conv feature groups; 1 otherwise.
    input_size: number of input vectors x their spatial extent, the CIM-AQ state feature
      ("input feature-map size": H*W for convs, in features for dense, tokens*dim for matmuls).
    signed_input: whether the layer's activation operand is signed (first layer, non-ReLU
      inputs) or unsigned (after ReLU or softmax).
  """

  name: str
  kind: LayerKind
  m: int
  n: int
  invocations: int
  repeat: int = 1
  in_channels: int = 0
  out_channels: int = 0
  kernel: tuple[int, int] = (1, 1)
  stride: int = 0
  groups: int = 1
  input_size: int = 0
  signed_input: bool = True

  @property
  def weight_count(self) -> int:
    """Number of weights (matrix elements) over all repeats."""
    return self.m * self.n * self.repeat

  @property
  def macs(self) -> int:
    """Multiply-accumulates per inference."""
    return self.m * self.n * self.invocations * self.repeat
