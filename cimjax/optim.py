"""optax helpers shared by training and the search agents."""

from __future__ import annotations

import jax
import optax


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs an optax transformation under standard dtype promotion.

  optax 0.2.8 mixes its int32 step count with Python floats (Adam's bias correction, the
  schedules), which ``jax_numpy_dtype_promotion="strict"`` (the test suite's setting) refuses.
  """

  def init(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params)

  return optax.GradientTransformation(init, update)


__all__ = ["standard_promotion"]
