"""Flax (linen) quantized layers whose bits come from a policy array passed at apply time.

A model's ``__call__(x, ctx)`` threads one :class:`QuantContext` through its quantized layers.
Each quantized layer takes the next row of the policy ``[L, 2]`` in call order, so the policy
order is the model's call order and nothing is hand-numbered. The same context records each
layer's CIM geometry (:class:`cimjax.spec.LayerSpec`), which is how :mod:`cimjax.trace` derives
geometry without dimension files.

Integer operands (docs/architecture.md, section 3): each layer quantizes its input activation and
its weight to integer codes, multiplies the codes and applies the scales after the matmul. The
product runs in one of three modes (``ctx.int_dtype``, chosen by :func:`resolve_int_dtype`):
float32 codes at ``precision=HIGHEST`` (float32 sums of integers are exact below 2^24), int32
codes, or int8 codes with int32 accumulation (:func:`int8_product`, exact while the int32 sums
do not overflow; unsigned 8-bit activations are offset by -128 and corrected exactly). The int8
product keeps the float path's gradients (:func:`int8_with_float_grad`). The integer product
can be replaced by a hook (``ctx.mvm``), which is how the crossbar simulator runs inside a
forward pass.

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
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cimjax import quant
from cimjax.errors import (
  ConfigError,
  PolicyLengthError,  # noqa: F401 (re-exported)
)
from cimjax.spec import LayerSpec

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# mvm(index, spec, x [R, T, n], w [R, n, m], w_bits, a_bits) -> [R, T, m] integer-valued.
MvmFn = Callable[[int, LayerSpec, Array, Array, Array, Array], Array]

DEFAULT_MAX_BITS = 8
CALIB_SAMPLES = 65536  # values kept per layer input in calibration mode

INT_MODES = ("auto", "float32", "int32", "int8")  # integer-product modes (resolve_int_dtype)
INT8_MAX_BITS = 8  # widest codes an int8 operand holds (weights narrow, activations offset)
UNSIGNED_OFFSET = 128  # unsigned codes [0, 255] are fed as x - 128 in [-128, 127]
_ACCEL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
_MODE_DTYPES = {"float32": jnp.float32, "int32": jnp.int32, "int8": jnp.int8}
_log = logging.getLogger(__name__)


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
    int_dtype: dtype of integer operands in the native product (see :func:`resolve_int_dtype`):
      float32 (exact while partial sums stay below 2^24), int32 (always exact, slower on CPU)
      or int8 (int8 operands, int32 sums, exact; layers whose codes may be wider than 8 bits
      run the float32 product).
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
  native_int8: Callable[[Array, Array], Array] | None = None,
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
    native_int8: ``native`` on int8 operands with int32 results
      (``preferred_element_type=jnp.int32``), used by the int8 mode through
      :func:`int8_product`; None: int8 mode runs ``native`` on float32 codes.

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
      int8_fn = None
      if native_int8 is not None and int8_fits(max_bits, fixed_bits):
        int8_fn = lambda a, b: int8_product(  # noqa: E731
          a, b, native_int8, unsigned_x=not signed_input
        ).astype(jnp.float32)
      acc = _product(ctx, xq, wq, native, int8_fn, bits)
    if index is not None:
      _sow_capture(host, ctx, x_int=xq, w_int=wq, acc=acc)
    y = acc * (sx * sw.reshape(-1))
  if bias is not None:
    y = y + bias
  return y


class _QuantOp(nn.Module):
  """Shared attributes of the quantized layers (the logic lives in module-level functions)."""


# ----------------------------------------------------------------------------------------------
# Integer products: float32, int32 or int8 operands (docs/architecture.md, integer operands)


def int8_product(
  x: Array, w: Array, product: Callable[[Array, Array], Array], *, unsigned_x: bool
) -> Array:
  """Exact product of integer codes with int8 operands and int32 accumulation.

  ``product`` must be linear in its first operand and act on each index of that operand's
  leading axis independently (a dense layer, a convolution over the batch axis). Unsigned
  codes ``x in [0, 255]`` do not fit int8; they are fed as ``x' = x - 128`` and corrected::

    product(x, w) = product(x', w) + 128 * product(1, w)

  where ``1`` is an all-ones input of ``x``'s shape with a leading axis of 1 (broadcast over
  the batch). A convolution zero-pads its input, so ``pad(x) = pad(x') + 128 * pad(1)`` and the
  ones input carries exactly the zero padding of the real input: the correction is exact for
  every padding, stride and group count.

  Args:
    x: ``[B, ...]`` integer-valued codes (any dtype): signed in ``[-128, 127]``, or unsigned in
      ``[0, 255]`` when ``unsigned_x``.
    w: integer-valued codes in ``[-128, 127]`` (narrow-range weights up to 8 bits).
    product: ``product(a int8, b int8) -> int32`` (``preferred_element_type=jnp.int32``).
    unsigned_x: whether ``x`` holds unsigned codes.

  Returns:
    int32 ``product(x, w)``, exact while ``|sum| < 2^31`` (``n * 128 * 127 < 2^31``: any
    reduction length ``n`` below 132,000).
  """
  w8 = w.astype(jnp.int8)
  if not unsigned_x:
    return product(x.astype(jnp.int8), w8)
  x8 = (x - UNSIGNED_OFFSET).astype(jnp.int8)
  ones = jnp.ones((1, *x.shape[1:]), jnp.int8)
  return product(x8, w8) + UNSIGNED_OFFSET * product(ones, w8)


def int8_matmul(x: Array, w: Array, *, unsigned_x: bool, unsigned_w: bool = False) -> Array:
  """Exact batched ``x [..., T, n] @ w [..., n, m]`` of codes with int8 operands, int32 sums.

  With offsets ``ox, ow`` (128 for an unsigned operand, else 0), ``x = x' + ox`` and
  ``w = w' + ow`` with ``x', w'`` in int8, and for every output element::

    sum_n x w = sum_n x' w' + ow * sum_n x' + ox * sum_n w' + ox * ow * n

  The row sums of ``x'`` and column sums of ``w'`` are int32 reductions (``O(T n + n m)``
  per batch element, against ``O(T n m)`` for the product).

  Args:
    x: ``[..., T, n]`` codes: unsigned ``[0, 255]`` or signed ``[-128, 127]``.
    w: ``[..., n, m]`` codes, likewise (same leading axes).
    unsigned_x, unsigned_w: which operands hold unsigned codes.

  Returns:
    int32 ``[..., T, m]``, exact while ``n * 255 * 255 < 2^31``.
  """
  ox = UNSIGNED_OFFSET if unsigned_x else 0
  ow = UNSIGNED_OFFSET if unsigned_w else 0
  x8 = (x - ox).astype(jnp.int8)
  w8 = (w - ow).astype(jnp.int8)
  acc = jnp.einsum("...tn,...nm->...tm", x8, w8, preferred_element_type=jnp.int32)
  n = x.shape[-1]
  if ow:
    acc = acc + ow * jnp.sum(x8, axis=-1, keepdims=True, dtype=jnp.int32)
  if ox:
    acc = acc + ox * jnp.sum(w8, axis=-2, keepdims=True, dtype=jnp.int32)
  if ox and ow:
    acc = acc + jnp.int32(ox * ow * n)
  return acc


def int8_with_float_grad(
  int8_fn: Callable[[Array, Array], Array], float_fn: Callable[[Array, Array], Array]
) -> Callable[[Array, Array], Array]:
  """``int8_fn`` in the forward pass, the gradients of ``float_fn`` in the backward pass.

  Casting codes to int8 has no gradient; QAT's straight-through estimators need the gradient
  of the float product of the (float) codes. Both functions compute the same values on integer
  codes, so this is the float path exactly, forward and backward (a ``jax.custom_vjp``).

  Args:
    int8_fn: ``(x, w) -> float32`` product through int8 operands.
    float_fn: ``(x, w) -> float32`` product of the float codes (the float path's ``native``).

  Returns:
    ``f(x, w)`` with ``f = int8_fn`` and ``vjp(f) = vjp(float_fn)``.
  """

  @jax.custom_vjp
  def f(x: Array, w: Array) -> Array:
    return int8_fn(x, w)

  def fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return int8_fn(x, w), (x, w)

  def bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    _, vjp = jax.vjp(float_fn, *res)
    return vjp(g)

  f.defvjp(fwd, bwd)
  return f


def int8_fits(max_bits: int, fixed_bits: tuple[int, int] | None) -> bool:
  """Whether a layer's codes fit int8 operands, from its static bit bounds.

  Args:
    max_bits: size of the layer's clip tables (policy bits are validated within it).
    fixed_bits: the layer's fixed ``(w, a)`` bits, or None (policy bits up to ``max_bits``).
  """
  bound = max(fixed_bits) if fixed_bits is not None else max_bits
  return bound <= INT8_MAX_BITS


def _poison(acc: Array, x: Array, w: Array, bits: Array | None) -> Array:
  """NaN output where int8 operands cannot carry the codes: loud, never silently wrong.

  Traced bits above 8 would wrap in int8, and NaN codes (a NaN or inf upstream, e.g. after a
  degenerate 1-bit weight layer) would cast to finite integers; the float path propagates
  NaN, so the whole int8 product is NaN then (one cheap reduction over each operand).
  """
  ok = ~jnp.isnan(jnp.sum(x)) & ~jnp.isnan(jnp.sum(w))
  if bits is not None:
    ok = ok & jnp.all(bits <= INT8_MAX_BITS)
  return jnp.where(ok, acc, jnp.float32(jnp.nan))


def resolve_int_dtype(mode: Any = "auto", platform: str | None = None) -> np.dtype:
  """The dtype of integer operands for a mode (resolved once, where a forward is built).

  ``"auto"`` picks int8 on GPU/TPU when :func:`int8_self_check` passes on that platform (else
  float32, with a warning), and float32 on CPU, where the float32 path is today's reference
  (BUILD_NOTES.md has the measured CPU figures of both).

  Args:
    mode: one of :data:`INT_MODES`, or a dtype (float32, int32, int8) passed through.
    platform: the JAX platform (default ``jax.default_backend()``), for ``"auto"``.

  Returns:
    ``np.dtype`` float32, int32 or int8.

  Raises:
    ConfigError: an unknown mode or dtype.
  """
  if not isinstance(mode, str):
    try:
      dt = np.dtype(mode)
    except TypeError:
      dt = None
    if dt not in [np.dtype(d) for d in _MODE_DTYPES.values()]:
      raise ConfigError(f"int_dtype = {mode!r}; allowed: {', '.join(INT_MODES)} or their dtypes")
    return dt
  if mode not in INT_MODES:
    raise ConfigError(f"int mode = {mode!r}; allowed: {', '.join(INT_MODES)}")
  if mode == "auto":
    platform = platform or jax.default_backend()
    use8 = platform in _ACCEL_PLATFORMS and int8_self_check(platform)
    return np.dtype(np.int8 if use8 else np.float32)
  return np.dtype(_MODE_DTYPES[mode])


@functools.lru_cache(maxsize=None)
def int8_self_check(platform: str) -> bool:
  """Whether int8 dense, convolution and matmul products are exact on ``platform``'s device.

  Runs tiny products (unsigned/signed inputs, SAME padding, stride 2, two groups) through the
  int8 path and the float32 path on the platform's first device and compares them bit for
  bit. Cached per platform. A failure (an unsupported int8 lowering, or a wrong result) is
  logged and returns False.
  """
  try:
    dev = jax.devices(platform)[0]
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.randint(k[0], (2, 7, 7, 8), 0, 256).astype(jnp.float32)
    w = jax.random.randint(k[1], (3, 3, 4, 8), -127, 128).astype(jnp.float32)
    q = jax.random.randint(k[2], (2, 2, 5, 8), -128, 128).astype(jnp.float32)

    def conv(a, b, **kw):
      return jax.lax.conv_general_dilated(
        a,
        b,
        (2, 2),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2,
        **kw,
      )

    def both(x, w, q):
      c8 = int8_product(
        x, w, lambda a, b: conv(a, b, preferred_element_type=jnp.int32), unsigned_x=True
      )
      cf = conv(x, w, precision=HIGHEST)
      d8 = int8_product(q[..., :4], w[0, 0], _int8_einsum("...n,nm->...m"), unsigned_x=False)
      df = jnp.einsum("...n,nm->...m", q[..., :4], w[0, 0], precision=HIGHEST)
      xm, qm = x[:, :2, :3, :], jnp.swapaxes(q, -1, -2)  # [2, 2, 3, 8] @ [2, 2, 8, 5]
      m8 = int8_matmul(xm, qm, unsigned_x=True)
      mf = jnp.einsum("...tn,...nm->...tm", xm, qm, precision=HIGHEST)
      return [(c8, cf), (d8, df), (m8, mf)]

    pairs = jax.jit(both)(*jax.device_put((x, w, q), dev))
    ok = all(bool(jnp.array_equal(a.astype(jnp.float32), b)) for a, b in pairs)
    if not ok:
      _log.warning("int8 products on %s differ from float32; int mode auto -> float32", platform)
    return ok
  except Exception as e:  # pylint: disable=broad-except  (any lowering failure means "no")
    _log.warning("int8 products fail on %s (%s); int mode auto -> float32", platform, e)
    return False


def _int8_einsum(spec: str) -> Callable[[Array, Array], Array]:
  return lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.int32)


def _product(
  ctx: QuantContext,
  x: Array,
  w: Array,
  native: Callable[[Array, Array], Array],
  int8_fn: Callable[[Array, Array], Array] | None = None,
  bits: Array | None = None,
) -> Array:
  """The native integer product of codes in the context's mode (float32 result).

  Args:
    ctx: the context (its ``int_dtype``).
    x, w: float32 codes.
    native: the float product (also run on int32 codes).
    int8_fn: ``(x, w) -> float32`` through int8 operands, or None when the codes may not fit
      int8 (then int8 mode runs the float32 product).
    bits: ``[2]`` traced (w, a) bits, checked in int8 mode (NaN output above 8 bits, and where
      a code is NaN: see :func:`_poison`).
  """
  dt = np.dtype(ctx.int_dtype)
  if dt == np.float32 or (dt == np.int8 and int8_fn is None):
    return native(x, w)
  if dt == np.int8:
    acc = int8_with_float_grad(int8_fn, native)(x, w)
    return _poison(acc, jax.lax.stop_gradient(x), jax.lax.stop_gradient(w), bits)
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
  native_int8 = _int8_einsum("...n,nm->...m")
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
    native_int8=native_int8,
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

  def native(a: Array, b: Array, **kw: Any) -> Array:
    return jax.lax.conv_general_dilated(
      a,
      b,
      window_strides=strides,
      padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
      **(kw or {"precision": HIGHEST}),
    )

  def native_int8(a: Array, b: Array) -> Array:
    return native(a, b, preferred_element_type=jnp.int32)

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
    native_int8=native_int8,
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
    int8_fn = None
    if int8_fits(max_bits, fixed_bits):  # w: narrow signed codes; x: offset when unsigned
      int8_fn = lambda p, q: int8_matmul(p, q, unsigned_x=not signed_input).astype(  # noqa: E731
        jnp.float32
      )
    acc = _product(ctx, xq, wq, native, int8_fn, bits)
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
