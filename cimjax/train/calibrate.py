"""Calibration: MSE-optimal clip tables and batch-norm recalibration.

* :func:`calibrate_clips`: MSE-optimal clip tables (every bit-width row) from the weights and
  from a calibration batch of layer inputs.
* :func:`recalibrate_bn`: re-estimates batch-norm running statistics for one policy.

Batch norm is kept in float after the integer conv and its dequantisation scale, not folded
into the weights: its per-channel affine merges with the per-channel dequantisation scale into
the digital periphery (requantisation) on CIM hardware, so folding would only change the
weight quantisation, not what the hardware can do. Batch statistics depend on the policy, so
before evaluating a policy the running statistics are re-estimated (exact population averages
over a few training batches, as in BigNAS/OFA "BN recalibration").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cimjax import data as data_lib
from cimjax import quant
from cimjax.models import ModelDef, forward
from cimjax.trace import trace_specs
from cimjax.train.state import TrainState, as_variables
from cimjax.variables import FAST_COMPILE

Array = jax.Array
PyTree = Any


def _bn_stats(params: PyTree, batch_stats: PyTree, x: Array, policy: Array | None, *, module):
  v = {"params": params, "batch_stats": batch_stats}
  _, st = forward(module, v, x, policy, train=True)
  return st["batch_stats"]


def _layer_inputs(variables: PyTree, x: Array, *, module: nn.Module) -> PyTree:
  return forward(module, variables, x, None, calibrate=True)[1]["calib"]


def _jit(fn: Any, fast: bool) -> Any:
  return jax.jit(fn, static_argnames="module", compiler_options=FAST_COMPILE if fast else None)


_BN_STATS = {fast: _jit(_bn_stats, fast) for fast in (False, True)}
_LAYER_INPUTS = _jit(_layer_inputs, True)  # runs once per stage: compile fast


def _module(model: ModelDef | nn.Module) -> nn.Module:
  return getattr(model, "module", model)


def recalibrate_bn(
  state_or_variables: TrainState | Mapping[str, PyTree],
  model: ModelDef | nn.Module,
  policy: Any,
  batches: Iterable[Any],
  *,
  fast_compile: bool = False,
) -> TrainState | dict[str, PyTree]:
  """Re-estimates batch-norm running statistics for ``policy`` (exact population averages).

  Runs the forward pass in training mode on each batch and averages the per-batch means and
  second moments (every batch counts equally, not the exponential moving average), so a few
  batches give the statistics the policy's integer layers actually produce.

  Args:
    state_or_variables: a :class:`TrainState` or a variables dict.
    model: the zoo model or module.
    policy: int ``[L, 2]`` or None (float).
    batches: iterable of image arrays ``[B, H, W, C]`` or ``(images, labels, ...)`` tuples.
    fast_compile: compile without expensive optimisations.

  Returns:
    The same kind of object with ``batch_stats`` replaced (unchanged if the model has none
    or ``batches`` is empty).
  """
  variables = as_variables(state_or_variables)
  bs = variables.get("batch_stats")
  if not bs:
    return state_or_variables
  fn, module = _BN_STATS[bool(fast_compile)], _module(model)
  params = variables["params"]
  pol = None if policy is None else jnp.asarray(policy, jnp.int32)
  zeros = jax.tree.map(jnp.zeros_like, bs)
  ones = jax.tree.map(jnp.ones_like, bs)
  sum_mean = sum_sq = momentum = None
  n = 0
  for batch in batches:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    out0 = fn(params, zeros, x, pol, module=module)  # (1 - m) * batch statistic
    if momentum is None:
      out1 = fn(params, ones, x, pol, module=module)
      momentum = jax.tree.map(lambda a, b: a - b, out1, out0)
    stat = jax.tree.map(lambda o, m: o / (1.0 - m), out0, momentum)
    # stat holds per-BN {"mean": mu_b, "var": var_b}; accumulate mu_b and E[x^2]_b.
    mean_b = _bn_leaves(stat, "mean")
    sq_b = jax.tree.map(lambda v, mu: v + mu * mu, _bn_leaves(stat, "var"), mean_b)
    sum_mean = mean_b if sum_mean is None else jax.tree.map(jnp.add, sum_mean, mean_b)
    sum_sq = sq_b if sum_sq is None else jax.tree.map(jnp.add, sum_sq, sq_b)
    n += 1
  if n == 0:
    return state_or_variables
  mean = jax.tree.map(lambda s: s / n, sum_mean)
  var = jax.tree.map(lambda s, mu: jnp.maximum(s / n - mu * mu, 0.0), sum_sq, mean)
  new_bs = _merge_bn(bs, mean, var)
  if isinstance(state_or_variables, TrainState):
    return state_or_variables.replace(batch_stats=new_bs)
  out = dict(variables)
  out["batch_stats"] = new_bs
  return out


def _bn_leaves(stats: PyTree, name: str) -> PyTree:
  """The ``mean`` or ``var`` leaves of a batch_stats tree, keyed by the BN module path."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(stats))
  return {k[:-1]: v for k, v in flat.items() if k[-1] == name}


