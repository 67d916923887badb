"""``export_qcdq``: a cimjax model with a bit policy and its variables as a QCDQ ONNX file.

The float forward pass (``cimjax.models.forward`` without a policy) is traced to a jaxpr and
written op by op as ONNX (opset 18); each quantized layer's product (a ``conv_general_dilated``
or ``dot_general``, the k-th one being policy row k) gets its operands in QCDQ form with
cimjax's own steps and integer codes:

* activation: ``QuantizeLinear(step, zp=0)`` (uint8 unsigned, int8 signed) -> ``Clip`` to
  ``[0, 2^a-1]`` or ``[-2^(a-1), 2^(a-1)-1]`` when ``a < 8`` -> ``DequantizeLinear``;
* weight of a Conv / Dense: the integer codes cimjax computes (int8 initializer, OIHW or
  ``[in, out]``) -> ``Clip`` to ``[-(2^(w-1)-1), 2^(w-1)-1]`` when ``w < 8`` ->
  ``DequantizeLinear`` with the per-output-channel steps;
* the second operand of an attention MatMul: QuantizeLinear -> Clip (narrow range) ->
  DequantizeLinear with the weight step.

onnxruntime then computes the fake-quantised forward pass of cimjax up to float rounding (the
products of dequantised values are summed in float). The graph takes NCHW images (a Transpose
to cimjax's NHWC comes first) with a symbolic batch axis: the forward pass is traced at two
batch sizes and every dimension that scales with the batch is computed from the input's shape.
The file is written with ``onnx.helper`` (no extra dependency).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import quant
from cimjax.errors import OnnxError

OPSET = 18
_INLINE = (
  "jit",
  "pjit",
  "custom_jvp_call",
  "custom_vjp_call",
  "custom_vjp_call_jaxpr",
  "closed_call",
  "core_call",
  "remat",
  "checkpoint",
  "remat2",
)
_IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision")
_PRODUCTS = ("conv_general_dilated", "dot_general")
_BINARY = {
  "add": "Add",
  "sub": "Sub",
  "mul": "Mul",
  "div": "Div",
  "max": "Max",
  "min": "Min",
  "pow": "Pow",
  "and": "And",
  "or": "Or",
  "gt": "Greater",
  "ge": "GreaterOrEqual",
  "lt": "Less",
  "le": "LessOrEqual",
  "eq": "Equal",
}
_UNARY = {
  "neg": "Neg",
  "exp": "Exp",
  "log": "Log",
  "tanh": "Tanh",
  "logistic": "Sigmoid",
  "erf": "Erf",
  "sqrt": "Sqrt",
  "abs": "Abs",
  "sign": "Sign",
  "floor": "Floor",
  "ceil": "Ceil",
  "not": "Not",
  "sin": "Sin",
  "cos": "Cos",
}


@dataclasses.dataclass(frozen=True)
class _Const:
  """A constant operand (a closed jaxpr's const or a literal)."""

  value: np.ndarray


class _Var:
  """A value of the flattened equations (one per call site: inlined jaxprs are shared)."""

  __slots__ = ("aval",)

  def __init__(self, aval: Any) -> None:
    self.aval = aval


@dataclasses.dataclass
class _Eqn:
  prim: str
  params: dict[str, Any]
  ins: list[Any]
  outs: list[Any]


def _literal_value(a: Any) -> np.ndarray:
  return np.asarray(a.val, dtype=np.dtype(a.aval.dtype))


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]]:
  """The inner jaxpr of a call-like equation and its consts."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if j is None:
      continue
    if hasattr(j, "consts"):
      return j.jaxpr, list(j.consts)
    return j, []
  raise OnnxError(f"export: cannot inline {eqn.primitive.name}")


def _flatten(closed: Any) -> tuple[list[Any], list[Any], list[_Eqn]]:
  """Inlines every call in ``closed`` into one equation list.

  Returns:
    ``(invars, outvars as atoms, equations)``; atoms are jax Vars, or :class:`_Const`.
  """
  eqns: list[_Eqn] = []

  def atom(a: Any, sub: dict) -> Any:
    if type(a).__name__ == "Literal":
      return _Const(_literal_value(a))
    return sub.get(a, a)

  def walk(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    sub: dict[Any, Any] = {}
    for v, c in zip(jaxpr.constvars, consts):
      sub[v] = _Const(np.asarray(c))
    for v, a in zip(jaxpr.invars, args):
      sub[v] = a
    for e in jaxpr.eqns:
      ins = [atom(a, sub) for a in e.invars]
      name = e.primitive.name
      if name in _INLINE:
        inner, inner_consts = _sub_jaxpr(e)
        n_consts = int(e.params.get("num_consts", 0)) if name.startswith("custom_vjp") else 0
        outs = walk(
          inner, inner_consts, ins[n_consts:] if n_consts and len(inner.invars) < len(ins) else ins
        )
        for v, o in zip(e.outvars, outs):
          sub[v] = o
        continue
      if name in _IDENTITY and len(ins) == len(e.outvars):
        for v, a in zip(e.outvars, ins):
          sub[v] = a
        continue
      outs = []
      for v in e.outvars:
        sub[v] = _Var(v.aval)
        outs.append(sub[v])
      eqns.append(_Eqn(name, dict(e.params), ins, outs))
    return [atom(a, sub) for a in jaxpr.outvars]

  outs = walk(closed.jaxpr, closed.consts, closed.jaxpr.invars)
  live = {id(o) for o in outs}
  keep = []
  for e in reversed(eqns):  # dead code elimination
    if any(id(o) in live for o in e.outs):
      keep.append(e)
      live.update(id(a) for a in e.ins if not isinstance(a, _Const))
  return list(closed.jaxpr.invars), outs, list(reversed(keep))


@dataclasses.dataclass(frozen=True)
class _LayerQ:
  """Quantization of one layer's operands (cimjax's values)."""

  kind: str
  w_bits: int
  a_bits: int
  signed_input: bool
  a_step: np.ndarray  # float32 []
  w_step: np.ndarray  # float32 [m] or []
  w_int: np.ndarray | None  # the kernel's integer codes (static layers)
  kernel_path: str


class _Writer:
  """Builds the ONNX graph from the flattened equations of two traces."""

  def __init__(self, batch_pair: tuple[int, int] | None, integer: bool = False) -> None:
    import onnx
    from onnx import helper, numpy_helper

    self.onnx, self.helper, self.nph = onnx, helper, numpy_helper
    self.nodes: list[Any] = []
    self.inits: list[Any] = []
    self.count = 0
    self.const_cache: dict[Any, str] = {}
    self.batch_pair = batch_pair
    self.batch_value: str | None = None
    self.input = "input"
    self.transposed: dict[str, tuple[str, tuple[int, ...]]] = {}
    self.integer = integer

  # -- names and constants ---------------------------------------------------------------------
  def fresh(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def const(self, arr: Any, hint: str = "c") -> str:
    arr = np.asarray(arr)
    key = None
    if arr.size <= 16 and hint == "c":
      key = (arr.dtype.str, arr.shape, arr.tobytes())
      if key in self.const_cache:
        return self.const_cache[key]
    name = self.fresh(hint)
    self.inits.append(self.nph.from_array(np.ascontiguousarray(arr), name))
    if key is not None:
      self.const_cache[key] = name
    return name

  def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> Any:
    outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
    self.nodes.append(
      self.helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs)
    )
    return outs[0] if n_out == 1 else outs

  def transpose(self, x: str, perm: Sequence[int]) -> str:
    perm = tuple(int(p) for p in perm)
    if perm == tuple(range(len(perm))):
      return x
    if x in self.transposed:  # Transpose(Transpose(y, p), q) = Transpose(y, p[q])
      src, p0 = self.transposed[x]
      comp = tuple(p0[i] for i in perm)
      if comp == tuple(range(len(comp))):
        return src
      out = self.op("Transpose", [src], perm=list(comp))
      self.transposed[out] = (src, comp)
      return out
    out = self.op("Transpose", [x], perm=list(perm))
    self.transposed[out] = (x, perm)
    return out

  # -- shapes ----------------------------------------------------------------------------------
  def batch(self) -> str:
    if self.batch_value is None:
      self.batch_value = self.op("Shape", [self.input], start=0, end=1)
    return self.batch_value

  def dims(self, pair: tuple[Sequence[int], Sequence[int]]) -> list[tuple[bool, int]]:
    """``(dynamic, value)`` per dim: a static size, or the factor k of ``k * batch``."""
    a, b = pair
    out = []
    for d1, d2 in zip(a, b):
      if d1 == d2:
        out.append((False, int(d1)))
        continue
      b1, b2 = self.batch_pair or (1, 1)
      if d1 * b2 != d2 * b1 or d1 % b1:
        raise OnnxError(f"export: a dimension ({d1} / {d2}) is not proportional to the batch")
      out.append((True, int(d1 // b1)))
    return out

  def shape_tensor(self, pair: tuple[Sequence[int], Sequence[int]]) -> str:
    dims = self.dims(pair)
    if not any(dyn for dyn, _ in dims):
      return self.const(np.asarray([v for _, v in dims], np.int64), "shape")
    pieces, run = [], []
    for dyn, v in dims:
      if not dyn:
        run.append(v)
        continue
      if run:
        pieces.append(self.const(np.asarray(run, np.int64), "shape"))
        run = []
      b = self.batch()
      pieces.append(b if v == 1 else self.op("Mul", [b, self.const(np.asarray([v], np.int64))]))
    if run:
      pieces.append(self.const(np.asarray(run, np.int64), "shape"))
    return pieces[0] if len(pieces) == 1 else self.op("Concat", pieces, axis=0)

  # -- QCDQ ------------------------------------------------------------------------------------
  def _quantize(
    self, x: str, step: np.ndarray, bits: int, signed: bool, narrow: bool, kind: str
  ) -> tuple[str, str, str]:
    """QuantizeLinear (zero point 0) -> Clip to the bit-width's range.

    Returns:
      ``(codes, scale, zero_point)``: the integer codes' tensor and the two constants (named
      ``{kind}_scale`` / ``{kind}_zp``) that a DequantizeLinear of them takes.
    """
    dt = np.int8 if signed else np.uint8
    scale = self.const(np.asarray(step, np.float32).reshape(()), f"{kind}_scale")
    zp = self.const(np.zeros((), dt), f"{kind}_zp")
    q = self.op("QuantizeLinear", [x, scale, zp])
    if bits < 8 or narrow:
      rng = quant.int_range(bits, signed=signed, narrow=narrow)
      lo, hi = self.const(np.asarray(float(rng.lo), dt)), self.const(np.asarray(float(rng.hi), dt))
      q = self.op("Clip", [q, lo, hi])
    return q, scale, zp

  def act_q(self, x: str, step: np.ndarray, bits: int, signed: bool, narrow: bool = False) -> str:
    """The activation's integer codes (QuantizeLinear -> Clip)."""
    return self._quantize(x, step, bits, signed, narrow, "a")[0]

  def rescale(self, acc: str, a_step: np.ndarray, w_step: np.ndarray, shape: Sequence[int]) -> str:
    """``float(acc) * (a_step * w_step)``: cimjax's dequantisation of an int32 product.

    The scale product is the float32 product cimjax computes (``sx * sw``), reshaped to
    ``shape`` (the output channel axis), so the float result is cimjax's bit for bit.
    """
    f = self.op("Cast", [acc], to=self.onnx.TensorProto.FLOAT)
    sx = np.asarray(a_step, np.float32).reshape(())
    scale = (sx * np.asarray(w_step, np.float32).reshape(-1)).astype(np.float32)
    if scale.size > 1:
      scale = scale.reshape(shape)
    return self.op("Mul", [f, self.const(scale, "out_scale")])

  def act_qcdq(self, x: str, step: np.ndarray, bits: int, signed: bool) -> str:
    """The activation fake-quantized: QuantizeLinear -> Clip -> DequantizeLinear."""
    q, scale, zp = self._quantize(x, step, bits, signed, False, "a")
    return self.op("DequantizeLinear", [q, scale, zp])

  def weight_cdq(self, w_int: np.ndarray, step: np.ndarray, bits: int, axis: int) -> str:
    w = self.const(np.rint(w_int).astype(np.int8), "w_int")
    step = np.asarray(step, np.float32).reshape(-1)
    channels = w_int.shape[axis]
    if step.size == 1:
      scale = self.const(step.reshape(()), "w_scale")
      zp = self.const(np.zeros((), np.int8), "w_zp")
      attrs: dict[str, Any] = {}
    else:
      scale = self.const(np.broadcast_to(step, (channels,)).astype(np.float32), "w_scale")
      zp = self.const(np.zeros((channels,), np.int8), "w_zp")
      attrs = {"axis": int(axis)}
    if bits < 8:
      hi = 2 ** (bits - 1) - 1
      w = self.op(
        "Clip", [w, self.const(np.asarray(-hi, np.int8)), self.const(np.asarray(hi, np.int8))]
      )
    return self.op("DequantizeLinear", [w, scale, zp], **attrs)

  def weight_qcdq(self, x: str, step: np.ndarray, bits: int) -> str:
    """A float weight fake-quantized to the narrow signed range (+-(2^(bits-1) - 1))."""
    q, scale, zp = self._quantize(x, step, bits, True, True, "w")
    return self.op("DequantizeLinear", [q, scale, zp])


