"""Flax (linen) quantized layers whose bits come from a policy array passed at apply time.

A model's ``__call__(x, ctx)`` threads one :class:`QuantContext` through its quantized layers.
Each quantized layer takes the next row of the policy ``[L, 2]`` in call order, so the policy
order is the model's call order and nothing is hand-numbered. The same context records each
layer's CIM geometry (:class:`cimjax.spec.LayerSpec`), which is how :mod:`cimjax.trace` derives
geometry without dimension files.

Integer operands (docs/architecture.md, section 3): each layer quantizes its input activation and
its weight to integer codes, multiplies the codes (``precision=HIGHEST``; float32 sums of
integers are exact below 2^24, or int32 when ``ctx.int_dtype`` is int32) and applies the scales
after the matmul. The integer product can be replaced by a hook (``ctx.mvm``), which is how the
crossbar simulator runs inside a forward pass.

The computation lives in module-level functions (:func:`dense_op`, :func:`conv_op`,
:func:`matmul_op`, :func:`quantized_weight_op`) that take the module holding the clip tables as
``host``: the layers here call them with themselves, and :func:`cimjax.models.quantize_model`
with the intercepted ``nn.Dense``/``nn.Conv``/... of a plain Flax model.

Clipping ranges are learned per bit-width: a table ``[B, ...]`` whose row ``b-1`` serves
bit-width ``b`` (gathered with the traced bit-width), so one set of parameters serves every
policy and any-precision training can tune the range of each bit-width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimjax import quant
from cimjax.errors import PolicyLengthError  # noqa: F401 (re-exported)
from cimjax.spec import LayerSpec

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# mvm(index, spec, x [R, T, n], w [R, n, m], w_bits, a_bits) -> [R, T, m] integer-valued.
MvmFn = Callable[[int, LayerSpec, Array, Array, Array, Array], Array]

DEFAULT_MAX_BITS = 8
CALIB_SAMPLES = 65536  # values kept per layer input in calibration mode


def _quantize_operands(
  x: Array, w: Array, a_clip: Array, w_clip: Array, bits: Array, signed_input: bool
) -> tuple[Array, Array, Array, Array]:
  """Integer codes and scales of both operands of a quantized product.

  Args:
    x: activations; w: weights (or the second operand of a MatMul).
    a_clip, w_clip: per-bit-width clipping tables of the two operands.
    bits: ``[2]`` int (weight bits, activation bits), traced.
    signed_input: whether the activations are quantized signed.

  Returns:
    ``(xq, sx, wq, sw)``: codes and scales as :func:`cimjax.quant.quantize_act` and
    :func:`cimjax.quant.quantize_weight` return them.
  """
  w_bits, a_bits = bits[0], bits[1]
  xq, sx = quant.quantize_act(x, quant.gather_clip(a_clip, a_bits), a_bits, signed=signed_input)
  wq, sw = quant.quantize_weight(w, quant.gather_clip(w_clip, w_bits), w_bits)
  return xq, sx, wq, sw


@dataclasses.dataclass
class QuantContext:
  """Per-call state threaded through a model's quantized layers (a Python object, not a pytree).

  Attributes:
    policy: ``[L, 2]`` int (weight_bits, activation_bits) per quantizable layer in call order,
      or None for the float (unquantized) forward pass.
    train: training mode (batch norm uses batch statistics, dropout active).
    mvm: optional integer-product hook replacing the native matmul/conv (crossbar simulator).
    int_dtype: dtype of integer operands in the native product: float32 (fast, exact while
      partial sums stay below 2^24) or int32 (always exact, slower on CPU).
    capture: sow each layer's integer operands and accumulator into the ``"cim"`` collection.
    calibrate: sow a sample of each layer's float input into the ``"calib"`` collection.
    specs: filled with one :class:`LayerSpec` per quantizable layer in call order.
  """

  policy: Array | None = None
  train: bool = False
  mvm: MvmFn | None = None
  int_dtype: Any = jnp.float32
  capture: bool = False
  calibrate: bool = False
  specs: list[LayerSpec] = dataclasses.field(default_factory=list)
  index: int = 0

  def take(self) -> tuple[int, Array | None]:
    """Claims the next policy row; returns ``(layer_index, bits [2] or None)``."""
    i = self.index
    self.index += 1
    if self.policy is None:
      return i, None
    num = self.policy.shape[0]
    if i >= num:
      raise PolicyLengthError(
        f"policy has {num} rows but the model has more quantizable layers (at least {i + 1})"
      )
    return i, self.policy[i]

  def finish(self) -> None:
    """Checks every policy row was used (call after the forward pass)."""
    if self.policy is not None and self.policy.shape[0] != self.index:
      raise PolicyLengthError(
        f"policy has {self.policy.shape[0]} rows but the model has {self.index} quantizable layers"
      )


def _clip_table(name: str, module: nn.Module, shape: Sequence[int], init_value: Any) -> Array:
  return module.param(
    name, lambda _: jnp.broadcast_to(init_value, tuple(shape)).astype(jnp.float32)
  )


def record_spec(ctx: QuantContext, spec: LayerSpec) -> None:
  """Records the geometry of the layer that claimed the last policy row (first pass only)."""
  if len(ctx.specs) == ctx.index - 1:
    ctx.specs.append(spec)


def _sow_calib(host: nn.Module, ctx: QuantContext, name: str, x: Array) -> None:
  if ctx.calibrate:
    flat = x.reshape(-1)
    stride = max(1, flat.shape[0] // CALIB_SAMPLES)
    host.sow("calib", name, flat[::stride])


def _sow_capture(host: nn.Module, ctx: QuantContext, **arrays: Array) -> None:
  if ctx.capture:
    for k, v in arrays.items():
      host.sow("cim", k, v)


def _claim(
  ctx: QuantContext, spec: LayerSpec, fixed_bits: tuple[int, int] | None
) -> tuple[int | None, Array | None]:
  """``(index, bits)`` of a layer: the next policy row, or fixed bits and no row (index None)."""
  if fixed_bits is None:
    index, bits = ctx.take()
    record_spec(ctx, spec)
    return index, bits
  return None, None if ctx.policy is None else jnp.asarray(fixed_bits, jnp.int32)


def quantized_weight_op(
  host: nn.Module,
  x: Array,
  kernel: Array,
  bias: Array | None,
  ctx: QuantContext,
  spec: LayerSpec,
  *,
  native: Callable[[Array, Array], Array],
  hooked: Callable[[Array, Array, Callable[[Array, Array], Array]], Array],
  signed_input: bool,
  per_channel: bool = True,
  max_bits: int = DEFAULT_MAX_BITS,
  fixed_bits: tuple[int, int] | None = None,
  calib_w: Array | None = None,
) -> Array:
  """A weight layer on integer operands: policy row, clip tables, quantization, product.

  The shared body of :class:`QuantDense`, :class:`QuantConv` and the layers of plain Flax
  models run through :func:`cimjax.models.quantize_model`. The clip tables ``w_clip [B, C]``
  and ``a_clip [B]`` are parameters of ``host`` and the ``"cim"``/``"calib"`` samples are sown
  into ``host``'s scope, so they sit next to the layer's own ``kernel`` and ``bias``.

  Args:
    host: the bound module whose scope holds the clip tables (in a compact or setup method).
    x: the layer input.
    kernel: ``[..., C_out]`` weights (output channel axis last), the layer's CIM matrix for a
      dense layer (``[n, m]``) or its HWIO kernel for a convolution.
    bias: ``[C_out]`` or None.
    ctx: the context (policy, modes, hook, recorded specs).
    spec: this layer's geometry (recorded when it claims a policy row).
    native: the float/int product of two operands (e.g. ``lax.conv_general_dilated``).
    hooked: ``hooked(xq, wq, mvm2)`` computes the product through a 2-operand batched matrix
      product ``mvm2(x [R, T, n], w [R, n, m])``.
    signed_input: whether the activation codes are signed.
    per_channel: per-output-channel weight scales (else per tensor).
    max_bits: size B of the clip tables.
    fixed_bits: ``(w, a)``: the layer takes no policy row and runs at these bits in the digital
      periphery (no geometry, no hook, no capture); None: the next policy row.
    calib_w: the CIM matrix ``[n, m]`` to sow whole as the calibration weight ``"w"`` (for
      layers whose stored kernel is not laid out ``[..., C_out]`` like a dense or conv kernel;
      :func:`cimjax.train.calibrate_clips` prefers it to the kernel).

  Returns:
    The dequantized output (plus bias), or the float output when the policy is None.
  """
  index, bits = _claim(ctx, spec, fixed_bits)
  ch = kernel.shape[-1] if per_channel else 1
  red = tuple(range(kernel.ndim - 1))
  w_clip = _clip_table(
    "w_clip",
    host,
    (max_bits, ch),
    jnp.max(jnp.abs(kernel), axis=red) if per_channel else jnp.max(jnp.abs(kernel)),
  )
  a_clip = _clip_table("a_clip", host, (max_bits,), 3.0 if signed_input else 6.0)
  if index is not None:
    _sow_calib(host, ctx, "x", x)
    if calib_w is not None and ctx.calibrate:
      host.sow("calib", "w", calib_w)  # the whole [n, m] matrix (per-channel clips)
  if bits is None:
    y = native(x, kernel)
  else:
    w_bits, a_bits = bits[0], bits[1]
    xq, sx, wq, sw = _quantize_operands(x, kernel, a_clip, w_clip, bits, signed_input)
    if ctx.mvm is not None and index is not None:
      layer_spec = ctx.specs[index] if index < len(ctx.specs) else None
      acc = hooked(xq, wq, lambda a, b: ctx.mvm(index, layer_spec, a, b, w_bits, a_bits))
    else:
      acc = _product(ctx, xq, wq, native)
    if index is not None:
      _sow_capture(host, ctx, x_int=xq, w_int=wq, acc=acc)
    y = acc * (sx * sw.reshape(-1))
  if bias is not None:
    y = y + bias
  return y


class _QuantOp(nn.Module):
  """Shared attributes of the quantized layers (the logic lives in module-level functions)."""


def _product(
  ctx: QuantContext, x: Array, w: Array, native: Callable[[Array, Array], Array]
) -> Array:
  if ctx.int_dtype == jnp.float32:
    return native(x, w)
  out = native(x.astype(ctx.int_dtype), w.astype(ctx.int_dtype))
  return out.astype(jnp.float32)


def dense_op(
  host: nn.Module,
  x: Array,
  kernel: Array,
  bias: Array | None,
  ctx: QuantContext,
  *,
  signed_input: bool,
  per_channel: bool = True,
  max_bits: int = DEFAULT_MAX_BITS,
  fixed_bits: tuple[int, int] | None = None,
  calib_w: Array | None = None,
  name: str | None = None,
) -> Array:
  """A dense layer ``x @ kernel + bias`` on integer codes (the body of :class:`QuantDense`).

  Args:
    host: the bound module holding the clip tables (see :func:`quantized_weight_op`).
    x: ``[batch, ..., n]``; every axis but the first and the last counts as tokens.
    kernel: ``[n, m]``.
    bias: ``[m]`` or None.
    ctx: the context.
    signed_input, per_channel, max_bits, fixed_bits, calib_w: see
      :func:`quantized_weight_op`.
    name: the layer's name in its :class:`LayerSpec` (default: ``host``'s module path).

  Returns:
    ``[batch, ..., m]``.
  """
  n, m = kernel.shape
  tokens = 1
  for d in x.shape[1:-1]:
    tokens *= d
  spec = LayerSpec(
    name="/".join(host.path) if name is None else name,
    kind="Dense",
    m=m,
    n=n,
    invocations=tokens,
    repeat=1,
    in_channels=n,
    out_channels=m,
    kernel=(1, 1),
    stride=0,
    groups=1,
    input_size=n,
    signed_input=signed_input,
  )
  native = lambda a, b: jnp.einsum("...n,nm->...m", a, b, precision=HIGHEST)  # noqa: E731
  hooked = (
    lambda a, b, mvm: mvm(a.reshape(1, -1, n), b[None]).reshape(  # noqa: E731
      *x.shape[:-1], m
    )
  )
  return quantized_weight_op(
    host,
    x,
    kernel,
    bias,
    ctx,
    spec,
    native=native,
    hooked=hooked,
    signed_input=signed_input,
    per_channel=per_channel,
    max_bits=max_bits,
    fixed_bits=fixed_bits,
    calib_w=calib_w,
  )


class QuantDense(_QuantOp):
  """Dense layer ``y = x @ W + b`` on integer codes; one CIM matrix of ``n x m``.

  Attributes:
    features: output features m.
    use_bias: add a float bias (in the digital periphery).
    signed_input: activation codes signed (e.g. after LayerNorm) or unsigned (after ReLU).
    per_channel: per-output-feature weight scales (else per-tensor).
    max_bits: size B of the per-bit-width clip tables.
  """

  features: int
  use_bias: bool = True
  signed_input: bool = False
  per_channel: bool = True
  max_bits: int = DEFAULT_MAX_BITS
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext) -> Array:
    """Args: x ``[batch, ..., n]``. Returns ``[batch, ..., features]``."""
    n = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (n, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    return dense_op(
      self,
      x,
      kernel,
      bias,
      ctx,
      signed_input=self.signed_input,
      per_channel=self.per_channel,
      max_bits=self.max_bits,
    )


def conv_patches(
  x: Array,
  kernel_size: tuple[int, int],
  strides: tuple[int, int],
  padding: str | Sequence[tuple[int, int]],
) -> Array:
  """im2col: ``[B, H, W, C] -> [B, Ho, Wo, C*kh*kw]`` with features ordered (c, kh, kw)."""
  return jax.lax.conv_general_dilated_patches(
    x,
    filter_shape=kernel_size,
    window_strides=strides,
    padding=padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=HIGHEST,
  )


def conv_kernel_matrices(kernel: Array, groups: int) -> Array:
  """HWIO kernel ``[kh, kw, C/g, O]`` -> per-group CIM matrices ``[g, C/g*kh*kw, O/g]``.

  Row order (c, kh, kw) matches :func:`conv_patches`.
  """
  kh, kw, cg, o = kernel.shape
  og = o // groups
  k = kernel.reshape(kh, kw, cg, groups, og)
  k = jnp.transpose(k, (3, 2, 0, 1, 4))  # [g, cg, kh, kw, og]
  return k.reshape(groups, cg * kh * kw, og)


def conv_as_matmul(
  x: Array,
  kernel: Array,
  *,
  strides: tuple[int, int],
  padding: Any,
  groups: int,
  mvm: Callable[[Array, Array], Array],
) -> Array:
  """A (grouped) convolution computed as per-group matrix products ``mvm(x [g,T,n], w [g,n,m])``.

  Args:
    x: ``[B, H, W, C]`` input.
    kernel: ``[kh, kw, C/g, O]``.
    strides, padding, groups: as in ``lax.conv_general_dilated``.
    mvm: batched matrix product over the leading group axis.

  Returns:
    ``[B, Ho, Wo, O]``.
  """
  kh, kw, _, o = kernel.shape
  patches = conv_patches(x, (kh, kw), strides, padding)
  b, ho, wo, k = patches.shape
  n = k // groups
  xg = patches.reshape(b * ho * wo, groups, n).transpose(1, 0, 2)  # [g, T, n]
  wg = conv_kernel_matrices(kernel, groups)
  out = mvm(xg, wg)  # [g, T, og]
  return out.transpose(1, 0, 2).reshape(b, ho, wo, o)


def conv_op(
  host: nn.Module,
  x: Array,
  kernel: Array,
  bias: Array | None,
  ctx: QuantContext,
  *,
  strides: tuple[int, int],
  padding: Any,
  groups: int,
  signed_input: bool,
  per_channel: bool = True,
  max_bits: int = DEFAULT_MAX_BITS,
  fixed_bits: tuple[int, int] | None = None,
  name: str | None = None,
) -> Array:
  """A 2-D convolution on integer codes (the body of :class:`QuantConv`).

  Args:
    host: the bound module holding the clip tables (see :func:`quantized_weight_op`).
    x: ``[batch, H, W, C_in]``.
    kernel: HWIO ``[kh, kw, C_in / groups, C_out]``.
    bias: ``[C_out]`` or None.
    ctx: the context.
    strides, padding, groups: as in ``lax.conv_general_dilated`` (padding "SAME", "VALID" or
      explicit pairs).
    signed_input, per_channel, max_bits, fixed_bits: see :func:`quantized_weight_op`.
    name: the layer's name in its :class:`LayerSpec` (default: ``host``'s module path).

  Returns:
    ``[batch, H_out, W_out, C_out]``.
  """
  kh, kw, _, c_out = kernel.shape
  c_in = x.shape[-1]

  def native(a: Array, b: Array) -> Array:
    return jax.lax.conv_general_dilated(
      a,
      b,
      window_strides=strides,
      padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
      precision=HIGHEST,
    )

  y_shape = jax.eval_shape(native, x, kernel).shape
  spec = LayerSpec(
    name="/".join(host.path) if name is None else name,
    kind="Conv2D",
    m=c_out // groups,
    n=c_in // groups * kh * kw,
    invocations=y_shape[1] * y_shape[2],
    repeat=groups,
    in_channels=c_in,
    out_channels=c_out,
    kernel=(kh, kw),
    stride=strides[0],
    groups=groups,
    input_size=x.shape[1] * x.shape[2],
    signed_input=signed_input,
  )
  hooked = lambda a, b, mvm: conv_as_matmul(  # noqa: E731
    a, b, strides=strides, padding=padding, groups=groups, mvm=mvm
  )
  return quantized_weight_op(
    host,
    x,
    kernel,
    bias,
    ctx,
    spec,
    native=native,
    hooked=hooked,
    signed_input=signed_input,
    per_channel=per_channel,
    max_bits=max_bits,
    fixed_bits=fixed_bits,
  )


class QuantConv(_QuantOp):
  """2-D convolution (NHWC, HWIO, optional feature groups) on integer codes.

  CIM geometry: ``m = C_out/g``, ``n = C_in/g*kh*kw``, ``invocations = H_out*W_out``,
  ``repeat = g``.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: "SAME", "VALID" or explicit pairs.
    groups: feature groups (``feature_group_count``).
    use_bias, signed_input, per_channel, max_bits: as in :class:`QuantDense`.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  groups: int = 1
  use_bias: bool = True
  signed_input: bool = False
  per_channel: bool = True
  max_bits: int = DEFAULT_MAX_BITS
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext) -> Array:
    """Args: x ``[batch, H, W, C_in]``. Returns ``[batch, H_out, W_out, features]``."""
    c_in = x.shape[-1]
    if c_in % self.groups or self.features % self.groups:
      raise ValueError(
        f"{'/'.join(self.path)}: groups={self.groups} must divide in channels "
        f"{c_in} and out channels {self.features}"
      )
    kh, kw = self.kernel_size
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, c_in // self.groups, self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    return conv_op(
      self,
      x,
      kernel,
      bias,
      ctx,
      strides=self.strides,
      padding=self.padding,
      groups=self.groups,
      signed_input=self.signed_input,
      per_channel=self.per_channel,
      max_bits=self.max_bits,
    )


