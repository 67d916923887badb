"""``import_model``: an ONNX file becomes a :class:`cimjax.models.ModelDef` (docs/onnx.md).

The steps are in :mod:`cimjax.onnx.graph` (read, fold, find layers, order) and the module in
:mod:`cimjax.onnx.module`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.errors import CimjaxError, OnnxError
from cimjax.layers import DEFAULT_MAX_BITS, QuantContext
from cimjax.onnx import graph as graph_lib
from cimjax.onnx import ops as ops_lib
from cimjax.onnx import qdq as qdq_lib
from cimjax.onnx.graph import Layer, Node, OnnxGraph
from cimjax.onnx.module import Inits, OnnxModule

LAYER_OPS = graph_lib.QUANT_OPS
OTHER_OPS = ("BatchNormalization",)
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted({*ops_lib.OPS, *LAYER_OPS, *OTHER_OPS}))
_JIT_INIT_BYTES = 64 << 20
_NO_FOLD = {*LAYER_OPS, *OTHER_OPS, "Softmax", "LogSoftmax", "MaxPool", "AveragePool"}


class _StaticRuntime:
  """What an op needs from the runtime when folding constants."""

  def __init__(self, opset: int) -> None:
    self.opset = opset


def _unsupported(node: Node) -> OnnxError:
  return OnnxError(
    f"node {node.name!r} (op {node.op}): unsupported; supported ops: {', '.join(SUPPORTED_OPS)}"
  )


def _fold(nodes: Sequence[Node], consts: dict[str, np.ndarray], opset: int) -> set[str]:
  """Evaluates every node whose inputs are all constants (in place); returns the folded names."""
  rt = _StaticRuntime(opset)
  folded = set()
  for n in nodes:
    if n.op in _NO_FOLD or n.op not in ops_lib.OPS:
      continue
    if n.op != "Constant" and not all((not i) or i in consts for i in n.inputs):
      continue
    if n.op != "Constant" and not any(n.inputs):
      continue
    args = [consts[i] if i else None for i in n.inputs]
    try:
      outs = ops_lib.OPS[n.op](rt, n, args)
    except CimjaxError:
      raise
    except Exception as e:  # noqa: BLE001 - report any NumPy error with the node
      raise OnnxError(f"node {n.name!r} (op {n.op}): {type(e).__name__}: {e}") from None
    if not all(ops_lib.is_static(o) for o in outs):
      continue
    for name, v in zip(n.outputs, outs):
      if name:
        consts[name] = np.asarray(v)
    folded.add(n.name)
  return folded


def _consumers(nodes: Sequence[Node]) -> dict[str, list[Node]]:
  out: dict[str, list[Node]] = {}
  for n in nodes:
    for i in n.inputs:
      if i:
        out.setdefault(i, []).append(n)
  return out


def _vector(v: np.ndarray, m: int) -> np.ndarray | None:
  """``v`` as a ``[m]`` bias vector when it broadcasts along the last axis only, else None."""
  v = np.asarray(v)
  if v.size == m and (v.ndim == 0 or v.shape[-1] == m):
    return v.reshape(m).astype(np.float32)
  if v.size == 1:
    return np.full((m,), float(v.reshape(())), np.float32)
  return None


def _find_layers(
  g: OnnxGraph, nodes: list[Node], all_nodes: Sequence[Node], consts: dict[str, np.ndarray]
) -> dict[str, Layer]:
  """The quantized layers among the runtime ``nodes`` (QDQ chains read, not yet named)."""
  producer = {o: n for n in all_nodes for o in n.outputs if o}
  layers = {}
  for n in nodes:
    if n.op not in LAYER_OPS:
      continue
    a, b = n.inputs[0], n.inputs[1]
    a_const, b_const = a in consts, b in consts
    if n.op == "Conv":
      if not b_const:
        raise OnnxError(f"node {n.name!r} (op Conv): the weight must be a constant")
      w = consts[b]
      if w.ndim != 4:
        raise OnnxError(f"node {n.name!r} (op Conv): {w.ndim - 2}-D convolution unsupported")
      dil = [int(d) for d in n.attrs.get("dilations", (1, 1))]
      if any(d != 1 for d in dil):
        raise OnnxError(f"node {n.name!r} (op Conv): dilations {dil} unsupported")
      kind = "Conv2D"
    elif n.op == "Gemm":
      if not b_const:
        raise OnnxError(f"node {n.name!r} (op Gemm): B must be a constant weight")
      kind = "Dense"
    else:
      if a_const:
        raise OnnxError(f"node {n.name!r} (op MatMul): a constant first operand is unsupported")
      kind = "Dense" if b_const else "MatMul"
      if kind == "Dense" and consts[b].ndim != 2:
        raise OnnxError(f"node {n.name!r} (op MatMul): the constant weight must be 2-D")
    act = qdq_lib.find_chain(a, producer, consts)
    x = act.source if act is not None and act.source is not None else a
    if act is not None and act.source is None:
      act = None
    wq = qdq_lib.find_chain(b, producer, consts)
    w_name = b
    if kind == "MatMul" and wq is not None and wq.source is not None:
      w_name = wq.source
    layers[n.name] = Layer(
      node=n.name,
      op=n.op,
      kind=kind,
      module="",
      signed_input=True,
      x=x,
      w=w_name,
      act_qdq=act,
      w_qdq=wq,
    )
  return layers


def _fuse_bias(
  g: OnnxGraph, nodes: list[Node], layers: dict[str, Layer], consts: dict[str, np.ndarray]
) -> tuple[list[Node], dict[str, Layer]]:
  """A MatMul layer whose only consumer adds a constant vector takes that vector as its bias."""
  users = _consumers(nodes)
  drop: dict[str, str] = {}  # Add output -> MatMul output
  for n in nodes:
    layer = layers.get(n.name)
    if layer is None or n.op != "MatMul" or layer.kind != "Dense":
      continue
    out = n.outputs[0]
    us = users.get(out, [])
    if len(us) != 1 or us[0].op != "Add" or out == g.output:
      continue
    add = us[0]
    other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
    m = consts[layer.w].shape[1]
    if other not in consts or _vector(consts[other], m) is None or np.ndim(consts[other]) > 1:
      continue
    layers[n.name] = dataclasses.replace(layer, bias=other, fused_add=add.name)
    drop[add.outputs[0]] = out
  if not drop:
    return nodes, layers
  kept = []
  fused = {lay.fused_add for lay in layers.values() if lay.fused_add}
  for n in nodes:
    if n.name in fused:
      continue
    ins = tuple(drop.get(i, i) for i in n.inputs)
    kept.append(dataclasses.replace(n, inputs=ins) if ins != n.inputs else n)
  for k, lay in list(layers.items()):
    x, w = drop.get(lay.x, lay.x), drop.get(lay.w, lay.w)
    if (x, w) != (lay.x, lay.w):
      layers[k] = dataclasses.replace(lay, x=x, w=w)
  g.output = drop.get(g.output, g.output)
  return kept, layers


def _strip_inputs(nodes: list[Node], layers: dict[str, Layer]) -> list[Node]:
  """Layer nodes read their (QDQ-free) operands: rewrite their inputs for liveness."""
  out = []
  for n in nodes:
    lay = layers.get(n.name)
    if lay is not None:
      rest = tuple(i for i in n.inputs[2:] if i)
      n = dataclasses.replace(n, inputs=(lay.x, lay.w, *rest, *([lay.bias] if lay.bias else [])))
    out.append(n)
  return out


def _layer_arrays(n: Node, lay: Layer, consts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Initial kernel, bias and (QCDQ) clip tables of a layer."""
  rows = DEFAULT_MAX_BITS
  arrays: dict[str, np.ndarray] = {}
  if lay.kind == "Conv2D":
    w = np.asarray(consts[n.inputs[1]], np.float32)  # OIHW
    arrays["kernel"] = np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
    if len(n.inputs) > 2 and n.inputs[2]:
      arrays["bias"] = np.asarray(consts[n.inputs[2]], np.float32).reshape(-1)
    m = w.shape[0]
  elif lay.kind == "Dense":
    w = np.asarray(consts[n.inputs[1]], np.float32)
    if n.op == "Gemm":
      if n.attrs.get("transB", 0):
        w = w.T
      w = w * np.float32(n.attrs.get("alpha", 1.0))
    arrays["kernel"] = np.ascontiguousarray(w)
    m = w.shape[1]
    if lay.bias is not None:
      arrays["bias"] = _vector(consts[lay.bias], m)
    elif n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2]:
      c = consts.get(n.inputs[2])
      vec = None if c is None else _vector(c, m)
      if vec is not None:
        arrays["bias"] = vec * np.float32(n.attrs.get("beta", 1.0))
  else:
    m = 1
  if lay.w_qdq is not None:
    arrays["w_clip"] = qdq_lib.weight_clip_table(lay.w_qdq, m if lay.kind != "MatMul" else 1, rows)
    if lay.kind == "MatMul":
      arrays["w_clip"] = arrays["w_clip"].reshape(rows)
  if lay.act_qdq is not None:
    arrays["a_clip"] = qdq_lib.act_clip_table(lay.act_qdq, lay.signed_input, rows)
  return arrays