def _onnx_dtype(dt: Any) -> int:
  from onnx import helper

  return int(helper.np_dtype_to_tensor_dtype(np.dtype(dt)))


def _shape(a: Any) -> tuple[int, ...]:
  if isinstance(a, _Const):
    return tuple(a.value.shape)
  return tuple(int(d) for d in a.aval.shape)


def _pool_perm(
  ndim: int, window: Sequence[int], strides: Sequence[int], pads: Sequence
) -> tuple[list[int], list[int]]:
  """(perm to [N, C, spatial...], spatial axes) of a reduce_window over a channels-last array."""
  trivial = [
    i for i in range(ndim) if window[i] == 1 and strides[i] == 1 and tuple(pads[i]) == (0, 0)
  ]
  if len(trivial) < 2:
    raise OnnxError("export: pooling over the batch or channel axis is unsupported")
  n_ax, c_ax = trivial[0], trivial[-1]
  spatial = [i for i in range(ndim) if i not in (n_ax, c_ax)]
  return [n_ax, c_ax, *spatial], spatial


def _emit(w: _Writer, e: _Eqn, e2: _Eqn | None, name: Any, layer: _LayerQ | None) -> list[str]:
  """ONNX nodes for one equation; returns the names of its outputs."""
  p = e.params
  prim = e.prim
  if prim == "conv_general_dilated":
    return [_emit_conv(w, e, name, layer)]
  if prim == "dot_general":
    return [_emit_dot(w, e, name, layer)]
  ins = [name(a) for a in e.ins]
  out_pair = lambda i=0: (_shape(e.outs[i]), _shape((e2 or e).outs[i]))  # noqa: E731
  in_pair = lambda i=0: (_shape(e.ins[i]), _shape((e2 or e).ins[i]))  # noqa: E731
  if prim in _BINARY:
    return [w.op(_BINARY[prim], ins)]
  if prim == "ne":
    return [w.op("Not", [w.op("Equal", ins)])]
  if prim == "rem":
    return [w.op("Mod", ins, fmod=1)]
  if prim in _UNARY:
    return [w.op(_UNARY[prim], ins)]
  x = ins[0] if ins else None
  if prim == "rsqrt":
    return [w.op("Reciprocal", [w.op("Sqrt", [x])])]
  if prim == "erfc":
    return [w.op("Sub", [w.const(np.asarray(1.0, np.float32)), w.op("Erf", [x])])]
  if prim == "log1p":
    return [w.op("Log", [w.op("Add", [x, w.const(np.asarray(1.0, np.float32))])])]
  if prim == "expm1":
    return [w.op("Sub", [w.op("Exp", [x]), w.const(np.asarray(1.0, np.float32))])]
  if prim == "exp2":
    return [w.op("Pow", [w.const(np.asarray(2.0, np.float32)), x])]
  if prim == "square":
    return [w.op("Mul", [x, x])]
  if prim == "integer_pow":
    y = int(p["y"])
    if y == 2:
      return [w.op("Mul", [x, x])]
    return [w.op("Pow", [x, w.const(np.asarray(float(y), np.float32))])]
  if prim == "round":
    method = int(getattr(p.get("rounding_method"), "value", p.get("rounding_method", 0)))
    if method == 1:
      return [w.op("Round", [x])]
    half = w.const(np.asarray(0.5, np.float32))
    return [
      w.op("Mul", [w.op("Sign", [x]), w.op("Floor", [w.op("Add", [w.op("Abs", [x]), half])])])
    ]
  if prim == "select_n":
    if len(ins) != 3:
      raise OnnxError("export: select_n with more than two cases is unsupported")
    cond = ins[0]
    if (
      np.dtype(e.ins[0].aval.dtype if not isinstance(e.ins[0], _Const) else e.ins[0].value.dtype)
      != np.bool_
    ):
      cond = w.op("Cast", [cond], to=_onnx_dtype(np.bool_))
    return [w.op("Where", [cond, ins[2], ins[1]])]
  if prim == "clamp":
    return [w.op("Max", [w.op("Min", [ins[1], ins[2]]), ins[0]])]
  if prim == "convert_element_type":
    return [w.op("Cast", [x], to=_onnx_dtype(p["new_dtype"]))]
  if prim == "reshape":
    return [w.op("Reshape", [x, w.shape_tensor(out_pair())])]
  if prim == "squeeze":
    return [w.op("Squeeze", [x, w.const(np.asarray(p["dimensions"], np.int64))])]
  if prim == "expand_dims":
    return [w.op("Unsqueeze", [x, w.const(np.asarray(p["dimensions"], np.int64))])]
  if prim == "transpose":
    return [w.transpose(x, p["permutation"])]
  if prim == "broadcast_in_dim":
    bdims = tuple(int(d) for d in p["broadcast_dimensions"])
    shp1, shp2 = in_pair()
    out1, out2 = out_pair()
    if list(bdims) != sorted(bdims):
      order = sorted(range(len(bdims)), key=lambda i: bdims[i])
      x = w.transpose(x, order)
      bdims = tuple(bdims[i] for i in order)
      shp1, shp2 = tuple(shp1[i] for i in order), tuple(shp2[i] for i in order)
    missing = [i for i in range(len(out1)) if i not in bdims]
    if missing:
      x = w.op("Unsqueeze", [x, w.const(np.asarray(missing, np.int64))])
    full1, full2 = [1] * len(out1), [1] * len(out1)
    for j, d in enumerate(bdims):
      full1[d], full2[d] = shp1[j], shp2[j]
    if tuple(full1) == tuple(out1) and tuple(full2) == tuple(out2):
      return [x]
    t1 = [1 if full1[i] == out1[i] and full2[i] == out2[i] else out1[i] for i in range(len(out1))]
    t2 = [1 if full1[i] == out1[i] and full2[i] == out2[i] else out2[i] for i in range(len(out1))]
    return [w.op("Expand", [x, w.shape_tensor((t1, t2))])]
  if prim == "concatenate":
    return [w.op("Concat", ins, axis=int(p["dimension"]))]
  if prim == "split":
    sizes = [int(s) for s in p["sizes"]]
    outs = w.op(
      "Split", [x, w.const(np.asarray(sizes, np.int64))], n_out=len(sizes), axis=int(p["axis"])
    )
    return outs if isinstance(outs, list) else [outs]
  if prim == "slice":
    starts = [int(s) for s in p["start_indices"]]
    limits = [int(s) for s in p["limit_indices"]]
    strides = [int(s) for s in (p.get("strides") or [1] * len(starts))]
    dims = w.dims(in_pair())
    ends = []
    full = _shape(e.ins[0])
    for j, (dyn, _) in enumerate(dims):
      if dyn and (starts[j] or strides[j] != 1 or limits[j] != full[j]):
        raise OnnxError("export: a slice of the batch axis is unsupported")
      ends.append(2**63 - 1 if dyn else limits[j])
    return [
      w.op(
        "Slice",
        [
          x,
          w.const(np.asarray(starts, np.int64)),
          w.const(np.asarray(ends, np.int64)),
          w.const(np.arange(len(starts), dtype=np.int64)),
          w.const(np.asarray(strides, np.int64)),
        ],
      )
    ]
  if prim == "rev":
    dims_ = [int(d) for d in p["dimensions"]]
    n = len(dims_)
    return [
      w.op(
        "Slice",
        [
          x,
          w.const(np.full(n, -1, np.int64)),
          w.const(np.full(n, -(2**63) + 1, np.int64)),
          w.const(np.asarray(dims_, np.int64)),
          w.const(np.full(n, -1, np.int64)),
        ],
      )
    ]
  if prim == "pad":
    cfg = [tuple(int(v) for v in c) for c in p["padding_config"]]
    if any(c[2] for c in cfg) or any(c[0] < 0 or c[1] < 0 for c in cfg):
      raise OnnxError("export: interior or negative padding is unsupported")
    pads = [c[0] for c in cfg] + [c[1] for c in cfg]
    return [w.op("Pad", [x, w.const(np.asarray(pads, np.int64)), ins[1]], mode="constant")]
  if prim in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"):
    op = {
      "reduce_sum": "ReduceSum",
      "reduce_max": "ReduceMax",
      "reduce_min": "ReduceMin",
      "reduce_prod": "ReduceProd",
    }[prim]
    axes = [int(a) for a in p["axes"]]
    if not axes:
      return [x]
    return [w.op(op, [x, w.const(np.asarray(axes, np.int64))], keepdims=0)]
  if prim == "argmax":
    out = w.op("ArgMax", [x], axis=int(p["axes"][0]), keepdims=0)
    return [w.op("Cast", [out], to=_onnx_dtype(p["index_dtype"]))]
  if prim in ("reduce_window_max", "reduce_window_sum"):
    window = [int(v) for v in p["window_dimensions"]]
    strides = [int(v) for v in p["window_strides"]]
    pads = [tuple(int(v) for v in q) for q in p["padding"]]
    if any(d != 1 for d in p.get("base_dilation", ())) or any(
      d != 1 for d in p.get("window_dilation", ())
    ):
      raise OnnxError(f"export: dilated {prim} is unsupported")
    ndim = len(window)
    if all(window[i] == 1 and strides[i] == 1 and pads[i] == (0, 0) for i in range(ndim)):
      return [x]
    perm, spatial = _pool_perm(ndim, window, strides, pads)
    inv = list(np.argsort(perm))
    xt = w.transpose(x, perm)
    k = [window[i] for i in spatial]
    attrs = dict(
      kernel_shape=k,
      strides=[strides[i] for i in spatial],
      pads=[pads[i][0] for i in spatial] + [pads[i][1] for i in spatial],
    )
    if prim == "reduce_window_max":
      y = w.op("MaxPool", [xt], **attrs)
    else:
      y = w.op("AveragePool", [xt], count_include_pad=1, **attrs)
      y = w.op("Mul", [y, w.const(np.asarray(float(np.prod(k)), np.float32))])
    return [w.transpose(y, inv)]
  if prim == "iota":
    shape = tuple(int(s) for s in p["shape"])
    dim = int(p["dimension"])
    v = np.broadcast_to(
      np.arange(shape[dim]).reshape([-1 if i == dim else 1 for i in range(len(shape))]), shape
    ).astype(np.dtype(p["dtype"]))
    return [w.const(v, "iota")]
  raise OnnxError(f"export: jax primitive {prim!r} has no ONNX translation")