def matmul_op(
  host: nn.Module,
  x: Array,
  w: Array,
  ctx: QuantContext,
  *,
  signed_input: bool,
  max_bits: int = DEFAULT_MAX_BITS,
  w_clip_init: float = 4.0,
  a_clip_init: float = 4.0,
  fixed_bits: tuple[int, int] | None = None,
) -> Array:
  """An activation x activation product on integer codes (the body of :class:`QuantMatMul`).

  Args:
    host: the bound module holding the clip tables ``w_clip [B]``, ``a_clip [B]``.
    x: ``[B, R, T, n]`` streamed operand (Q, or the attention probabilities).
    w: ``[B, R, n, m]`` programmed operand (K^T or V).
    ctx: the context.
    signed_input: whether ``x`` is quantized signed.
    max_bits: size of the clip tables.
    w_clip_init, a_clip_init: initial clipping ranges.
    fixed_bits: see :func:`quantized_weight_op`.

  Returns:
    ``[B, R, T, m]``.
  """
  b, r, t, n = x.shape
  m = w.shape[-1]
  spec = LayerSpec(
    name="/".join(host.path),
    kind="MatMul",
    m=m,
    n=n,
    invocations=t,
    repeat=r,
    in_channels=n,
    out_channels=m,
    kernel=(1, 1),
    stride=0,
    groups=1,
    input_size=t * n,
    signed_input=signed_input,
  )
  index, bits = _claim(ctx, spec, fixed_bits)
  w_clip = _clip_table("w_clip", host, (max_bits,), w_clip_init)
  a_clip = _clip_table("a_clip", host, (max_bits,), a_clip_init)
  if index is not None:
    _sow_calib(host, ctx, "x", x)
    _sow_calib(host, ctx, "w", w)
  native = lambda p, q: jnp.einsum("brtn,brnm->brtm", p, q, precision=HIGHEST)  # noqa: E731
  if bits is None:
    return native(x, w)
  w_bits, a_bits = bits[0], bits[1]
  xq, sx, wq, sw = _quantize_operands(x, w, a_clip, w_clip, bits, signed_input)
  if ctx.mvm is not None and index is not None:
    layer_spec = ctx.specs[index] if index < len(ctx.specs) else None
    acc = ctx.mvm(
      index, layer_spec, xq.reshape(b * r, t, n), wq.reshape(b * r, n, m), w_bits, a_bits
    ).reshape(b, r, t, m)
  else:
    acc = _product(ctx, xq, wq, native)
  if index is not None:
    _sow_capture(host, ctx, x_int=xq, w_int=wq, acc=acc)
  return acc * (sx * sw)