def build_graph(source: Any, *, layer_order: str = "shortcut_first") -> OnnxGraph:
  """Reads and analyses an ONNX model (see :mod:`cimjax.onnx.graph`).

  Raises:
    OnnxError: unreadable file, unsupported op (one line naming the node and the op), a layer
      the CIM mapping cannot express.
  """
  g, all_nodes, inits, _ = graph_lib.read_graph(source)
  if isinstance(source, (str, os.PathLike)):
    g.source = os.fspath(source)
  consts = dict(inits)
  folded = _fold(all_nodes, consts, g.opset)
  if g.output in consts:
    raise OnnxError(f"the graph output {g.output!r} is a constant")
  runtime = [n for n in all_nodes if n.name not in folded]
  nodes = graph_lib.live_nodes(runtime, g.output)
  for n in nodes:
    if n.op not in SUPPORTED_OPS:
      raise _unsupported(n)
  layers = _find_layers(g, nodes, all_nodes, consts)
  nodes, layers = _fuse_bias(g, nodes, layers, consts)
  nodes = graph_lib.live_nodes(_strip_inputs(nodes, layers), g.output)
  qdq_unsigned = {
    lay.x for lay in layers.values() if lay.act_qdq is not None and not lay.act_qdq.signed
  }
  nonneg = graph_lib.nonneg_values(nodes, consts, qdq_unsigned)
  for k, lay in layers.items():
    signed = lay.act_qdq.signed if lay.act_qdq is not None else lay.x not in nonneg
    layers[k] = dataclasses.replace(lay, signed_input=bool(signed))
  nodes = graph_lib.call_order(nodes, layers, layer_order)
  names = graph_lib._Names()
  by_name = {n.name: n for n in nodes}
  for n in nodes:
    if n.name in layers:
      lay = layers[n.name]
      w_name = n.inputs[1] if lay.kind != "MatMul" else None
      weight_src = lay.w if lay.kind != "MatMul" else None
      base = graph_lib.layer_base_name(n, _initializer_name(weight_src or w_name, inits, all_nodes))
      layers[n.name] = dataclasses.replace(lay, module=names.take(base))
    elif n.op == "BatchNormalization":
      scale = n.inputs[1]
      g.bn[n.name] = names.take(graph_lib.layer_base_name(n, scale if scale in inits else None))
      arrays = {
        k: np.asarray(consts[v], np.float32).reshape(-1)
        for k, v in zip(("scale", "bias", "mean", "var"), n.inputs[1:5])
      }
      g.bn_inits[n.name] = Inits(arrays)
  for n in nodes:
    if n.name in layers or n.op == "BatchNormalization":
      continue
    skip = graph_lib.STATIC_INPUTS.get(n.op, ())
    for j, i in enumerate(n.inputs):
      if not i or j in skip or i not in consts or i in g.params:
        continue
      v = consts[i]
      if v.dtype.kind == "f" and v.size > 1:
        g.params[i] = names.take(i)
  for k, lay in layers.items():
    n = by_name[k]
    g.layer_inits[k] = Inits(_layer_arrays(n, lay, consts))
    if (
      n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2] and "bias" not in g.layer_inits[k].arrays
    ):
      c = n.inputs[2]
      g.gemm_extra[k] = (c, float(n.attrs.get("beta", 1.0)))
      if c in consts and consts[c].dtype.kind == "f" and consts[c].size > 1:
        g.params.setdefault(c, names.take(c))
  g.nodes = nodes
  g.consts = consts
  g.layers = layers
  g.nonneg = nonneg
  return g