def _emit_conv(w: _Writer, e: _Eqn, name: Any, layer: _LayerQ | None) -> str:
  p = e.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = (
    tuple(int(v) for v in s) for s in (dn.lhs_spec, dn.rhs_spec, dn.out_spec)
  )
  if any(d != 1 for d in p["lhs_dilation"]) or int(p.get("batch_group_count", 1)) != 1:
    raise OnnxError("export: a transposed or batch-grouped convolution is unsupported")
  pads = [tuple(int(v) for v in q) for q in p["padding"]]
  x = w.transpose(name(e.ins[0]), lhs_spec)
  conv_attrs = dict(
    strides=[int(s) for s in p["window_strides"]],
    pads=[q[0] for q in pads] + [q[1] for q in pads],
    dilations=[int(d) for d in p["rhs_dilation"]],
    group=int(p["feature_group_count"]),
  )
  if layer is not None and w.integer:
    xq = w.act_q(x, layer.a_step, layer.a_bits, layer.signed_input)
    k = np.transpose(np.asarray(layer.w_int), rhs_spec)  # OIHW
    wq = w.const(np.rint(k).astype(np.int8), "w_int")
    acc = w.op("ConvInteger", [xq, wq], **conv_attrs)
    y = w.rescale(acc, layer.a_step, layer.w_step, (1, k.shape[0], 1, 1))
    return w.transpose(y, [int(i) for i in np.argsort(out_spec)])
  if layer is not None:
    x = w.act_qcdq(x, layer.a_step, layer.a_bits, layer.signed_input)
    k = np.transpose(np.asarray(layer.w_int), rhs_spec)  # OIHW
    wt = w.weight_cdq(k, layer.w_step, layer.w_bits, axis=0)
  else:
    wt = w.transpose(name(e.ins[1]), rhs_spec)
  y = w.op("Conv", [x, wt], **conv_attrs)
  return w.transpose(y, [int(i) for i in np.argsort(out_spec)])


