"""The imported model: a Flax module that interprets an :class:`~cimjax.onnx.graph.OnnxGraph`.

``OnnxModule.__call__(x, ctx)`` takes NHWC images as every cimjax model does (transposed to the
file's NCHW inside), runs the graph's nodes in call order and returns the logits. Conv, Gemm and
MatMul-with-a-constant-weight run as :class:`cimjax.layers.QuantConv` / ``QuantDense``; a MatMul
of two activations as ``QuantMatMul``; they claim the policy rows and record their LayerSpec in
that order. Everything else runs as float ``jnp`` code (:mod:`cimjax.onnx.ops`).

Parameters are the file's initializers: every layer's ``kernel`` and ``bias`` (a Conv kernel
OIHW becomes HWIO, a Gemm ``B`` with ``transB`` becomes ``[in, out]``, ``alpha``/``beta`` folded
in), batch norms' ``scale``/``bias`` with ``batch_stats`` ``mean``/``var``, and every other float
initializer of more than one element that a float op uses (named after it, e.g.
``pos_embedding``). ``module.init`` returns exactly those values; clip tables start as the zoo's
(``max |w|`` per channel, 6.0 unsigned / 3.0 signed activations) or, in a QCDQ file, at the
file's steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cimjax.errors import CimjaxError, OnnxError
from cimjax.layers import QuantContext, QuantConv, QuantDense, QuantMatMul
from cimjax.onnx import ops as ops_lib
from cimjax.onnx.graph import Layer, Node, OnnxGraph

Array = jax.Array


class Inits:
  """Initial values of one module's parameters ``{name: np.ndarray}``, hashed by identity."""

  def __init__(self, arrays: dict[str, np.ndarray]) -> None:
    self.arrays = arrays

  def __hash__(self) -> int:
    return id(self)

  def __eq__(self, other: object) -> bool:
    return self is other

  def __repr__(self) -> str:
    return f"Inits({sorted(self.arrays)})"


def _from_file(module: nn.Module, name: str, init_fn: Callable, args: tuple, kw: dict) -> Any:
  inits = getattr(module, "inits", None)
  if inits is not None and name in inits.arrays:
    arr = inits.arrays[name]
    return nn.Module.param(module, name, lambda *_: jnp.asarray(arr))
  return nn.Module.param(module, name, init_fn, *args, **kw)


class OnnxQuantConv(QuantConv):
  """:class:`QuantConv` whose parameters start at the file's values (``inits``)."""

  inits: Inits | None = None

  def param(self, name: str, init_fn: Callable, *args: Any, **kw: Any) -> Any:  # noqa: D102
    return _from_file(self, name, init_fn, args, kw)


class OnnxQuantDense(QuantDense):
  """:class:`QuantDense` whose parameters start at the file's values (``inits``)."""

  inits: Inits | None = None

  def param(self, name: str, init_fn: Callable, *args: Any, **kw: Any) -> Any:  # noqa: D102
    return _from_file(self, name, init_fn, args, kw)


class OnnxQuantMatMul(QuantMatMul):
  """:class:`QuantMatMul` whose clip tables may start at a QCDQ file's steps (``inits``)."""

  inits: Inits | None = None

  def param(self, name: str, init_fn: Callable, *args: Any, **kw: Any) -> Any:  # noqa: D102
    return _from_file(self, name, init_fn, args, kw)


