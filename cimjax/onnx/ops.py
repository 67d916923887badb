"""The float ONNX operators, in JAX (traced values) and NumPy (constants folded at import).

Each operator is a function ``fn(rt, node, args) -> outputs`` where ``args`` holds one value per
node input (None for an omitted optional input). A value is a ``np.ndarray`` when it is known
at trace time (initializers, ``Constant``, shape arithmetic: ``Shape`` of a traced tensor is
static) and a ``jax.Array`` otherwise; an operator whose inputs are all static computes in NumPy,
so shape computations stay static and batch-polymorphic. Quantized layers (Conv, Gemm, MatMul)
and BatchNormalization are in :mod:`cimjax.onnx.module`.

Only primitives that :mod:`cimjax.onnx.export` can write back are used (for example a Gather
with a constant scalar index is a slice, not a ``gather``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.errors import OnnxError
from cimjax.onnx.graph import Node

Value = Any  # np.ndarray | jax.Array
OpFn = Callable[[Any, Node, list[Value]], list[Value]]
OPS: dict[str, OpFn] = {}


def register(*names: str) -> Callable[[OpFn], OpFn]:
  def deco(fn: OpFn) -> OpFn:
    for n in names:
      OPS[n] = fn
    return fn

  return deco


def is_static(v: Any) -> bool:
  return v is None or isinstance(v, (np.ndarray, np.generic))


def xp_of(*vals: Any) -> Any:
  """NumPy when every value is static, else jax.numpy."""
  return np if all(is_static(v) for v in vals) else jnp


def static(v: Any, what: str, node: Node) -> np.ndarray:
  if not is_static(v):
    raise OnnxError(f"node {node.name!r} (op {node.op}): {what} must be a constant")
  return np.asarray(v)


def _np_dtype(to: int) -> np.dtype:
  import onnx

  return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))


def jdtype(dt: Any) -> Any:
  """The JAX dtype for a NumPy dtype (64-bit types as 32-bit ones without x64)."""
  dt = np.dtype(dt)
  if dt == np.int64:
    return jnp.int32
  if dt == np.uint64:
    return jnp.uint32
  if dt == np.float64:
    return jnp.float32
  return dt


def astype(v: Value, dt: Any) -> Value:
  if is_static(v):
    return np.asarray(v).astype(dt)
  return v.astype(jdtype(dt))


def _axis(a: int, ndim: int) -> int:
  return a + ndim if a < 0 else a


def _ints(v: Any) -> list[int]:
  return [int(i) for i in np.asarray(v).reshape(-1)]


# ----------------------------------------------------------------------------------------------
# Elementwise


def _binary(fn_np: Callable, fn_j: Callable) -> OpFn:
  def run(rt, node, args):
    a, b = args[0], args[1]
    if is_static(a) and is_static(b):
      out = fn_np(np.asarray(a), np.asarray(b))
      if isinstance(a, np.ndarray) and np.asarray(out).dtype != a.dtype and a.dtype.kind == "f":
        out = np.asarray(out).astype(a.dtype)
      return [np.asarray(out)]
    return [fn_j(a, b)]

  return run


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  if a.dtype.kind in "iu" and b.dtype.kind in "iu":
    q = np.abs(a) // np.abs(b)
    return (np.sign(a) * np.sign(b) * q).astype(a.dtype)
  return a / b


def _jdiv(a, b):
  if jnp.issubdtype(jnp.result_type(a, b), jnp.integer):
    return jax.lax.div(jnp.asarray(a), jnp.asarray(b))  # truncates, as ONNX
  return a / b


OPS["Add"] = _binary(np.add, lambda a, b: a + b)
OPS["Sub"] = _binary(np.subtract, lambda a, b: a - b)
OPS["Mul"] = _binary(np.multiply, lambda a, b: a * b)
OPS["Div"] = _binary(_int_div, _jdiv)
OPS["Equal"] = _binary(np.equal, jnp.equal)
OPS["Less"] = _binary(np.less, jnp.less)
OPS["LessOrEqual"] = _binary(np.less_equal, jnp.less_equal)
OPS["Greater"] = _binary(np.greater, jnp.greater)
OPS["GreaterOrEqual"] = _binary(np.greater_equal, jnp.greater_equal)
OPS["And"] = _binary(np.logical_and, jnp.logical_and)
OPS["Or"] = _binary(np.logical_or, jnp.logical_or)
OPS["Xor"] = _binary(np.logical_xor, jnp.logical_xor)


@register("Pow")
def _pow(rt, node, args):
  x, e = args
  xp = xp_of(x, e)
  if is_static(e) and np.size(e) == 1:
    ev = float(np.asarray(e).reshape(()))
    if ev.is_integer() and abs(ev) <= 8 and xp is jnp:
      return [jax.lax.integer_pow(x, int(ev))]
    if ev == 0.5 and xp is jnp:
      return [jnp.sqrt(x)]
  out = xp.power(x, astype(e, np.asarray(x).dtype) if is_static(x) else e)
  return [out]


@register("Mod")
def _mod(rt, node, args):
  a, b = args
  xp = xp_of(a, b)
  fn = xp.fmod if node.attrs.get("fmod", 0) else xp.mod
  return [fn(a, b)]


def _variadic(fn_name: str) -> OpFn:
  def run(rt, node, args):
    vals = [a for a in args if a is not None]
    xp = xp_of(*vals)
    out = vals[0]
    for v in vals[1:]:
      out = getattr(xp, fn_name)(out, v)
    if node.op == "Mean":
      out = out / len(vals)
    return [out]

  return run


OPS["Max"] = _variadic("maximum")
OPS["Min"] = _variadic("minimum")
OPS["Sum"] = _variadic("add")
OPS["Mean"] = _variadic("add")


@register("Where")
def _where(rt, node, args):
  c, a, b = args
  return [xp_of(c, a, b).where(c, a, b)]


@register("Not")
def _not(rt, node, args):
  return [xp_of(args[0]).logical_not(args[0])]


def _erf_np(x: np.ndarray) -> np.ndarray:
  return np.vectorize(math.erf, otypes=[x.dtype])(x)


_UNARY_J: dict[str, Callable] = {
  "Relu": jax.nn.relu,
  "Sigmoid": jax.nn.sigmoid,
  "Tanh": jnp.tanh,
  "Exp": jnp.exp,
  "Log": jnp.log,
  "Sqrt": jnp.sqrt,
  "Abs": jnp.abs,
  "Neg": jnp.negative,
  "Reciprocal": lambda x: 1.0 / x,
  "Floor": jnp.floor,
  "Ceil": jnp.ceil,
  "Round": jnp.round,
  "Sign": jnp.sign,
  "Erf": jax.lax.erf,
  "Softplus": lambda x: jnp.logaddexp(x, 0.0),
  "Sin": jnp.sin,
  "Cos": jnp.cos,
}
_UNARY_NP: dict[str, Callable] = {
  "Relu": lambda x: np.maximum(x, 0).astype(x.dtype),
  "Sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype),
  "Tanh": np.tanh,
  "Exp": np.exp,
  "Log": np.log,
  "Sqrt": np.sqrt,
  "Abs": np.abs,
  "Neg": np.negative,
  "Reciprocal": lambda x: (1.0 / x).astype(x.dtype),
  "Floor": np.floor,
  "Ceil": np.ceil,
  "Round": np.round,
  "Sign": np.sign,
  "Erf": _erf_np,
  "Softplus": lambda x: np.logaddexp(x, 0.0).astype(x.dtype),
  "Sin": np.sin,
  "Cos": np.cos,
}


def _unary(rt, node, args):
  x = args[0]
  if is_static(x):
    return [np.asarray(_UNARY_NP[node.op](np.asarray(x)))]
  return [_UNARY_J[node.op](x)]


for _name in _UNARY_J:
  OPS[_name] = _unary


@register("Identity", "Dropout")
def _identity(rt, node, args):
  x = args[0]
  outs = [x]
  if len(node.outputs) > 1:  # Dropout's mask: all kept (inference)
    outs.append(np.ones(np.shape(x), bool))
  return outs


@register("LeakyRelu")
def _leaky_relu(rt, node, args):
  alpha = float(node.attrs.get("alpha", 0.01))
  x = args[0]
  xp = xp_of(x)
  return [xp.maximum(x, 0) + alpha * xp.minimum(x, 0)]


@register("PRelu")
def _prelu(rt, node, args):
  x, slope = args
  xp = xp_of(x, slope)
  return [xp.maximum(x, 0) + slope * xp.minimum(x, 0)]


@register("Elu")
def _elu(rt, node, args):
  alpha = float(node.attrs.get("alpha", 1.0))
  x = args[0]
  xp = xp_of(x)
  return [xp.maximum(x, 0) + alpha * (xp.exp(xp.minimum(x, 0)) - 1)]


@register("HardSigmoid")
def _hard_sigmoid(rt, node, args):
  a, b = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
  x = args[0]
  return [xp_of(x).clip(a * x + b, 0.0, 1.0)]


@register("HardSwish")
def _hard_swish(rt, node, args):
  x = args[0]
  return [x * xp_of(x).clip(x / 6.0 + 0.5, 0.0, 1.0)]


@register("Gelu")
def _gelu(rt, node, args):
  x = args[0]
  approx = node.attrs.get("approximate", "none")
  if isinstance(approx, bytes):
    approx = approx.decode()
  if is_static(x):
    x = np.asarray(x)
    return [(0.5 * x * (1 + _erf_np(x / np.sqrt(2)))).astype(x.dtype)]
  return [jax.nn.gelu(x, approximate=approx == "tanh")]


@register("Clip")
def _clip(rt, node, args):
  x = args[0]
  if rt is not None and rt.opset < 11:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
  else:
    lo = args[1] if len(args) > 1 else None
    hi = args[2] if len(args) > 2 else None
  xp = xp_of(x, lo, hi)
  if lo is not None:
    x = xp.maximum(x, astype(lo, np.asarray(x).dtype) if is_static(x) else lo)
  if hi is not None:
    x = xp.minimum(x, astype(hi, np.asarray(x).dtype) if is_static(x) else hi)
  return [x]


@register("Cast")
def _cast(rt, node, args):
  return [astype(args[0], _np_dtype(node.attrs["to"]))]


@register("CastLike")
def _cast_like(rt, node, args):
  return [astype(args[0], np.asarray(args[1]).dtype if is_static(args[1]) else args[1].dtype)]


# ----------------------------------------------------------------------------------------------
# Constants and shapes


@register("Constant")
def _constant(rt, node, args):
  a = node.attrs
  if "value" in a:
    return [np.asarray(a["value"])]
  for k, dt in (("value_float", np.float32), ("value_int", np.int64)):
    if k in a:
      return [np.asarray(a[k], dt)]
  for k, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
    if k in a:
      return [np.asarray(list(a[k]), dt)]
  raise OnnxError(f"node {node.name!r} (op Constant): unsupported value attribute {sorted(a)}")


@register("ConstantOfShape")
def _constant_of_shape(rt, node, args):
  shape = _ints(static(args[0], "the shape", node))
  val = node.attrs.get("value")
  val = np.zeros(1, np.float32) if val is None else np.asarray(val).reshape(-1)
  return [np.full(shape, val[0], val.dtype)]


@register("Shape")
def _shape(rt, node, args):
  shape = list(np.shape(args[0]))
  start = int(node.attrs.get("start", 0))
  end = node.attrs.get("end")
  return [np.asarray(shape[start : None if end is None else int(end)], np.int64)]


@register("Size")
def _size(rt, node, args):
  return [np.asarray(int(np.prod(np.shape(args[0]))), np.int64)]


@register("Range")
def _range(rt, node, args):
  start, limit, delta = (static(a, "Range's inputs", node) for a in args)
  return [np.arange(start, limit, delta).astype(np.asarray(start).dtype)]


@register("Reshape")
def _reshape(rt, node, args):
  x, shape = args[0], _ints(static(args[1], "the target shape", node))
  allowzero = int(node.attrs.get("allowzero", 0))
  in_shape = np.shape(x)
  target = [in_shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
  return [xp_of(x).reshape(x, target)]


@register("Flatten")
def _flatten(rt, node, args):
  x = args[0]
  shape = np.shape(x)
  axis = _axis(int(node.attrs.get("axis", 1)), len(shape))
  outer = int(np.prod(shape[:axis]))
  return [xp_of(x).reshape(x, (outer, -1 if outer else int(np.prod(shape[axis:]))))]


@register("Transpose")
def _transpose(rt, node, args):
  x = args[0]
  perm = node.attrs.get("perm")
  perm = tuple(reversed(range(np.ndim(x)))) if perm is None else tuple(int(p) for p in perm)
  return [xp_of(x).transpose(x, perm)]


def _axes_arg(rt, node, args, idx: int = 1) -> list[int] | None:
  if len(args) > idx and args[idx] is not None:
    return _ints(static(args[idx], "axes", node))
  axes = node.attrs.get("axes")
  return None if axes is None else [int(a) for a in axes]


@register("Squeeze")
def _squeeze(rt, node, args):
  x = args[0]
  axes = _axes_arg(rt, node, args)
  shape = np.shape(x)
  if axes is None:
    axes = [i for i, d in enumerate(shape) if d == 1]
  axes = tuple(sorted(_axis(a, len(shape)) for a in axes))
  return [xp_of(x).squeeze(x, axis=axes) if axes else x]


@register("Unsqueeze")
def _unsqueeze(rt, node, args):
  x = args[0]
  axes = _axes_arg(rt, node, args)
  if axes is None:
    raise OnnxError(f"node {node.name!r} (op Unsqueeze): no axes")
  rank = np.ndim(x) + len(axes)
  shape = list(np.shape(x))
  for a in sorted(_axis(a, rank) for a in axes):
    shape.insert(a, 1)
  return [xp_of(x).reshape(x, shape)]


@register("Concat")
def _concat(rt, node, args):
  vals = [a for a in args if a is not None]
  axis = int(node.attrs["axis"])
  xp = xp_of(*vals)
  if xp is jnp:
    dt = jnp.result_type(*[v.dtype for v in vals])
    vals = [jnp.asarray(v, dt) for v in vals]
  return [xp.concatenate(vals, axis=_axis(axis, np.ndim(vals[0])))]


@register("Split")
def _split(rt, node, args):
  x = args[0]
  axis = _axis(int(node.attrs.get("axis", 0)), np.ndim(x))
  dim = np.shape(x)[axis]
  sizes = None
  if len(args) > 1 and args[1] is not None:
    sizes = _ints(static(args[1], "split", node))
  elif "split" in node.attrs:
    sizes = [int(s) for s in node.attrs["split"]]
  n = len(node.outputs)
  if sizes is None:
    step = -(-dim // n)
    sizes = [min(step, dim - i * step) for i in range(n)]
  xp = xp_of(x)
  outs, start = [], 0
  for s in sizes:
    idx = [slice(None)] * np.ndim(x)
    idx[axis] = slice(start, start + s)
    outs.append(x[tuple(idx)] if xp is np else jax.lax.slice_in_dim(x, start, start + s, 1, axis))
    start += s
  return outs


@register("Slice")
def _slice(rt, node, args):
  x = args[0]
  if rt is not None and rt.opset < 10:
    starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
    axes = list(node.attrs.get("axes", range(len(starts))))
    steps = [1] * len(starts)
  else:
    starts = _ints(static(args[1], "starts", node))
    ends = _ints(static(args[2], "ends", node))
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
  idx = [slice(None)] * np.ndim(x)
  for s, e, a, st in zip(starts, ends, axes, steps):
    big = 2**62
    e = None if (st > 0 and e >= big) or (st < 0 and e <= -big) else e
    idx[_axis(int(a), np.ndim(x))] = slice(int(s), e, int(st))
  return [x[tuple(idx)]]


@register("Gather")
def _gather(rt, node, args):
  x, idx = args
  axis = _axis(int(node.attrs.get("axis", 0)), np.ndim(x))
  if is_static(x) and is_static(idx):
    return [np.take(np.asarray(x), np.asarray(idx).astype(np.int64), axis=axis)]
  if not is_static(idx):
    return [jnp.take(x, idx, axis=axis)]
  dim = np.shape(x)[axis]
  ind = np.asarray(idx).astype(np.int64)
  ind = np.where(ind < 0, ind + dim, ind)
  if ind.ndim == 0:
    return [jax.lax.index_in_dim(x, int(ind), axis, keepdims=False)]
  flat = ind.reshape(-1)
  if flat.size and np.all(np.diff(flat) == 1):
    part = jax.lax.slice_in_dim(x, int(flat[0]), int(flat[-1]) + 1, 1, axis)
  else:
    part = jnp.concatenate(
      [jax.lax.slice_in_dim(x, int(i), int(i) + 1, 1, axis) for i in flat], axis
    )
  shape = list(np.shape(x))
  shape[axis : axis + 1] = list(ind.shape)
  return [part.reshape(shape)]


@register("Expand")
def _expand(rt, node, args):
  x, shape = args[0], _ints(static(args[1], "the shape", node))
  out = np.broadcast_shapes(np.shape(x), tuple(shape))
  return [xp_of(x).broadcast_to(x, out)]


@register("Tile")
def _tile(rt, node, args):
  x, reps = args[0], _ints(static(args[1], "repeats", node))
  return [xp_of(x).tile(x, reps)]


@register("Pad")
def _pad(rt, node, args):
  x = args[0]
  mode = node.attrs.get("mode", "constant")
  mode = mode.decode() if isinstance(mode, bytes) else mode
  if mode != "constant":
    raise OnnxError(f"node {node.name!r} (op Pad): mode {mode!r} unsupported (constant only)")
  if rt is not None and rt.opset < 11:
    pads, value = list(node.attrs["pads"]), float(node.attrs.get("value", 0.0))
  else:
    pads = _ints(static(args[1], "pads", node))
    value = 0.0
    if len(args) > 2 and args[2] is not None and np.size(args[2]):
      value = float(static(args[2], "the pad value", node).reshape(-1)[0])
  rank = np.ndim(x)
  axes = list(range(rank))
  if len(args) > 3 and args[3] is not None:
    axes = [_axis(a, rank) for a in _ints(args[3])]
  k = len(axes)
  width = [(0, 0)] * rank
  for j, a in enumerate(axes):
    width[a] = (pads[j], pads[j + k])
  if any(lo < 0 or hi < 0 for lo, hi in width):
    raise OnnxError(f"node {node.name!r} (op Pad): negative pads unsupported")
  return [xp_of(x).pad(x, width, constant_values=value)]


# ----------------------------------------------------------------------------------------------
# Reductions, normalisation, softmax


def _reduce_axes(rt, node, args, ndim: int, axes_input_from: int) -> tuple[int, ...]:
  axes = None
  if rt is None or rt.opset >= axes_input_from:
    if len(args) > 1 and args[1] is not None:
      axes = _ints(static(args[1], "axes", node))
  if axes is None and "axes" in node.attrs:
    axes = [int(a) for a in node.attrs["axes"]]
  if not axes:
    if node.attrs.get("noop_with_empty_axes", 0):
      return ()
    return tuple(range(ndim))
  return tuple(sorted(_axis(a, ndim) for a in axes))


def _reduce(fn_name: str, axes_input_from: int) -> OpFn:
  def run(rt, node, args):
    x = args[0]
    axes = _reduce_axes(rt, node, args, np.ndim(x), axes_input_from)
    if not axes:
      return [x]
    keep = bool(node.attrs.get("keepdims", 1))
    xp = xp_of(x)
    if fn_name == "l2":
      return [xp.sqrt(xp.sum(x * x, axis=axes, keepdims=keep))]
    return [getattr(xp, fn_name)(x, axis=axes, keepdims=keep)]

  return run


OPS["ReduceMean"] = _reduce("mean", 18)
OPS["ReduceSum"] = _reduce("sum", 13)
OPS["ReduceMax"] = _reduce("max", 18)
OPS["ReduceMin"] = _reduce("min", 18)
OPS["ReduceProd"] = _reduce("prod", 18)
OPS["ReduceL2"] = _reduce("l2", 18)


@register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(rt, node, args):
  x = args[0]
  axes = tuple(range(2, np.ndim(x)))
  xp = xp_of(x)
  fn = xp.mean if node.op == "GlobalAveragePool" else xp.max
  return [fn(x, axis=axes, keepdims=True)]


def _softmax_like(log: bool) -> OpFn:
  def run(rt, node, args):
    x = args[0]
    ndim = np.ndim(x)
    opset = 13 if rt is None else rt.opset
    axis = _axis(int(node.attrs.get("axis", -1 if opset >= 13 else 1)), ndim)
    fn = jax.nn.log_softmax if log else jax.nn.softmax
    if is_static(x):
      x = jnp.asarray(x)
    if opset >= 13 or axis == ndim - 1:
      out = fn(x, axis=axis)
    else:  # opset < 13: softmax over the flattened trailing dimensions
      shape = x.shape
      out = fn(x.reshape(int(np.prod(shape[:axis])), -1), axis=-1).reshape(shape)
    return [out]

  return run


OPS["Softmax"] = _softmax_like(False)
OPS["LogSoftmax"] = _softmax_like(True)


@register("LayerNormalization")
def _layer_norm(rt, node, args):
  x, scale = args[0], args[1]
  bias = args[2] if len(args) > 2 else None
  eps = float(node.attrs.get("epsilon", 1e-5))
  axis = _axis(int(node.attrs.get("axis", -1)), np.ndim(x))
  axes = tuple(range(axis, np.ndim(x)))
  xp = xp_of(x, scale, bias)
  mean = xp.mean(x, axis=axes, keepdims=True)
  d = x - mean
  var = xp.mean(d * d, axis=axes, keepdims=True)
  inv = jax.lax.rsqrt(var + eps) if xp is jnp else 1.0 / np.sqrt(var + eps)
  y = d * inv * scale
  if bias is not None:
    y = y + bias
  if len(node.outputs) > 1 and node.outputs[1]:
    raise OnnxError(f"node {node.name!r} (op LayerNormalization): Mean/InvStdDev outputs unused")
  return [y]


# ----------------------------------------------------------------------------------------------
# Pooling


def explicit_pads(
  node: Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
  """``[(begin, end)]`` per spatial axis from ``pads`` / ``auto_pad`` (before ceil-mode)."""
  n = len(spatial)
  auto = node.attrs.get("auto_pad", "NOTSET")
  auto = auto.decode() if isinstance(auto, bytes) else auto
  if auto in ("SAME_UPPER", "SAME_LOWER"):
    out = []
    for d, k, s in zip(spatial, kernel, strides):
      o = -(-d // s)
      total = max(0, (o - 1) * s + k - d)
      small = total // 2
      out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
    return out
  if auto == "VALID":
    return [(0, 0)] * n
  pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * n))]
  return [(pads[i], pads[i + n]) for i in range(n)]


def _pool_geometry(node: Node, x_shape: Sequence[int]) -> tuple[list, list, list, list]:
  """kernel, strides, explicit pads and the ceil-mode extra end padding of a pooling node."""
  spatial = list(x_shape[2:])
  kernel = [int(k) for k in node.attrs["kernel_shape"]]
  strides = [int(s) for s in node.attrs.get("strides", [1] * len(kernel))]
  dil = [int(d) for d in node.attrs.get("dilations", [1] * len(kernel))]
  if any(d != 1 for d in dil):
    raise OnnxError(f"node {node.name!r} (op {node.op}): dilations {dil} unsupported")
  pads = explicit_pads(node, spatial, kernel, strides)
  extra = [0] * len(kernel)
  if node.attrs.get("ceil_mode", 0):
    for i, (d, k, s, (pb, pe)) in enumerate(zip(spatial, kernel, strides, pads)):
      o = -(-(d + pb + pe - k) // s) + 1
      if (o - 1) * s >= d + pb:
        o -= 1
      extra[i] = max(0, (o - 1) * s + k - (d + pb + pe))
  return kernel, strides, pads, extra


@register("MaxPool")
def _max_pool(rt, node, args):
  x = args[0]
  if len(node.outputs) > 1 and node.outputs[1]:
    raise OnnxError(f"node {node.name!r} (op MaxPool): the Indices output is unsupported")
  kernel, strides, pads, extra = _pool_geometry(node, np.shape(x))
  padding = [(0, 0), (0, 0)] + [(pb, pe + e) for (pb, pe), e in zip(pads, extra)]
  x = jnp.asarray(x)
  # A Python scalar init keeps this the differentiable reduce_window_max primitive.
  init = -np.inf if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
  out = jax.lax.reduce_window(x, init, jax.lax.max, (1, 1, *kernel), (1, 1, *strides), padding)
  return [out]


@register("AveragePool")
def _avg_pool(rt, node, args):
  x = jnp.asarray(args[0])
  kernel, strides, pads, extra = _pool_geometry(node, x.shape)
  padding = [(0, 0), (0, 0)] + [(pb, pe + e) for (pb, pe), e in zip(pads, extra)]
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, *kernel), (1, 1, *strides), padding)
  # Divisor per output position, computed in NumPy (static): kernel cells inside the input, plus
  # the explicit padding when count_include_pad (never the ceil-mode overhang).
  include = bool(node.attrs.get("count_include_pad", 0))
  spatial = x.shape[2:]
  mask = np.ones(spatial, np.float32)
  mask = np.pad(mask, [(pb, pe) for pb, pe in pads], constant_values=1.0 if include else 0.0)
  mask = np.pad(mask, [(0, e) for e in extra], constant_values=0.0)
  win = np.lib.stride_tricks.sliding_window_view(mask, kernel)
  win = win[tuple(slice(None, None, s) for s in strides)]
  count = win.sum(axis=tuple(range(-len(kernel), 0)))
  count = count[tuple(slice(0, n) for n in total.shape[2:])]
  if np.all(count == count.reshape(-1)[0]):
    return [total / float(count.reshape(-1)[0])]
  return [total / count.astype(np.float32)]


# ----------------------------------------------------------------------------------------------
# Float (de)quantization of values that do not feed a quantized layer


def _bcast_axis(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
  v = np.asarray(v)
  if v.ndim == 0 or v.size == 1:
    return v.reshape(())
  shape = [1] * ndim
  shape[_axis(axis, ndim)] = v.size
  return v.reshape(shape)


def int_limits(dtype: np.dtype) -> tuple[int, int]:
  """The integer range of an ONNX storage type."""
  dt = np.dtype(dtype)
  if dt.kind in "iu":
    info = np.iinfo(dt)
    return int(info.min), int(info.max)
  name = dt.name
  if name in ("int4",):
    return -8, 7
  if name in ("uint4",):
    return 0, 15
  raise OnnxError(f"unsupported quantized type {name}")


@register("QuantizeLinear")
def _quantize_linear(rt, node, args):
  x, scale = args[0], static(args[1], "the scale", node)
  zp = args[2] if len(args) > 2 and args[2] is not None else np.zeros((), np.uint8)
  zp = static(zp, "the zero point", node)
  lo, hi = int_limits(zp.dtype)
  axis = int(node.attrs.get("axis", 1))
  ndim = np.ndim(x)
  s = _bcast_axis(scale, axis, ndim).astype(np.float32)
  z = _bcast_axis(zp, axis, ndim).astype(np.float32)
  xp = xp_of(x)
  if xp is np:
    q = np.clip(np.round(np.asarray(x, np.float32) / s) + z, lo, hi)
    return [q.astype(zp.dtype)]
  from cimjax import quant

  return [jnp.clip(quant.ste_round(x / s) + z, lo, hi)]  # float32 codes (gradients pass)


@register("DequantizeLinear")
def _dequantize_linear(rt, node, args):
  q, scale = args[0], static(args[1], "the scale", node)
  zp = args[2] if len(args) > 2 and args[2] is not None else np.zeros((), np.int32)
  zp = static(zp, "the zero point", node)
  axis = int(node.attrs.get("axis", 1))
  ndim = np.ndim(q)
  s = _bcast_axis(scale, axis, ndim).astype(np.float32)
  z = _bcast_axis(zp, axis, ndim).astype(np.float32)
  if is_static(q):
    return [((np.asarray(q).astype(np.float32) - z) * s).astype(np.float32)]
  return [(q.astype(jnp.float32) - z) * s]


@register("Quant")
def _qonnx_quant(rt, node, args):
  """QONNX ``Quant`` (x, scale, zero_point, bitwidth): float fake quantization."""
  x = args[0]
  scale, zp, bits = (static(a, "Quant's parameters", node) for a in args[1:4])
  signed = bool(node.attrs.get("signed", 1))
  narrow = bool(node.attrs.get("narrow", 0))
  b = float(np.asarray(bits).reshape(-1)[0])
  if signed:
    lo, hi = -(2 ** (b - 1)) + (1 if narrow else 0), 2 ** (b - 1) - 1
  else:
    lo, hi = 0.0, 2**b - 1 - (1 if narrow else 0)
  xp = xp_of(x)
  if xp is np:
    q = np.clip(np.round(x / scale + zp), lo, hi)
  else:
    from cimjax import quant

    q = jnp.clip(quant.ste_round(x / scale + zp), lo, hi)
  return [(q - zp) * scale]


SUPPORTED_FLOAT_OPS = tuple(sorted(OPS))