def _emit_dot(w: _Writer, e: _Eqn, name: Any, layer: _LayerQ | None) -> str:
  (lc, rc), (lb, rb) = e.params["dimension_numbers"]
  lc, rc, lb, rb = (tuple(int(v) for v in t) for t in (lc, rc, lb, rb))
  ls, rs = _shape(e.ins[0]), _shape(e.ins[1])
  if len(lc) != 1:
    raise OnnxError("export: dot_general with several contracting dimensions is unsupported")
  lf = [i for i in range(len(ls)) if i not in lc and i not in lb]
  rf = [i for i in range(len(rs)) if i not in rc and i not in rb]
  if lb and (len(lf) != 1 or len(rf) != 1):
    raise OnnxError("export: batched dot_general needs one free dimension per operand")
  if len(rf) > 1:
    raise OnnxError("export: dot_general with several free dimensions on the right is unsupported")
  a = w.transpose(name(e.ins[0]), [*lb, *lf, *lc])
  b_perm = [*rb, *rc, *rf]
  if layer is not None and w.integer:
    aq = w.act_q(a, layer.a_step, layer.a_bits, layer.signed_input)
    if layer.kind != "MatMul":
      k = np.transpose(np.asarray(layer.w_int), b_perm)
      bq = w.const(np.rint(k).astype(np.int8), "w_int")
      channels = k.shape[-1]
    else:
      bq = w.act_q(w.transpose(name(e.ins[1]), b_perm), layer.w_step, layer.w_bits, True, True)
      channels = 1
    acc = w.op("MatMulInteger", [aq, bq])
    return w.rescale(acc, layer.a_step, layer.w_step, (channels,))
  if layer is not None and layer.kind != "MatMul":
    a = w.act_qcdq(a, layer.a_step, layer.a_bits, layer.signed_input)
    k = np.transpose(np.asarray(layer.w_int), b_perm)
    b = w.weight_cdq(k, layer.w_step, layer.w_bits, axis=k.ndim - 1)
  else:
    b = w.transpose(name(e.ins[1]), b_perm)
    if layer is not None:
      a = w.act_qcdq(a, layer.a_step, layer.a_bits, layer.signed_input)
      b = w.weight_qcdq(b, layer.w_step, layer.w_bits)
  return w.op("MatMul", [a, b])