class OnnxBatchNorm(nn.Module):
  """ONNX BatchNormalization (channel axis 1) with running statistics in ``batch_stats``.

  Inference uses the running statistics; with ``ctx.train`` the batch statistics normalise and
  the running ones move by ``momentum`` (as :class:`flax.linen.BatchNorm` does).

  Attributes:
    inits: ``scale``, ``bias``, ``mean``, ``var`` from the file.
    epsilon, momentum: the node's attributes.
  """

  inits: Inits
  epsilon: float = 1e-5
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Args: x ``[B, C, ...]``. Returns the normalised ``[B, C, ...]``."""
    a = self.inits.arrays
    scale = self.param("scale", lambda _: jnp.asarray(a["scale"], jnp.float32))
    bias = self.param("bias", lambda _: jnp.asarray(a["bias"], jnp.float32))
    mean = self.variable("batch_stats", "mean", lambda: jnp.asarray(a["mean"], jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.asarray(a["var"], jnp.float32))
    axes = (0, *range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if train:
      m = jnp.mean(x, axis=axes)
      v = jnp.mean(jnp.square(x - m.reshape(shape)), axis=axes)
      if not self.is_initializing():
        mean.value = self.momentum * mean.value + (1.0 - self.momentum) * m
        var.value = self.momentum * var.value + (1.0 - self.momentum) * v
    else:
      m, v = mean.value, var.value
    inv = jax.lax.rsqrt(v + self.epsilon) * scale
    return (x - m.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


@dataclasses.dataclass
class _Runtime:
  """State of one interpretation of the graph."""

  module: OnnxModule
  ctx: QuantContext
  graph: OnnxGraph
  batch: int
  opset: int
  params: dict[str, Array] = dataclasses.field(default_factory=dict)

  def value(self, env: dict[str, Any], name: str) -> Any:
    if not name:
      return None
    if name in env:
      return env[name]
    g = self.graph
    if name in g.params:
      pname = g.params[name]
      if pname not in self.params:
        arr = g.consts[name]
        self.params[pname] = self.module.param(pname, lambda _: jnp.asarray(arr))
      return self.params[pname]
    if name in g.consts:
      return g.consts[name]
    raise OnnxError(f"value {name!r} is used before it is computed")


class OnnxModule(nn.Module):
  """A model imported from ONNX (see the module docstring).

  Attributes:
    graph: the imported graph (:func:`cimjax.onnx.import_model` builds it).
  """

  graph: OnnxGraph

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext) -> Array:
    """Args: x ``[B, H, W, C]`` (NHWC; or the file's layout for non-image inputs).

    Returns:
      The graph's output (logits ``[B, classes]``).
    """
    g = self.graph
    rt = _Runtime(self, ctx, g, batch=int(x.shape[0]), opset=g.opset)
    env: dict[str, Any] = {}
    if x.ndim == 4 and len(g.input_shape) == 4:
      x = jnp.transpose(x, (0, 3, 1, 2))
    env[g.input] = x
    for node in g.nodes:
      try:
        if node.name in g.layers:
          outs = [_run_layer(rt, env, node, g.layers[node.name])]
        elif node.op == "BatchNormalization":
          outs = [_run_bn(rt, env, node)]
        else:
          args = [rt.value(env, i) for i in node.inputs]
          outs = ops_lib.OPS[node.op](rt, node, args)
      except CimjaxError:
        raise
      except (TypeError, ValueError, IndexError, KeyError) as e:
        raise OnnxError(f"node {node.name!r} (op {node.op}): {type(e).__name__}: {e}") from e
      env.update(zip(node.outputs, outs))
    return jnp.asarray(rt.value(env, g.output))


def _run_bn(rt: _Runtime, env: dict[str, Any], node: Node) -> Array:
  g = rt.graph
  x = jnp.asarray(rt.value(env, node.inputs[0]))
  bn = OnnxBatchNorm(
    g.bn_inits[node.name],
    epsilon=float(node.attrs.get("epsilon", 1e-5)),
    momentum=float(node.attrs.get("momentum", 0.9)),
    name=g.bn[node.name],
  )
  return bn(x, rt.ctx.train)


def _run_layer(rt: _Runtime, env: dict[str, Any], node: Node, layer: Layer) -> Array:
  """One quantized layer (see :class:`cimjax.onnx.graph.Layer`)."""
  g = rt.graph
  inits = g.layer_inits[layer.node]
  x = jnp.asarray(rt.value(env, layer.x))
  if layer.kind == "Conv2D":
    k = inits.arrays["kernel"]  # HWIO
    kernel = (int(k.shape[0]), int(k.shape[1]))
    strides = tuple(int(s) for s in node.attrs.get("strides", (1, 1)))
    pads = ops_lib.explicit_pads(node, x.shape[2:], kernel, strides)
    conv = OnnxQuantConv(
      features=int(k.shape[-1]),
      kernel_size=kernel,
      strides=strides,
      padding=tuple(pads),
      groups=int(node.attrs.get("group", 1)),
      use_bias="bias" in inits.arrays,
      signed_input=layer.signed_input,
      inits=inits,
      name=layer.module,
    )
    y = conv(jnp.transpose(x, (0, 2, 3, 1)), rt.ctx)
    return jnp.transpose(y, (0, 3, 1, 2))
  if layer.kind == "Dense":
    if node.op == "Gemm" and node.attrs.get("transA", 0):
      x = x.T
    k = inits.arrays["kernel"]
    n, m = int(k.shape[0]), int(k.shape[1])
    lead = x.shape[:-1]
    total = int(np.prod(lead)) if lead else 1
    b = rt.batch
    if x.ndim == 2 and lead[0] == b:
      x2 = x
    elif total % b == 0:
      x2 = x.reshape(b, total // b, n)
    else:
      x2 = x.reshape(1, total, n)
    dense = OnnxQuantDense(
      features=m,
      use_bias="bias" in inits.arrays,
      signed_input=layer.signed_input,
      inits=inits,
      name=layer.module,
    )
    y = dense(x2, rt.ctx).reshape(*lead, m)
    extra = g.gemm_extra.get(layer.node)
    if extra is not None:
      y = y + rt.value(env, extra[0]) * extra[1]
    return y
  # activation x activation
  w = jnp.asarray(rt.value(env, layer.w))
  x_vec, w_vec = x.ndim == 1, w.ndim == 1
  if x_vec:
    x = x[None, :]
  if w_vec:
    w = w[:, None]
  lead = tuple(np.broadcast_shapes(x.shape[:-2], w.shape[:-2]))
  x = jnp.broadcast_to(x, lead + x.shape[-2:])
  w = jnp.broadcast_to(w, lead + w.shape[-2:])
  r_total = int(np.prod(lead)) if lead else 1
  b = rt.batch
  b0, r = (b, r_total // b) if (r_total % b == 0 and r_total >= b) else (1, r_total)
  t, n = x.shape[-2:]
  m = w.shape[-1]
  mm = OnnxQuantMatMul(
    signed_input=layer.signed_input,
    a_clip_init=4.0 if layer.signed_input else 1.0,
    inits=inits,
    name=layer.module,
  )
  y = mm(x.reshape(b0, r, t, n), w.reshape(b0, r, n, m), rt.ctx).reshape(*lead, t, m)
  if w_vec:
    y = y[..., 0]
  if x_vec:
    y = y[..., 0] if w_vec else y[..., 0, :]
  return y
