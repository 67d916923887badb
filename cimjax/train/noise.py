"""Noise-aware fine-tuning: training through the crossbar simulator's non-idealities.

The forward pass of every layer runs on the crossbar simulator (:mod:`cimjax.crossbar`: ADC
resolution and calibrated range, programming and read noise); the backward pass is that of the
ideal integer product (straight-through), so the update is well defined although the forward
pass is not differentiable. Each step draws a fresh chip (programming-noise key) and read key,
so the model learns the noise distribution rather than one chip. ``launch/bench_noise.py``
measures the accuracy before and after it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cimjax.models import ModelDef, forward
from cimjax.noise import NoiseConfig

if TYPE_CHECKING:
  from cimjax.crossbar import XbarConfig

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class NoisyStepConfig:
  """The static part of :func:`noisy_step` (bound with ``functools.partial`` before jitting).

  Attributes:
    module: the model's Flax module.
    xbar: the crossbar configuration (its ``adc_bits`` is used).
    policy: the static policy ``[L, 2]`` as nested tuples.
    noise: the non-idealities, or None.
    adc_frac: ``[L]`` calibrated ADC ranges (fractions of full scale) as a tuple, or None.
    lr: Adam learning rate.
  """

  module: nn.Module
  xbar: XbarConfig
  policy: tuple[tuple[int, int], ...]
  noise: NoiseConfig | None
  adc_frac: tuple[float, ...] | None
  lr: float

  @property
  def tx(self) -> optax.GradientTransformation:
    """The optimizer (Adam)."""
    return optax.adam(self.lr)


def noisy_step(
  params: PyTree,
  opt_state: PyTree,
  rest: PyTree,
  x: Array,
  y: Array,
  key: Array,
  *,
  config: NoisyStepConfig,
) -> tuple[PyTree, PyTree, Array]:
  """One Adam step with the crossbar simulator in the forward pass.

  Args:
    params: model parameters.
    opt_state: Adam state.
    rest: the other variable collections (``batch_stats``, used in inference mode).
    x: ``[B, H, W, C]`` images.
    y: int ``[B]`` labels.
    key: the chip's PRNG key (programming noise); the read noise uses ``fold_in(key, 1)``.
    config: the static setup.

  Returns:
    ``(params, opt_state, loss)``.
  """
  from cimjax import crossbar as xb  # local: only noise-aware training needs the simulator

  pol = np.asarray(config.policy, np.int32)
  frac = None if config.adc_frac is None else jnp.asarray(config.adc_frac, jnp.float32)
  hook = xb.make_mvm_hook(
    config.xbar,
    policy=pol,
    noise=config.noise,
    key=key,
    read_key=jax.random.fold_in(key, 1),
    adc_frac=frac,
  )

  def loss_fn(p):
    logits, _ = forward(config.module, {"params": p, **rest}, x, jnp.asarray(pol), mvm=hook)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
    updates, opt_state = config.tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def finetune_noisy(
  model: ModelDef,
  variables: dict[str, PyTree],
  policy: Any,
  xbar: XbarConfig,
  noise: NoiseConfig | None,
  adc_frac: Any,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  steps: int,
  lr: float,
  batch: int,
  seed: int,
  log_every: int = 100,
) -> dict[str, PyTree]:
  """Fine-tunes ``variables`` with the crossbar (ADC + noise) in the forward pass.

  Step ``s`` trains on ``batch`` images drawn with replacement (NumPy ``default_rng(seed)``)
  on the chip ``fold_in(key(seed), s)``.

  Args:
    model: the zoo model (no batch norm, or batch norm in inference mode).
    variables: starting variables ``{"params", ["batch_stats"]}``.
    policy: int ``[L, 2]`` (static: the simulator allocates slices per layer).
    xbar: :class:`cimjax.crossbar.XbarConfig` (its ``adc_bits`` is used).
    noise: :class:`cimjax.noise.NoiseConfig` or None.
    adc_frac: ``[L]`` ADC range fractions or None.
    images: ``[N, H, W, C]`` float32 training images.
    labels: int ``[N]`` training labels.
    steps: Adam steps.
    lr: Adam learning rate.
    batch: images a step.
    seed: seeds the batch draws and the chips.
    log_every: steps between logged losses.

  Returns:
    The fine-tuned variables (the other collections unchanged).
  """
  config = NoisyStepConfig(
    module=model.module,
    xbar=xbar,
    policy=tuple((int(w), int(a)) for w, a in np.asarray(policy).tolist()),
    noise=noise,
    adc_frac=None if adc_frac is None else tuple(float(f) for f in np.asarray(adc_frac)),
    lr=float(lr),
  )
  # Bound, not a static argument: a module built from JSON options (lists) is not hashable.
  step = jax.jit(functools.partial(noisy_step, config=config))
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  with jax.numpy_dtype_promotion("standard"):
    opt_state = config.tx.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for s in range(steps):
    idx = rng.integers(0, len(labels), batch)
    params, opt_state, loss = step(
      params,
      opt_state,
      rest,
      jnp.asarray(images[idx]),
      jnp.asarray(labels[idx]),
      jax.random.fold_in(key, s),
    )
    if s % log_every == 0:
      logging.info("noise-aware finetune step %d loss %.4f", s, float(loss))
  return {"params": params, **rest}


__all__ = ["NoisyStepConfig", "finetune_noisy", "noisy_step"]