def _layer_quant(model: Any, variables: Any, policy: np.ndarray, specs: list[Any]) -> list[_LayerQ]:
  """cimjax's steps and integer weights of every layer at ``policy``."""
  from cimjax import models as models_lib

  x0 = jnp.zeros((1, *model.input_shape), jnp.float32)
  capture = jax.jit(lambda v, x, p: models_lib.forward(model.module, v, x, p, capture=True)[1])
  cim = jax.device_get(capture(variables, x0, jnp.asarray(policy))).get("cim", {})
  out = []
  for i, spec in enumerate(specs):
    node: Any = variables["params"]
    cap: Any = cim
    for part in spec.name.split("/"):
      node = node[part]
      cap = cap.get(part, {}) if isinstance(cap, dict) else {}
    wb, ab = int(policy[i, 0]), int(policy[i, 1])
    a_step = quant.step_size(
      quant.gather_clip(node["a_clip"], ab), ab, signed=spec.signed_input, narrow=False
    )
    w_step = quant.step_size(quant.gather_clip(node["w_clip"], wb), wb, signed=True, narrow=True)
    w_int = None
    if spec.kind != "MatMul":
      wi = cap.get("w_int") if isinstance(cap, dict) else None
      if wi is None:
        raise OnnxError(f"export: layer {i} ({spec.name}) captured no integer weights")
      w_int = np.asarray(wi[0] if isinstance(wi, tuple) else wi)
    out.append(
      _LayerQ(
        kind=spec.kind,
        w_bits=wb,
        a_bits=ab,
        signed_input=bool(spec.signed_input),
        a_step=np.asarray(a_step, np.float32),
        w_step=np.asarray(w_step, np.float32),
        w_int=w_int,
        kernel_path=f"params/{spec.name}/kernel",
      )
    )
  return out