def _initializer_name(
  value: str | None, inits: dict[str, np.ndarray], nodes: Sequence[Node]
) -> str | None:
  """The initializer behind a (possibly dequantized or transposed) constant weight."""
  if value is None:
    return None
  producer = {o: n for n in nodes for o in n.outputs if o}
  seen = 0
  while value not in inits and value in producer and seen < 8:
    value = producer[value].inputs[0]
    seen += 1
  return value if value in inits else None


def import_model(
  path_or_model: Any,
  *,
  input_shape: Sequence[int] | None = None,
  num_classes: int | None = None,
  name: str | None = None,
  layer_order: str = "shortcut_first",
) -> Any:
  """Imports an ONNX model as a cimjax :class:`~cimjax.models.ModelDef`.

  Args:
    path_or_model: an ``.onnx`` path, its bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
    input_shape: one input without the batch axis in cimjax's layout, ``(H, W, C)`` for images;
      default from the file (required when its spatial dims are symbolic).
    num_classes: number of logits; default the output's last dimension.
    name: the ModelDef's name; default the file's stem (or the graph's name).
    layer_order: ``"shortcut_first"`` (default: the reference work's order, a residual block's
      projection shortcut first) or ``"file"`` (the file's node order).

  Returns:
    A ModelDef whose module is an :class:`~cimjax.onnx.module.OnnxModule`; ``module.init``
    reproduces the file's initializers (see :func:`import_variables`).

  Raises:
    OnnxError: unreadable file, unsupported op, unsupported layer, shape mismatch.
  """
  g = build_graph(path_or_model, layer_order=layer_order)
  shape = _input_shape(g, input_shape)
  module = OnnxModule(g)
  out = jax.eval_shape(
    lambda x: module.init_with_output(jax.random.key(0), x, QuantContext())[0],
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
  )
  if num_classes is None:
    num_classes = int(out.shape[-1]) if out.shape else 1
  elif out.shape and int(out.shape[-1]) != int(num_classes):
    raise OnnxError(f"num_classes={num_classes} but the graph output has {out.shape[-1]} values")
  if name is None:
    stem = os.path.splitext(os.path.basename(g.source))[0] if g.source else ""
    name = stem or g.name
  from cimjax.models import ModelDef

  return ModelDef(
    name=name,
    module=module,
    input_shape=tuple(shape),
    num_classes=int(num_classes),
    description=f"imported from ONNX ({g.source or g.name}), {len(g.layers)} quantizable layers",
  )