def _merge_bn(bs: PyTree, mean: PyTree, var: PyTree) -> PyTree:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(bs))
  out = {}
  for k, v in flat.items():
    src = mean if k[-1] == "mean" else var
    out[k] = src[k[:-1]].astype(v.dtype)
  return flax.traverse_util.unflatten_dict(out)


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _first(v: Any) -> np.ndarray:
  return np.asarray(v[0] if isinstance(v, (tuple, list)) else v)


def calibrate_clips(
  variables: Mapping[str, PyTree],
  model: ModelDef,
  images: Any,
  *,
  bits: Iterable[int] | None = None,
) -> PyTree:
  """MSE-optimal clip tables for every quantized layer and bit-width row.

  Weights: per output channel (or per tensor, as the table's shape says) from the kernel,
  symmetric narrow range. Activations: per tensor from a sample of each layer's float input on
  ``images`` (``forward(..., calibrate=True)``), signed or unsigned as the layer's
  ``signed_input`` says. Row ``b-1`` gets the clip for bit-width ``b``; the degenerate 1-bit
  narrow weight row (a single code, 0) copies the 2-bit row.

  Args:
    variables: ``{"params", ["batch_stats"]}``.
    model: the zoo model (``input_shape`` matching ``images``).
    images: float32 ``[N, H, W, C]`` calibration batch.
    bits: the bit-widths whose rows to set (default: all rows ``1..B``).

  Returns:
    ``params`` with new ``w_clip``/``a_clip`` tables (all finite and positive).
  """
  calib = _LAYER_INPUTS(dict(variables), jnp.asarray(images), module=model.module)
  calib = flax.core.unfreeze(jax.device_get(calib))
  params = jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"]))
  for spec in trace_specs(model):
    path = spec.name.split("/")
    p = _get(params, path)
    c = _get(calib, path)
    num_rows = p["a_clip"].shape[0]
    rows = sorted(set(range(1, num_rows + 1) if bits is None else bits))
    # The CIM matrix sown by the layer (MatMul operands; DenseGeneral/Einsum kernels), else
    # the kernel (dense [n, m], conv HWIO: output channels last).
    w_src = _first(c["w"]) if "w" in c else p["kernel"]
    w_tab = np.array(p["w_clip"], np.float32)
    a_tab = np.array(p["a_clip"], np.float32)
    x = _first(c["x"])
    per_channel = w_tab.ndim == 2 and w_tab.shape[1] > 1
    w2d = np.asarray(w_src).reshape(-1, w_src.shape[-1]) if per_channel else np.asarray(w_src)
    for b in rows:
      wb = max(b, 2)  # a 1-bit narrow range has the single code 0: reuse the 2-bit clip
      wc = quant.mse_optimal_clip(
        w2d, wb, signed=True, narrow=True, axis=1 if per_channel else None
      )
      w_tab[b - 1] = np.reshape(wc, w_tab.shape[1:]) if w_tab.ndim == 2 else wc
      a_tab[b - 1] = quant.mse_optimal_clip(x, b, signed=spec.signed_input, narrow=False)
    p["w_clip"] = jnp.asarray(np.maximum(w_tab, 1e-6))
    p["a_clip"] = jnp.asarray(np.maximum(a_tab, 1e-6))
  return jax.tree.map(jnp.asarray, params)


def calib_images(splits: data_lib.Splits, config: ml_collections.ConfigDict) -> np.ndarray:
  """The clip-calibration batch: ``config.calib_images`` training images, a fixed sample."""
  n = min(config.calib_images or 1, len(splits.train))
  perm = data_lib.epoch_permutation(config.seed + 104729, 0, len(splits.train))
  return splits.train.images[np.sort(perm[:n])]


def recal_batches(splits: data_lib.Splits, config: ml_collections.ConfigDict) -> list[np.ndarray]:
  """The BN-recalibration batches: ``config.bn_recal_batches`` fixed training batches."""
  bs = min(config.batch_size, len(splits.train))
  it = data_lib.epoch_batches(splits.train, bs, config.seed + 7919, 0)
  return [x for x, _ in itertools.islice(it, config.bn_recal_batches)]


__all__ = ["calib_images", "calibrate_clips", "recal_batches", "recalibrate_bn"]