def _leaf_names(variables: Any) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for path, _ in flat:
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    out.append("/".join(parts))
  return out


def export_qcdq(
  model: Any,
  variables: Any,
  policy: Any,
  path: str | os.PathLike[str] | None = None,
  *,
  dynamic_batch: bool = True,
  float_model: bool = False,
  integer: bool = False,
) -> Any:
  """Writes ``model`` with ``policy`` and ``variables`` as a QCDQ ONNX model.

  With ``integer=True`` each quantized product is written as integer ONNX instead
  (``QuantizeLinear`` -> ``Clip`` -> ``ConvInteger``/``MatMulInteger`` with the int8 weight
  codes -> ``Cast`` -> ``Mul`` by cimjax's scale product ``sx * sw``): onnxruntime accumulates
  in int32, exactly as cimjax's integer product, so only the float ops between the layers
  (normalisation, softmax, GELU, ...) can round differently. Such a file is not QCDQ and does
  not import back with its policy (:func:`import_qcdq` reads QCDQ).

  Args:
    model: a :class:`cimjax.models.ModelDef` (zoo or imported).
    variables: its variables (``{"params", ["batch_stats"]}``).
    policy: int ``[L, 2]`` (weight, activation bits), bits in ``2..8``.
    path: where to write the file (atomically), or None.
    dynamic_batch: a symbolic batch axis (else the graph is fixed at batch 1).
    float_model: write the float model (no Q/DQ; ``policy`` is ignored) instead.
    integer: integer products (``ConvInteger``/``MatMulInteger``) instead of QCDQ.

  Returns:
    The ``onnx.ModelProto`` (checked with ``onnx.checker``).

  Raises:
    OnnxError: a bad policy, bits above 8, or an operation without an ONNX translation.
  """
  from cimjax import models as models_lib
  from cimjax import policy as policy_lib
  from cimjax import trace

  specs = trace.trace_specs(model)
  if float_model:
    layers_q: list[_LayerQ] | None = None
  else:
    try:
      pol = policy_lib.validate_policy(
        policy, len(specs), min_bits=2, max_bits=8, layer_names=[s.name for s in specs]
      )
    except policy_lib.PolicyError as e:
      raise OnnxError(f"policy: {e}") from None
    layers_q = _layer_quant(model, variables, pol, specs)
  variables = jax.device_get(dict(variables))
  fn = lambda v, x: models_lib.forward(model.module, v, x)[0]  # noqa: E731
  batches = (2, 3) if dynamic_batch else (1, 1)
  traces = []
  for b in dict.fromkeys(batches):
    x = jax.ShapeDtypeStruct((b, *model.input_shape), jnp.float32)
    traces.append(_flatten(jax.make_jaxpr(fn)(variables, x)))
  invars, outs, eqns = traces[0]
  eqns2 = traces[-1][2]
  if [e.prim for e in eqns] != [e.prim for e in eqns2]:
    raise OnnxError("export: the forward pass differs between batch sizes; use dynamic_batch=False")
  w = _Writer(batches if dynamic_batch else None, integer=integer and not float_model)
  leaf_names = _leaf_names(variables)
  leaves = jax.tree_util.tree_leaves(variables)
  names: dict[int, str] = {}
  param_of = {id(var): (n, leaf) for var, n, leaf in zip(invars[:-1], leaf_names, leaves)}
  x_var = invars[-1]
  in_shape = tuple(int(d) for d in x_var.aval.shape)
  image = len(in_shape) == 4
  graph_in_shape: list[Any] = ["batch" if dynamic_batch else 1]
  graph_in_shape += [in_shape[3], in_shape[1], in_shape[2]] if image else list(in_shape[1:])
  names[id(x_var)] = w.transpose("input", (0, 2, 3, 1)) if image else "input"

  def name(a: Any) -> str:
    if isinstance(a, _Const):
      return w.const(a.value)
    key = id(a)
    if key in names:
      return names[key]
    if key in param_of:
      pname, leaf = param_of[key]
      names[key] = w.const(np.asarray(leaf), pname.replace("/", "."))
      return names[key]
    raise OnnxError(f"export: value {a} used before it is defined")

  k = 0
  n_products = sum(e.prim in _PRODUCTS for e in eqns)
  if layers_q is not None and n_products != len(layers_q):
    raise OnnxError(
      f"export: the forward pass has {n_products} matrix products but the model has "
      f"{len(layers_q)} quantized layers"
    )
  for e, e2 in zip(eqns, eqns2):
    layer = None
    if e.prim in _PRODUCTS:
      if layers_q is not None:
        layer = layers_q[k]
        if (layer.kind == "Conv2D") != (e.prim == "conv_general_dilated"):
          raise OnnxError(f"export: product {k} does not match layer {k} ({specs[k].name})")
        if layer.w_int is not None and _shape(e.ins[1]) != tuple(layer.w_int.shape):
          raise OnnxError(f"export: layer {k} ({specs[k].name}): the weight is not the rhs operand")
      k += 1
    outs_e = _emit(w, e, e2, name, layer)
    for v, o in zip(e.outs, outs_e):
      names[id(v)] = o
  out_name = name(outs[0])
  w.nodes.append(w.helper.make_node("Identity", [out_name], ["logits"], name="output"))
  out_shape = [("batch" if dynamic_batch else 1), *[int(d) for d in _shape(outs[0])[1:]]]
  h = w.helper
  graph = h.make_graph(
    w.nodes,
    model.name,
    [h.make_tensor_value_info("input", w.onnx.TensorProto.FLOAT, graph_in_shape)],
    [h.make_tensor_value_info("logits", w.onnx.TensorProto.FLOAT, out_shape)],
    initializer=w.inits,
  )
  proto = h.make_model(
    graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="cimjax", ir_version=9
  )
  if layers_q is not None:
    h.set_model_props(proto, {"cimjax.policy": str(np.asarray(pol).tolist())})
  try:
    w.onnx.checker.check_model(proto)
  except Exception as e:  # noqa: BLE001
    raise OnnxError(f"export: the written model does not pass onnx.checker: {e}") from None
  if path is not None:
    _write(Path(path), proto.SerializeToString())
  return proto


def _write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


__all__ = ["OPSET", "export_qcdq"]