def _input_shape(g: OnnxGraph, given: Sequence[int] | None) -> tuple[int, ...]:
  dims = list(g.input_shape[1:])
  if len(dims) == 3:  # NCHW -> HWC
    dims = [dims[1], dims[2], dims[0]]
  if given is not None:
    given = tuple(int(d) for d in given)
    if len(given) != len(dims) or any(d is not None and d != e for d, e in zip(dims, given)):
      raise OnnxError(
        f"input_shape={given} does not fit the graph input {g.input!r} of shape "
        f"{list(g.input_shape)} (cimjax's layout: {'(H, W, C)' if len(dims) == 3 else dims})"
      )
    return given
  if not dims or any(d is None for d in dims):
    raise OnnxError(
      f"the graph input {g.input!r} has shape {list(g.input_shape)}: pass input_shape="
      f"{'(H, W, C)' if len(dims) == 3 else '...'}"
    )
  return tuple(int(d) for d in dims)


def import_variables(model: Any, key: Any = None) -> dict[str, Any]:
  """The variables of an imported model: the file's initializers (``module.init`` on zeros).

  Args:
    model: a ModelDef from :func:`import_model`.
    key: PRNG key (unused by the file's values; default ``key(0)``).
  """
  key = jax.random.key(0) if key is None else key
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  init = lambda k, x_: model.module.init(k, x_, QuantContext())  # noqa: E731
  g = getattr(model.module, "graph", None)
  size = sum(a.nbytes for a in g.consts.values()) if isinstance(g, OnnxGraph) else 0
  # Compiled, the initial values are constants of the program: fast for small files, while a
  # large file (hundreds of MB) initialises faster op by op.
  if size <= _JIT_INIT_BYTES:
    init = jax.jit(init)
  return dict(init(key, x))


