"""Pure-function quantizers whose bit-widths are traced arrays.

Every function here takes the bit-width as data (a Python int, or an integer or float
``jax.Array`` of any shape that broadcasts), so one jitted function serves every bit-width and
``jax.vmap`` over a batch of bit-widths works. Nothing re-traces when bits change.

Conventions (docs/architecture.md, section 3):

* Weights: symmetric, signed, narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]``; the step is
  ``clip / (2^(b-1)-1)``.
* Unsigned activations (after ReLU or softmax): ``[0, 2^b-1]``; step ``clip / (2^b-1)``.
* Signed activations (the first layer, non-ReLU inputs): two's complement full range
  ``[-2^(b-1), 2^(b-1)-1]``; step ``clip / 2^(b-1)``, so the range is ``[-clip, clip - step]``.
* ``clip`` (the clipping range, alpha) is a learned parameter; the step is derived from it and
  the traced bit-width (PACT/LSQ style): gradients reach ``clip`` through the step and through
  the clipping bounds. Rounding is round-half-to-even with a straight-through estimator.

The integer codes (``q``) are returned as float32 arrays holding integers, so integer matmuls
can run on float hardware exactly (sums below 2^24), or be cast to int32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Bits = int | Array

MIN_CLIP = 1e-8  # Clipping ranges below this are clamped (keeps the step positive).


class QuantRange(NamedTuple):
  """Integer range and step divisor of a quantizer at a given bit-width.

  Attributes:
    lo: smallest integer code (float, integer-valued).
    hi: largest integer code.
    denom: the clipping range is divided by this to get the step.
  """

  lo: Array
  hi: Array
  denom: Array


def ste_round(x: Array) -> Array:
  """Round half to even in the forward pass, identity gradient in the backward pass."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def int_range(bits: Bits, *, signed: bool, narrow: bool) -> QuantRange:
  """Integer code range for ``bits`` (traced or static).

  Args:
    bits: bit-width, scalar or array; any integer or float dtype.
    signed: signed codes (two's complement) if True, unsigned otherwise.
    narrow: for signed codes, drop the most negative code (symmetric range). Ignored when
      unsigned.

  Returns:
    ``QuantRange(lo, hi, denom)`` as float32 arrays broadcastable with ``bits``.
  """
  b = jnp.asarray(bits, jnp.float32)
  if not signed:
    hi = jnp.exp2(b) - 1.0
    return QuantRange(jnp.zeros_like(hi), hi, hi)
  half = jnp.exp2(b - 1.0)
  hi = half - 1.0
  if narrow:
    return QuantRange(-hi, hi, hi)
  return QuantRange(-half, hi, half)


def step_size(clip: Array, bits: Bits, *, signed: bool, narrow: bool) -> Array:
  """Quantization step (the scale) derived from the clipping range and the bit-width."""
  rng = int_range(bits, signed=signed, narrow=narrow)
  return jnp.maximum(clip, MIN_CLIP) / rng.denom


def quantize(
  x: Array, clip: Array, bits: Bits, *, signed: bool, narrow: bool
) -> tuple[Array, Array]:
  """Quantize ``x`` to integer codes with a straight-through estimator.

  Args:
    x: values to quantize, any shape.
    clip: clipping range (alpha), broadcastable against ``x`` (a scalar for per-tensor,
      a ``[C]`` vector along the last axis for per-channel).
    bits: bit-width, broadcastable against ``x`` and ``clip``; may be traced.
    signed: signed codes (weights, signed activations) or unsigned (ReLU/softmax outputs).
    narrow: symmetric signed range (weights); ignored when unsigned.

  Returns:
    ``(q, step)``: ``q`` float32 integer codes with ``x``'s shape, and the step such that
    ``q * step`` is the fake-quantized value.
  """
  rng = int_range(bits, signed=signed, narrow=narrow)
  # The barrier keeps XLA from rewriting x / (clip / denom) as (x * denom) / clip under jit,
  # which rounds differently at exact .5 ties: eager, jitted and vmapped codes stay identical.
  step = jax.lax.optimization_barrier(jnp.maximum(clip, MIN_CLIP) / rng.denom)
  q = ste_round(jnp.clip(x / step, rng.lo, rng.hi))
  return q, step


def fake_quant(x: Array, clip: Array, bits: Bits, *, signed: bool, narrow: bool) -> Array:
  """Quantize then dequantize: ``q * step`` (see :func:`quantize`)."""
  q, step = quantize(x, clip, bits, signed=signed, narrow=narrow)
  return q * step


def quantize_weight(w: Array, clip: Array, bits: Bits) -> tuple[Array, Array]:
  """Symmetric signed narrow-range weight quantizer (per-channel along the last axis)."""
  return quantize(w, clip, bits, signed=True, narrow=True)


def quantize_act(x: Array, clip: Array, bits: Bits, *, signed: bool) -> tuple[Array, Array]:
  """Activation quantizer: unsigned ``[0, 2^b-1]`` or signed two's complement full range."""
  return quantize(x, clip, bits, signed=signed, narrow=False)


def gather_clip(table: Array, bits: Bits) -> Array:
  """Picks the clipping range learned for ``bits`` from a per-bit-width table.

  Args:
    table: ``[B, ...]`` clipping ranges, row ``b-1`` for bit-width ``b``.
    bits: scalar bit-width (traced or static) in ``1..B``.

  Returns:
    ``table[bits-1]`` (out-of-range bits are clamped to the table).
  """
  idx = jnp.clip(jnp.asarray(bits, jnp.int32) - 1, 0, table.shape[0] - 1)
  return jnp.take(table, idx, axis=0)


def mse_optimal_clip(
  x: np.ndarray,
  bits: int,
  *,
  signed: bool,
  narrow: bool,
  axis: int | None = None,
  num_candidates: int = 64,
) -> np.ndarray:
  """Clipping range minimising the quantization MSE of ``x`` at ``bits`` (calibration).

  Searches ``clip = f * max|x|`` for ``f`` on a grid in ``(0, 1]``. NumPy, host-side; used
  to initialise the learned clipping ranges before QAT.

  Args:
    x: sample of the tensor to quantize.
    bits: static bit-width.
    signed, narrow: as in :func:`quantize`.
    axis: channel axis for per-channel ranges, or None for one per-tensor range.
    num_candidates: grid size.

  Returns:
    Per-channel clips of shape ``[x.shape[axis]]``, or a scalar array.
  """
  x = np.asarray(x, np.float32)
  if axis is None:
    flat = x.reshape(1, -1)
  else:
    flat = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  amax = np.max(np.abs(flat), axis=1)
  amax = np.where(amax > 0, amax, 1.0)
  rng = int_range(bits, signed=signed, narrow=narrow)
  lo, hi, denom = (float(v) for v in rng)
  fracs = np.linspace(1.0 / num_candidates, 1.0, num_candidates)
  best_err = np.full(flat.shape[0], np.inf)
  best = amax.copy()
  for f in fracs:
    clip = amax * f
    step = (clip / denom)[:, None]
    q = np.clip(np.round(flat / step), lo, hi) * step
    err = np.mean((q - flat) ** 2, axis=1)
    better = err < best_err
    best_err = np.where(better, err, best_err)
    best = np.where(better, clip, best)
  return best if axis is not None else best[0]
