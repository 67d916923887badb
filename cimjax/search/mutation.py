"""Mutation of sampled candidates with a self-adapted rate (Rechenberg's success rule).

A collapsed sampling distribution only repeats policies, which costs no budget but wastes
iterations. Each layer of a sampled candidate is therefore redrawn uniformly among its allowed
(w, a) pairs with probability ``rate`` (:func:`mutate`), and the rate follows the share of new
policies among the samples (:func:`adapt_rate`): below ``target`` it is multiplied by ``gain``
(starting from ``min_rate``), otherwise divided by it (to 0 below ``min_rate``). The state is
the rate itself, a float32 scalar. Both functions are pure and jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cimjax import policy as policy_lib


def mutate(
  policies: jax.Array, key: jax.Array, rate: jax.Array, pair_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Redraws each layer's (w, a) uniformly among the allowed pairs with probability ``rate``.

  Args:
    policies: int32 ``[N, L, 2]``.
    key: PRNG key.
    rate: float32 ``[]`` per-layer redraw probability.
    pair_mask: bool ``[L, 8, 8]`` allowed pairs.

  Returns:
    ``(policies [N, L, 2], changed bool [N])``: the candidates and which of them differ.
  """
  ku, kr = jax.random.split(key)
  fresh = policy_lib.random_policies(kr, pair_mask, policies.shape[0])
  flip = jax.random.uniform(ku, policies.shape[:2]) < rate
  out = jnp.where(flip[..., None], fresh, policies)
  return out, jnp.any(out != policies, axis=(1, 2))


def adapt_rate(
  rate: jax.Array, new: jax.Array, *, target: float, gain: float, min_rate: float
) -> jax.Array:
  """The next mutation rate after a batch of samples (the success rule).

  Args:
    rate: float32 ``[]`` current rate.
    new: bool ``[N]`` which samples were new policies.
    target: the share of new samples aimed at (0: no mutation, the rate stays).
    gain: factor of the adaptation (> 1).
    min_rate: smallest non-zero rate.

  Returns:
    float32 ``[]`` ``min(max(rate * gain, min_rate), 1)`` when fewer than ``target`` of the
    samples are new, else ``rate / gain`` (0 once below ``min_rate``).
  """
  if not target:
    return rate
  share = jnp.mean(new.astype(jnp.float32))
  up = jnp.minimum(jnp.maximum(rate * gain, min_rate), 1.0)
  down = rate / gain
  return jnp.where(share < target, up, jnp.where(down < min_rate, 0.0, down)).astype(jnp.float32)


__all__ = ["adapt_rate", "mutate"]