def graph_of(model: Any) -> OnnxGraph:
  """The :class:`OnnxGraph` of an imported ModelDef (or module)."""
  module = getattr(model, "module", model)
  if not isinstance(module, OnnxModule):
    raise OnnxError(f"{getattr(model, 'name', module)!r} is not a model imported from ONNX")
  return module.graph


def qcdq_policy(model: Any) -> np.ndarray:
  """The bit policy ``[L, 2]`` (weight, activation bits) of an imported QCDQ model.

  Raises:
    OnnxError: a layer's weight or activation has no QuantizeLinear/DequantizeLinear chain.
  """
  g = graph_of(model)
  rows = []
  for lay in g.layer_list:
    if lay.w_qdq is None or lay.act_qdq is None:
      which = "weight" if lay.w_qdq is None else "activation"
      raise OnnxError(
        f"layer {lay.module!r} (node {lay.node!r}): its {which} has no "
        "QuantizeLinear/[Clip]/DequantizeLinear chain, so the file gives no bit-width"
      )
    rows.append((lay.w_qdq.bits, lay.act_qdq.bits))
  return np.asarray(rows, np.int32).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class QcdqImport:
  """What :func:`import_qcdq` returns.

  Attributes:
    model: the ModelDef (float graph; Q/DQ around layers removed).
    variables: its variables (weights dequantized, clip tables at the file's steps).
    policy: int32 ``[L, 2]`` bit-widths read from the file.
  """

  model: Any
  variables: dict[str, Any]
  policy: np.ndarray


def import_qcdq(path_or_model: Any, **kwargs: Any) -> QcdqImport:
  """Imports a QCDQ/QDQ model with its bit-widths as a cimjax policy.

  ``cimjax.models.forward(model.module, variables, x, policy)`` then computes what the file
  computes (the same integer codes where the file follows cimjax's conventions).

  Args:
    path_or_model: as in :func:`import_model`.
    **kwargs: options of :func:`import_model`.
  """
  model = import_model(path_or_model, **kwargs)
  return QcdqImport(model, import_variables(model), qcdq_policy(model))


__all__ = [
  "QcdqImport",
  "SUPPORTED_OPS",
  "build_graph",
  "graph_of",
  "import_model",
  "import_qcdq",
  "import_variables",
  "qcdq_policy",
]