class QuantMatMul(_QuantOp):
  """Activation x activation product ``x @ w`` (attention), with ``w`` programmed into CIM.

  ``w`` (e.g. K^T or V) is quantized like a weight (signed narrow range, one learned clip per
  bit-width, per tensor) with the policy's weight bits; ``x`` (Q or the attention
  probabilities) like an activation.

  CIM geometry for ``x [B, R, T, n] @ w [B, R, n, m]``: ``m``, ``n``, ``invocations = T``,
  ``repeat = R`` (heads).

  Attributes:
    signed_input: whether ``x`` is signed (Q) or unsigned (softmax probabilities).
    max_bits: size of the clip tables.
    w_clip_init, a_clip_init: initial clipping ranges.
    fixed_bits: ``(w, a)`` to run at fixed bits without a policy row (see
      :func:`quantized_weight_op`); None (default): the next policy row.
  """

  signed_input: bool = True
  max_bits: int = DEFAULT_MAX_BITS
  w_clip_init: float = 4.0
  a_clip_init: float = 4.0
  fixed_bits: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x: Array, w: Array, ctx: QuantContext) -> Array:
    """Args: x ``[B, R, T, n]``, w ``[B, R, n, m]``. Returns ``[B, R, T, m]``."""
    return matmul_op(
      self,
      x,
      w,
      ctx,
      signed_input=self.signed_input,
      max_bits=self.max_bits,
      w_clip_init=self.w_clip_init,
      a_clip_init=self.a_clip_init,
      fixed_bits=self.fixed_bits,
    )
