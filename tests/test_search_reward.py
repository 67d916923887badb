"""CIM-AQ reward: hand computations, both branches, NumPy/JAX agreement."""

import jax.numpy as jnp
import numpy as np
import pytest

from cimjax.search import reward as reward_lib


def test_accuracy_target():
  assert reward_lib.accuracy_target(90.7, 0.5) == pytest.approx(90.2)


@pytest.mark.parametrize(
  "acc, ratio, target, expected",
  [
    # below target: -10 * (89.5 - 88.0) = -15
    (88.0, 0.5, 89.5, -15.0),
    # exactly at target: feasible branch, 100 * (1 / 0.5 - 1) + 0.1 * 0 = 100
    (89.5, 0.5, 89.5, 100.0),
    # above: 100 * (1 / 0.8 - 1) + 0.1 * (90.0 - 89.5) = 25 + 0.05
    (90.0, 0.8, 89.5, 25.05),
    # uniform 8/8 (ratio 1) above target: only the accuracy bonus, 0.1 * 0.5
    (90.0, 1.0, 89.5, 0.05),
  ],
)
def test_reward_hand_computation(acc, ratio, target, expected):
  assert reward_lib.reference_reward(acc, ratio, target) == pytest.approx(expected)
  got_np = reward_lib.reward(np.asarray([acc]), np.asarray([ratio]), target, xp=np)
  got_j = reward_lib.reward(
    jnp.asarray([acc], jnp.float32), jnp.asarray([ratio], jnp.float32), target
  )
  assert float(got_np[0]) == pytest.approx(expected, abs=1e-12)
  assert float(got_j[0]) == pytest.approx(expected, abs=1e-4)


def test_reward_is_monotone_and_jumps_at_threshold():
  t = 89.5
  below = reward_lib.reference_reward(t - 1e-6, 0.5, t)
  at = reward_lib.reference_reward(t, 0.5, t)
  assert below < 0 < at  # the discontinuity (of the reference reward)
  assert at == pytest.approx(100 * (1 / 0.5 - 1))
  r = reward_lib.reward(np.asarray([80.0, 85.0, 89.0]), np.ones(3) * 0.5, t, xp=np)
  assert np.all(np.diff(r) > 0)
  assert reward_lib.feasible(np.asarray([89.49, 89.5]), t, xp=np).tolist() == [False, True]
