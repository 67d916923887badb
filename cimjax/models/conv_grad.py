"""2-D convolution with a faster filter gradient on XLA:CPU: :func:`conv2d`.

XLA differentiates a convolution into two convolutions: the input gradient (a forward-like
convolution of the cotangent with the flipped kernel) and the filter gradient, a convolution
whose "kernel" is the whole cotangent (``H_out x W_out``, contracted over the batch too) and
whose output is the tiny ``kh x kw`` filter. XLA:CPU (YNNPACK) runs the latter as one long
contraction over ``N * H_out * W_out`` that falls out of cache: on the reference CNN it ran at
~50 GFLOP/s alone and ~28 under load inside the step, against ~100 for the forward convolutions.

The filter gradient is linear in the batch, so it is the sum of the filter gradients of batch
chunks. Computing it as XLA's own filter-gradient convolution on chunks of a few images (each
chunk's input and cotangent about 1 MiB, so they stay in L2) and adding the partial results
runs 1.5-2.8x faster alone on the reference CNN's layers, and a plain-JAX step of that CNN
1.36-1.72x faster (``launch/bench_conv_grad.py``); cimjax's own fp32 stage step of the same CNN
gained only ~5 % (342 vs 324 img/s, 5 of 7 rounds, load ~4; 2026-12-02), because its lax step
is already faster than the plain-JAX one (324 vs 239 img/s), for a reason not yet found. The
chunks are unrolled in the program: a ``lax.scan`` over them is 40x slower (the convolution
inside a loop body leaves YNNPACK).

Formulations measured and dropped (same bench, 2-core CPU): shifted matmuls
``dW[kh, kw] = x_shift(kh, kw)^T @ dy`` (0.6-0.8x of XLA's gradient), one matmul on
``lax.conv_general_dilated_patches`` (0.3x) or on concatenated shifts (im2col; 0.4-0.6x, but
2x faster for the 1-channel first conv), and the same formulations for the input gradient
(0.2-0.4x): XLA:CPU's dots with a contraction this long are slower than its convolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# bytes of one chunk's input + cotangent, about one core's 1 MiB L2: measured best on the
# reference CNN at batch 128 (conv1: 8 images, conv2: 4 of its 28x28x32 input + 28x28x64
# cotangent, 1.2 MB; conv3: 8 of 14x14x64 + 14x14x128; launch/bench_conv_grad.py --chunk=...)
CHUNK_BYTES = 5 << 18
# at most this many chunks (the program unrolls them; compile time grows with the count)
MAX_CHUNKS = 64

Padding = str | Sequence[tuple[int, int]]


def _lax_conv(
  x: jax.Array,
  w: jax.Array,
  strides: tuple[int, int],
  padding: Padding,
  feature_group_count: int,
  precision: Any,
) -> jax.Array:
  return lax.conv_general_dilated(
    x,
    w,
    window_strides=strides,
    padding=padding,
    dimension_numbers=DIMENSION_NUMBERS,
    feature_group_count=feature_group_count,
    precision=precision,
  )


def chunk_size(x_shape: Sequence[int], y_shape: Sequence[int], itemsize: int = 4) -> int:
  """Images per chunk of the filter gradient.

  Args:
    x_shape: the input's ``[N, H, W, C]``.
    y_shape: the output's (cotangent's) ``[N, H_out, W_out, O]``.
    itemsize: bytes per element.

  Returns:
    The most images whose input + cotangent fit :data:`CHUNK_BYTES` (at least 1), lowered to
    a divisor of ``N`` if one is at least half of it (equal chunks), then raised to at least
    ``ceil(N / MAX_CHUNKS)``; at most ``N`` (one chunk: XLA's own gradient).
  """
  n = x_shape[0]
  per_image = itemsize * (math.prod(x_shape[1:]) + math.prod(y_shape[1:]))
  s = max(1, CHUNK_BYTES // max(per_image, 1))
  s = next((d for d in range(s, (s + 1) // 2 - 1, -1) if n % d == 0), s)
  return max(1, min(max(s, -(-n // MAX_CHUNKS)), n))


def _normalize_padding(padding: Padding) -> Padding:
  if isinstance(padding, str):
    return padding.upper()
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d(
  x: jax.Array,
  w: jax.Array,
  *,
  strides: Sequence[int] = (1, 1),
  padding: Padding = "SAME",
  feature_group_count: int = 1,
  precision: Any = None,
  chunk: int | None = None,
) -> jax.Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO) with a faster filter gradient on XLA:CPU.

  The forward is ``lax.conv_general_dilated`` itself, so its values are bit-identical. The
  input gradient is XLA's own. The filter gradient is XLA's own filter-gradient convolution
  computed on chunks of ``chunk`` images and summed in batch order: the same value up to
  float rounding (exact when every partial sum is exact, e.g. small integers).

  Unsupported configurations (``feature_group_count > 1``, a non-float dtype, an input that is
  not 4-D) use the plain ``lax`` gradient unchanged.

  Args:
    x: ``[N, H, W, C]`` input.
    w: ``[kh, kw, C / feature_group_count, O]`` kernel.
    strides: ``(sh, sw)``, any positive ints (1 and 2 are tested).
    padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo_h, hi_h), (lo_w, hi_w))``.
    feature_group_count: as in ``lax.conv_general_dilated`` (> 1: the plain lax gradient).
    precision: as in ``lax.conv_general_dilated`` (also used in the gradient).
    chunk: images per filter-gradient chunk; None: :func:`chunk_size`. ``chunk >= N`` is
      XLA's own gradient.

  Returns:
    ``[N, H_out, W_out, O]``.
  """
  strides = tuple(int(s) for s in strides)
  padding = _normalize_padding(padding)
  plain = functools.partial(
    _lax_conv,
    strides=strides,
    padding=padding,
    feature_group_count=feature_group_count,
    precision=precision,
  )
  if (
    feature_group_count != 1
    or x.ndim != 4
    or not jax.dtypes.issubdtype(x.dtype, jax.numpy.floating)
    or not jax.dtypes.issubdtype(w.dtype, jax.numpy.floating)
  ):
    return plain(x, w)
  return _conv2d_chunked(x, w, strides, padding, precision, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv2d_chunked(
  x: jax.Array,
  w: jax.Array,
  strides: tuple[int, int],
  padding: Padding,
  precision: Any,
  chunk: int | None,
) -> jax.Array:
  return _lax_conv(x, w, strides, padding, 1, precision)


def _fwd(
  x: jax.Array,
  w: jax.Array,
  strides: tuple[int, int],
  padding: Padding,
  precision: Any,
  chunk: int | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _lax_conv(x, w, strides, padding, 1, precision), (x, w)


def _bwd(
  strides: tuple[int, int],
  padding: Padding,
  precision: Any,
  chunk: int | None,
  res: tuple[jax.Array, jax.Array],
  g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  x, w = res
  conv = lambda a, b: _lax_conv(a, b, strides, padding, 1, precision)
  # input gradient: XLA's own (a forward-like convolution, already fast)
  gx = jax.vjp(lambda a: conv(a, w), x)[1](g)[0]
  n = x.shape[0]
  s = chunk_size(x.shape, g.shape, x.dtype.itemsize) if chunk is None else max(1, int(chunk))
  gw = None
  for i in range(0, n, s):
    part = jax.vjp(lambda b, i=i: conv(x[i : i + s], b), w)[1](g[i : i + s])[0]
    gw = part if gw is None else gw + part
  return gx, gw


_conv2d_chunked.defvjp(_fwd, _bwd)


__all__ = ["CHUNK_BYTES", "MAX_CHUNKS", "chunk_size", "conv2d"]
