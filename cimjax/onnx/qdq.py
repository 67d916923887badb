"""QCDQ / QDQ chains in ONNX: reading their bit-widths and steps into cimjax terms.

A QCDQ operand (as Brevitas exports it) is::

  x (float) -> QuantizeLinear(scale, zp) -> [Clip(lo, hi)] -> DequantizeLinear(scale, zp)

or, for a weight stored as integers, ``int8 initializer -> [Clip] -> DequantizeLinear``; a
QONNX ``Quant(x, scale, zero_point, bitwidth)`` node is read the same way. The
integer range ``[lo, hi]`` (the Clip's, else the storage type's) gives the bit-width
``ceil(log2(hi - lo + 1))``: ``[-7, 7]`` and ``[-8, 7]`` are 4 bits, ``[0, 15]`` is 4 bits
unsigned. cimjax's quantizers (docs/architecture.md, section 3) are symmetric narrow signed for
weights, unsigned ``[0, 2^b-1]`` or two's complement ``[-2^(b-1), 2^(b-1)-1]`` for activations,
with zero point 0; a chain with that convention maps exactly (the cimjax clipping range is
chosen so that its step equals the file's scale to the last bit). Other zero points are mapped
approximately (the same step, cimjax's range).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cimjax.errors import OnnxError
from cimjax.onnx.graph import Node, QdqInfo
from cimjax.onnx.ops import int_limits


def find_chain(
  value: str, producer: Mapping[str, Node], consts: Mapping[str, np.ndarray]
) -> QdqInfo | None:
  """The QCDQ chain ending in ``value`` (a DequantizeLinear output), or None.

  Args:
    value: a value name (an operand of a quantized layer).
    producer: value name -> producing node (every node of the file, folded ones included).
    consts: constant values by name.
  """
  dq = producer.get(value)
  if dq is not None and dq.op == "Quant":
    return _qonnx_quant(dq, consts)
  if dq is None or dq.op != "DequantizeLinear":
    return None
  if dq.inputs[1] not in consts:
    return None
  scale = np.asarray(consts[dq.inputs[1]], np.float32)
  zp_name = dq.inputs[2] if len(dq.inputs) > 2 else ""
  q_val = dq.inputs[0]
  zp = consts.get(zp_name) if zp_name else None
  node = producer.get(q_val)
  lo = hi = None
  if node is not None and node.op == "Clip":
    lo_v = consts.get(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    hi_v = consts.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    lo = node.attrs.get("min") if lo_v is None else lo_v
    hi = node.attrs.get("max") if hi_v is None else hi_v
    q_val = node.inputs[0]
    node = producer.get(q_val)
  source: str | None
  if node is not None and node.op == "QuantizeLinear":
    source = node.inputs[0]
    if zp is None and len(node.inputs) > 2 and node.inputs[2] in consts:
      zp = consts[node.inputs[2]]
    if zp is None:
      zp = np.zeros((), np.uint8)
  elif q_val in consts and np.asarray(consts[q_val]).dtype.kind in "iu":
    source = None
    if zp is None:
      zp = np.zeros((), np.asarray(consts[q_val]).dtype)
  else:
    return None
  zp = np.asarray(zp)
  t_lo, t_hi = int_limits(zp.dtype)
  lo = t_lo if lo is None else max(t_lo, int(np.min(lo)))
  hi = t_hi if hi is None else min(t_hi, int(np.max(hi)))
  if hi <= lo:
    raise OnnxError(f"node {dq.name!r} (op DequantizeLinear): empty integer range [{lo}, {hi}]")
  bits = int(math.ceil(math.log2(hi - lo + 1)))
  z = float(np.max(zp)) if zp.size else 0.0
  axis = int(dq.attrs.get("axis", 1)) if scale.size > 1 else None
  return QdqInfo(
    bits=bits,
    signed=lo < z,
    lo=lo,
    hi=hi,
    scale=scale,
    zero_point=zp,
    axis=axis,
    source=source,
  )


def _qonnx_quant(node: Node, consts: Mapping[str, np.ndarray]) -> QdqInfo | None:
  """A QONNX ``Quant(x, scale, zero_point, bitwidth)`` node (signed, narrow attributes)."""
  if not all(i in consts for i in node.inputs[1:4]):
    return None
  scale = np.asarray(consts[node.inputs[1]], np.float32)
  zp = np.asarray(consts[node.inputs[2]])
  bits = int(round(float(np.asarray(consts[node.inputs[3]]).reshape(-1)[0])))
  signed = bool(node.attrs.get("signed", 1))
  narrow = bool(node.attrs.get("narrow", 0))
  if signed:
    lo, hi = -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
  else:
    lo, hi = 0, 2**bits - 1 - int(narrow)
  axis = None
  if scale.size > 1:
    big = [i for i, d in enumerate(scale.shape) if d > 1]
    axis = big[0] if len(big) == 1 else None
  src = node.inputs[0]
  return QdqInfo(
    bits=bits,
    signed=signed,
    lo=lo,
    hi=hi,
    scale=scale.reshape(-1) if axis is not None else scale,
    zero_point=zp,
    axis=axis,
    source=None if src in consts else src,
  )


def clip_for_step(step: Any, denom: float) -> np.ndarray:
  """The float32 clipping range ``c`` with ``float32(c / denom) == step`` (per element).

  cimjax derives its step as ``clip / denom``; choosing ``clip`` this way makes it equal the
  file's scale exactly, so the integer codes agree with onnxruntime's.
  """
  step = np.asarray(step, np.float32)
  d = np.float32(denom)
  c = (step * d).astype(np.float32)
  for _ in range(4):
    got = (c / d).astype(np.float32)
    c = np.where(got < step, np.nextafter(c, np.float32(np.inf)), c)
    c = np.where(got > step, np.nextafter(c, np.float32(-np.inf)), c)
  return c.astype(np.float32)


def act_denom(bits: int, signed: bool) -> float:
  """cimjax's activation step divisor: ``2^(b-1)`` signed, ``2^b - 1`` unsigned."""
  return float(2 ** (bits - 1)) if signed else float(2**bits - 1)


def weight_denom(bits: int) -> float:
  """cimjax's weight step divisor ``2^(b-1) - 1`` (bits >= 2)."""
  return float(max(2 ** (bits - 1) - 1, 1))


def act_clip_table(info: QdqInfo, signed: bool, rows: int) -> np.ndarray:
  """An ``[rows]`` activation clip table reproducing ``info``'s step at its bit-width (the same
  clipping range at every other bit-width)."""
  step = float(np.max(info.scale))
  c = clip_for_step(step, act_denom(info.bits, signed))
  return np.full((rows,), c, np.float32)


def weight_clip_table(info: QdqInfo, channels: int, rows: int) -> np.ndarray:
  """A ``[rows, channels]`` weight clip table reproducing ``info``'s step(s); ``channels`` 1 for
  a per-tensor table."""
  scale = np.asarray(info.scale, np.float32).reshape(-1)
  if scale.size not in (1, channels):
    scale = np.full((1,), scale.max(), np.float32)
  c = clip_for_step(scale, weight_denom(info.bits))
  return np.broadcast_to(c, (rows, channels)).astype(np.float32)
