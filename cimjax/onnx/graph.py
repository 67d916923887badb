"""Reading an ONNX file into the plain graph that :class:`cimjax.onnx.OnnxModule` interprets.

The file is read with onnx-ir (functions inlined, nodes sorted topologically); then, once, at
import time:

* **constant folding**: every node whose inputs are all constants (initializers, ``Constant``
  nodes, shape arithmetic on them) is evaluated in NumPy and removed;
* **quantized layers**: ``Conv``, ``Gemm`` and ``MatMul`` with a constant weight become
  ``QuantConv`` / ``QuantDense``; ``MatMul`` of two activations (attention Q.K^T, A.V) becomes
  ``QuantMatMul``. A ``MatMul`` followed by an ``Add`` of a constant vector keeps the vector as
  the layer's bias. Q/[Clip]/DQ chains on a layer's operands (QCDQ files) are read into bit-widths
  and steps and taken out of the float graph (:mod:`cimjax.onnx.qdq`);
* **signedness**: a layer's activation operand is unsigned when the graph proves it is
  non-negative (after Relu, Softmax, a Clip at >= 0, pooling or reshaping of such a value, a
  uint8 QuantizeLinear) and signed otherwise (the graph input), as docs/architecture.md asks;
* **call order** (the policy order): the graph's topological order, with one rule of the
  reference work: where the graph forks, the branch with fewer quantized layers before the merge
  runs first (a residual block's projection shortcut before its main path). ``layer_order=
  "file"`` keeps the file's node order instead.

Everything is kept in NumPy and Python objects (no onnx-ir at run time).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cimjax.errors import OnnxError

QUANT_OPS = ("Conv", "Gemm", "MatMul")
# (op, input index) pairs whose constant operand is configuration, never a trainable parameter.
STATIC_INPUTS: dict[str, tuple[int, ...]] = {
  "QuantizeLinear": (1, 2),
  "DequantizeLinear": (1, 2),
  "Clip": (1, 2),
  "Pad": (1, 2, 3),
  "Reshape": (1,),
  "Expand": (1,),
  "Tile": (1,),
  "Slice": (1, 2, 3, 4),
  "Squeeze": (1,),
  "Unsqueeze": (1,),
  "Split": (1,),
  "ReduceMean": (1,),
  "ReduceSum": (1,),
  "ReduceMax": (1,),
  "ReduceMin": (1,),
  "ReduceProd": (1,),
  "Pow": (1,),
  "Gather": (1,),
  "ConstantOfShape": (0,),
  "Range": (0, 1, 2),
  "Dropout": (1, 2),
}
# Ops through which a non-negative value stays non-negative.
_PASS_NONNEG = {
  "MaxPool",
  "AveragePool",
  "GlobalAveragePool",
  "GlobalMaxPool",
  "Flatten",
  "Reshape",
  "Transpose",
  "Squeeze",
  "Unsqueeze",
  "Identity",
  "Dropout",
  "Gather",
  "Slice",
  "Expand",
  "Tile",
  "Cast",
  "Split",
  "ReduceMean",
  "ReduceMax",
  "ReduceMin",
  "ReduceSum",
  "Pad",
}
_NONNEG = {"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Sqrt", "HardSigmoid", "Softplus"}


@dataclasses.dataclass(frozen=True)
class Node:
  """One ONNX node in plain Python.

  Attributes:
    index: position in the file (after inlining and sorting).
    name: node name (made unique; ``op_index`` when the file has none).
    op: op type.
    domain: op domain ("" for the default one).
    inputs: value names ("" for an omitted optional input).
    outputs: value names.
    attrs: attribute values as Python objects (ints, floats, strings, tuples, NumPy arrays).
  """

  index: int
  name: str
  op: str
  domain: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  attrs: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class QdqInfo:
  """A QuantizeLinear -> [Clip] -> DequantizeLinear chain on one operand of a layer.

  Attributes:
    bits: bit-width from the integer range ``ceil(log2(hi - lo + 1))``.
    signed: whether the codes are signed around the zero point.
    lo, hi: the integer range (the Clip's, else the storage type's).
    scale: float32 step, scalar or per channel.
    zero_point: integer zero point (scalar or per channel).
    axis: per-channel axis of ``scale`` (None for per-tensor).
    source: the float value quantized (activations; None for a constant weight).
  """

  bits: int
  signed: bool
  lo: int
  hi: int
  scale: np.ndarray
  zero_point: np.ndarray
  axis: int | None
  source: str | None


@dataclasses.dataclass(frozen=True)
class Layer:
  """A quantized layer of the imported graph.

  Attributes:
    node: the ONNX node name.
    op: its op type (Conv, Gemm, MatMul).
    kind: LayerSpec kind ("Conv2D", "Dense", "MatMul").
    module: the Flax submodule name (and LayerSpec name).
    signed_input: activation operand signed or unsigned.
    x: value name of the activation operand (after QDQ removal).
    w: value name of the weight / second operand (after QDQ removal for activations).
    bias: value name of the bias (Gemm ``C`` or a fused Add), or None.
    fused_add: name of the Add node folded into this layer as its bias, or None.
    act_qdq, w_qdq: QCDQ information of the two operands, or None.
  """

  node: str
  op: str
  kind: str
  module: str
  signed_input: bool
  x: str
  w: str
  bias: str | None = None
  fused_add: str | None = None
  act_qdq: QdqInfo | None = None
  w_qdq: QdqInfo | None = None


class OnnxGraph:
  """The imported graph: live nodes in call order, constants, layers, parameter names.

  Compared and hashed by identity, so a Flax module can hold it as an attribute (modules are
  static arguments of jitted functions).

  Attributes:
    name: graph or file name.
    opset: default-domain opset version.
    input: the graph input's name; input_shape its shape (None for symbolic dims).
    output: the graph output's name.
    nodes: the live runtime nodes in call order.
    consts: folded constant values (NumPy) by value name.
    params: value name -> parameter name, for float constants that become trainable params.
    layers: node name -> :class:`Layer`.
    bn: BatchNormalization node name -> Flax submodule name.
    nonneg: value names proven non-negative.
    layer_inits, bn_inits: initial parameter values of the layer and batch-norm submodules.
    gemm_extra: Gemm node -> (C value, beta) when C is not a per-output bias.
    source: the file it was read from ("" for an in-memory model).
  """

  def __init__(self) -> None:
    self.name = "onnx"
    self.opset = 17
    self.input = ""
    self.input_shape: tuple[int | None, ...] = ()
    self.output = ""
    self.nodes: list[Node] = []
    self.consts: dict[str, np.ndarray] = {}
    self.params: dict[str, str] = {}
    self.layers: dict[str, Layer] = {}
    self.bn: dict[str, str] = {}
    self.nonneg: set[str] = set()
    self.layer_inits: dict[str, Any] = {}  # node name -> cimjax.onnx.module.Inits
    self.bn_inits: dict[str, Any] = {}
    self.gemm_extra: dict[str, tuple[str, float]] = {}  # Gemm C that is not a bias vector
    self.source = ""

  def __hash__(self) -> int:
    return id(self)

  def __eq__(self, other: object) -> bool:
    return self is other

  def __repr__(self) -> str:
    return f"OnnxGraph({self.name!r}, {len(self.nodes)} nodes, {len(self.layers)} layers)"

  @property
  def layer_list(self) -> list[Layer]:
    """The quantized layers in call (policy) order."""
    return [self.layers[n.name] for n in self.nodes if n.name in self.layers]


# ----------------------------------------------------------------------------------------------
# Reading


def _attr_value(attr: Any) -> Any:
  """An onnx-ir attribute as a plain Python / NumPy value."""
  v = attr.value
  if hasattr(v, "numpy"):
    return np.asarray(v.numpy())
  if isinstance(v, (list, tuple)):
    return tuple(np.asarray(t.numpy()) if hasattr(t, "numpy") else t for t in v)
  return v


def _load_ir(source: Any) -> Any:
  """An onnx-ir model from a path, bytes, an ``onnx.ModelProto`` or an ``ir.Model``."""
  try:
    import onnx_ir as ir
  except ImportError as e:  # pragma: no cover - the extra is missing
    raise OnnxError("ONNX import needs the optional packages: pip install 'cimjax[onnx]'") from e
  if isinstance(source, ir.Model):
    return source
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise OnnxError(f"ONNX file not found: {path}")
    try:
      return ir.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf and onnx-ir raise many types
      raise OnnxError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
  if isinstance(source, (bytes, bytearray)):
    import onnx

    source = onnx.load_model_from_string(bytes(source))
  if type(source).__name__ == "ModelProto":
    return ir.from_proto(source)
  raise OnnxError(f"cannot import {type(source).__name__}: expected a path or an ONNX model")


def read_graph(source: Any) -> tuple[OnnxGraph, list[Node], dict[str, np.ndarray], Any]:
  """Reads a model into plain nodes and constant initializers.

  Returns:
    ``(graph with name/opset/input/output set, nodes in file order, initializers, ir model)``.
  """
  from onnx_ir.passes import common as passes

  model = _load_ir(source)
  for p in (passes.InlinePass(), passes.TopologicalSortPass()):
    try:
      p(model)
    except Exception as e:  # noqa: BLE001
      raise OnnxError(f"cannot prepare the graph ({type(p).__name__}): {e}") from None
  g = model.graph
  out = OnnxGraph()
  out.name = g.name or "onnx"
  out.opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17)))
  inits = {}
  for name, v in g.initializers.items():
    if v.const_value is None:
      raise OnnxError(f"initializer {name!r} has no data (external data missing?)")
    inits[name] = np.asarray(v.const_value.numpy())
  inputs = [v for v in g.inputs if v.name not in inits]
  if len(inputs) != 1:
    names = ", ".join(repr(v.name) for v in inputs)
    raise OnnxError(f"the graph must have exactly one input (the images); it has {names}")
  if not g.outputs:
    raise OnnxError("the graph has no outputs")
  out.input = inputs[0].name
  shape = inputs[0].shape
  out.input_shape = tuple(
    (d if isinstance(d, int) else None) for d in (shape.dims if shape is not None else ())
  )
  out.output = g.outputs[0].name
  nodes = []
  used: set[str] = set()
  for i, n in enumerate(g):
    if n.domain not in ("", "ai.onnx", "qonnx.custom_op.general"):
      raise OnnxError(f"node {n.name!r} (op {n.domain}.{n.op_type}): unsupported op domain")
    name = n.name or f"{n.op_type}_{i}"
    while name in used:
      name = f"{name}_{i}"
    used.add(name)
    nodes.append(
      Node(
        index=i,
        name=name,
        op=n.op_type,
        domain=n.domain,
        inputs=tuple(v.name if v is not None else "" for v in n.inputs),
        outputs=tuple(v.name for v in n.outputs),
        attrs={k: _attr_value(a) for k, a in n.attributes.items()},
      )
    )
  return out, nodes, inits, model


# ----------------------------------------------------------------------------------------------
# Names


def sanitize(name: str) -> str:
  """A Flax-friendly name: ``[A-Za-z0-9_]``, not starting with a digit."""
  s = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
  if not s:
    s = "v"
  return f"v{s}" if s[0].isdigit() else s


class _Names:
  """Hands out unique sanitized names."""

  def __init__(self) -> None:
    self.used: set[str] = set()

  def take(self, base: str) -> str:
    base = sanitize(base)
    name, k = base, 1
    while name in self.used:
      name = f"{base}_{k}"
      k += 1
    self.used.add(name)
    return name


def layer_base_name(node: Node, weight: str | None) -> str:
  """A readable layer name: the weight's module path (``layer1.0.conv1.weight`` ->
  ``layer1_0_conv1``), else the node's scope (``/layers/layers.0/attn/MatMul_1`` ->
  ``layers_0_attn_MatMul_1``; a last part equal to the op type is dropped)."""
  if weight and re.search(r"\.(weight|kernel)$", weight) and "::" not in weight:
    return re.sub(r"\.(weight|kernel)$", "", weight)
  parts = [p for p in node.name.strip("/").split("/") if p]
  if len(parts) > 1 and parts[-1] == node.op:
    parts = parts[:-1]
  kept = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p))]
  return "_".join(kept) or f"{node.op}_{node.index}"


# ----------------------------------------------------------------------------------------------
# Analysis


def live_nodes(nodes: Sequence[Node], output: str) -> list[Node]:
  """The nodes the output depends on, in the given order."""
  need = {output}
  keep: set[str] = set()
  for n in reversed(nodes):
    if any(o in need for o in n.outputs):
      keep.add(n.name)
      need.update(i for i in n.inputs if i)
  return [n for n in nodes if n.name in keep]


def call_order(nodes: list[Node], layers: Mapping[str, Any], mode: str) -> list[Node]:
  """The runtime node order (see the module docstring).

  Args:
    nodes: live runtime nodes in file (topological) order.
    layers: the quantized layers by node name.
    mode: "shortcut_first" (default rule) or "file".
  """
  if mode == "file":
    return list(nodes)
  if mode != "shortcut_first":
    raise OnnxError(f"layer_order = {mode!r}; allowed: shortcut_first, file")
  producer = {o: n.name for n in nodes for o in n.outputs if o}
  deps = {n.name: {producer[i] for i in n.inputs if i in producer} for n in nodes}
  users: dict[str, list[str]] = {n.name: [] for n in nodes}
  for n in nodes:
    for d in deps[n.name]:
      users[d].append(n.name)
  depth: dict[str, int] = {}
  for n in reversed(nodes):
    below = max((depth[u] for u in users[n.name]), default=0)
    depth[n.name] = below + (1 if n.name in layers else 0)
  by_name = {n.name: n for n in nodes}
  waiting = {n.name: len(deps[n.name]) for n in nodes}
  ready = [(depth[n.name], n.index, n.name) for n in nodes if waiting[n.name] == 0]
  heapq.heapify(ready)
  out = []
  while ready:
    _, _, name = heapq.heappop(ready)
    out.append(by_name[name])
    for u in users[name]:
      waiting[u] -= 1
      if waiting[u] == 0:
        heapq.heappush(ready, (depth[u], by_name[u].index, u))
  if len(out) != len(nodes):  # pragma: no cover - the input is topologically sorted
    raise OnnxError("the graph has a cycle")
  return out


def nonneg_values(
  nodes: Sequence[Node], consts: Mapping[str, np.ndarray], qdq_unsigned: set[str]
) -> set[str]:
  """Value names proven non-negative (see the module docstring)."""
  out = {k for k, v in consts.items() if v.dtype.kind in "fiu" and v.size and np.all(v >= 0)}
  out |= qdq_unsigned
  for n in nodes:
    ins = [i for i in n.inputs if i]
    ok = False
    if n.op in _NONNEG:
      ok = True
    elif n.op in _PASS_NONNEG:
      ok = bool(ins) and ins[0] in out
    elif n.op == "Clip":
      lo = n.attrs.get("min")
      if len(n.inputs) > 1 and n.inputs[1]:
        lo = consts.get(n.inputs[1])
      ok = lo is not None and float(np.min(lo)) >= 0
    elif n.op == "Max":
      ok = any(i in out for i in ins)
    elif n.op in ("Add", "Mul", "Div", "Concat", "Min", "Sum", "Mean"):
      ok = bool(ins) and all(i in out for i in ins)
    elif n.op == "QuantizeLinear":
      zp = consts.get(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
      ok = zp is not None and zp.dtype.kind == "u" and not np.any(zp)
    elif n.op == "DequantizeLinear":
      zp = consts.get(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] else None
      ok = ins[0] in out and (zp is None or not np.any(zp))
    if ok:
      out.update(o for o in n.outputs if o)
  return out
