"""The forward-pass ``mvm`` hook: every quantized layer's integer product on the simulator.

:func:`make_mvm_hook` builds the hook that :func:`cimjax.models.forward` calls per layer;
:func:`straight_through` gives the simulated product the gradient of the ideal one
(noise-aware training); :func:`layer_keys` and :func:`layer_read_keys` derive a layer's PRNG keys;
:func:`static_noise` makes noise magnitudes compile-time constants.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.crossbar.layout import DEFAULT_BLOCK_ELEMS, DEFAULT_MAX_BITS, HIGHEST, XbarConfig
from cimjax.crossbar.simulate import crossbar_mvm
from cimjax.noise import NoiseConfig

Array = jax.Array


@jax.custom_vjp
def straight_through(x: Array, w: Array, y: Array) -> Array:
  """Returns ``y`` (the simulated product) with the gradient of the ideal ``x @ w``.

  Forward: ``y``. Backward: the cotangent ``g`` of the output flows to ``x`` as ``g @ w^T``
  and to ``w`` as ``x^T @ g`` (the gradient of the integer matmul); ``y`` gets none. This is
  what noise-aware fine-tuning needs: the loss sees the noisy crossbar, the update is the ideal
  one.

  Args:
    x: ``[R, T, n]``; w: ``[R, n, m]``; y: ``[R, T, m]``.
  """
  del x, w
  return y


def _st_fwd(x, w, y):
  return y, (x, w)


def _st_bwd(res, g):
  x, w = res
  gx = jnp.einsum("rtm,rnm->rtn", g, w, precision=HIGHEST)
  gw = jnp.einsum("rtn,rtm->rnm", x, g, precision=HIGHEST)
  return gx, gw, jnp.zeros_like(g)


straight_through.defvjp(_st_fwd, _st_bwd)


def layer_keys(key: Array | None, index: int) -> tuple[Array | None, Array | None]:
  """Per-layer ``(prog_key, read_key)`` derived from one key (None -> None)."""
  if key is None:
    return None, None
  k = jax.random.fold_in(key, index)
  return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


MvmHook = Callable[[int, Any, Array, Array, Array, Array], Array]


def static_noise(noise: NoiseConfig | None) -> NoiseConfig | None:
  """A hashable copy of ``noise`` with Python-float magnitudes, or None when all are zero.

  Raises:
    TypeError: a magnitude is traced (the simulator needs compile-time magnitudes).
  """
  if noise is None:
    return None
  try:
    out = NoiseConfig(*(float(v) for v in noise))
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(
      "noise magnitudes must be concrete numbers (they are compile-time "
      "constants of the simulator), not traced values"
    ) from None
  return None if out.is_zero() else out


def layer_read_keys(
  key: Array | None, read_key: Array | None, index: int
) -> tuple[Array | None, Array | None]:
  """Layer ``index``'s ``(prog_key, read_key)`` from the chip key and a per-batch read key.

  Both come from the chip ``key`` (:func:`layer_keys`); a per-batch ``read_key`` replaces the
  read key by ``fold_in(read_key, index)``. None keys give None.
  """
  pk, rk = layer_keys(key, index)
  if read_key is not None:
    rk = jax.random.fold_in(read_key, index)
  return pk, rk


def layer_adc_frac(adc_frac: Any, index: int) -> Any:
  """Layer ``index``'s ADC range (fraction of full scale) from an optional ``[L]`` array."""
  return 1.0 if adc_frac is None else adc_frac[index]


def with_ideal_grad(x: Array, w: Array, y: Array, straight_through_grad: bool) -> Array:
  """``y`` with the gradient of ``x @ w`` (:func:`straight_through`) when asked, else ``y``."""
  if straight_through_grad:
    return straight_through(x, w, jax.lax.stop_gradient(y))
  return y


def make_mvm_hook(
  cfg: XbarConfig,
  *,
  policy: Any = None,
  max_bits: int = DEFAULT_MAX_BITS,
  noise: NoiseConfig | None = None,
  key: Array | None = None,
  read_key: Array | None = None,
  adc_frac: Any = None,
  straight_through_grad: bool = True,
  block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> MvmHook:
  """An ``mvm`` hook for :func:`cimjax.models.forward` that runs every layer on the simulator.

  Usage::

    hook = make_mvm_hook(XbarConfig.from_hw(hw, adc_bits=6), noise=NoiseConfig(variation=.05),
                         key=jax.random.key(0))
    logits, _ = forward(module, variables, x, policy, mvm=hook)

  Args:
    cfg: crossbar configuration.
    policy: optional static ``[L, 2]`` NumPy policy: slices/cycles are then allocated exactly
      per layer (faster). It must equal the policy passed to ``forward``. Leave None when the
      policy is traced (``jit``/``vmap`` over policies): slices and cycles are then allocated
      for ``max_bits`` and masked.
    max_bits: allocation bound when ``policy`` is None.
    noise: non-idealities (zero magnitudes are dropped statically), or None.
    key: the chip's PRNG key: programming noise of layer ``l`` uses ``fold_in(key, l)``.
    read_key: key of the read noise (e.g. one per batch); defaults to one derived from ``key``.
    adc_frac: optional ``[L]`` calibrated ADC ranges (fractions of full scale).
    straight_through_grad: backward pass of the ideal integer matmul (noise-aware training).
    block_elems: token-block size of the simulator.

  Returns:
    ``mvm(index, spec, x [R, T, n], w [R, n, m], w_bits, a_bits) -> [R, T, m]``.
  """
  noise = static_noise(noise)
  if noise is not None and key is None:
    raise ValueError("make_mvm_hook: noise needs a PRNG key")
  pol = None if policy is None else np.asarray(policy)

  def hook(index, spec, x, w, w_bits, a_bits):
    if spec is None:
      raise ValueError(f"mvm hook: layer {index} has no LayerSpec (signedness unknown)")
    if pol is not None:
      mw, ma = int(pol[index, 0]), int(pol[index, 1])
    else:
      mw = ma = max_bits
    pk, rk = layer_read_keys(key, read_key, index)
    y = crossbar_mvm(
      x,
      w,
      w_bits,
      a_bits,
      cfg,
      signed_input=bool(spec.signed_input),
      max_w_bits=mw,
      max_a_bits=ma,
      adc_frac=layer_adc_frac(adc_frac, index),
      noise=noise,
      prog_key=pk,
      read_key=rk,
      block_elems=block_elems,
    )
    return with_ideal_grad(x, w, y, straight_through_grad)

  return hook


__all__ = [
  "MvmHook",
  "layer_adc_frac",
  "layer_keys",
  "layer_read_keys",
  "make_mvm_hook",
  "static_noise",
  "straight_through",
  "with_ideal_grad",
]
