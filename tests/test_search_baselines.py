"""Exact optima: the Pareto DP equals exhaustive enumeration; synthetic accuracy models."""

import numpy as np
import pytest

from cimjax import cost as cost_lib
from cimjax import hw as hw_lib
from cimjax.search import accuracy as acc_lib
from cimjax.search import baselines
from cimjax.search import space as space_lib
from cimjax.spec import LayerSpec


def specs5():
  dims = [(16, 9, 784), (32, 144, 196), (48, 288, 49), (64, 432, 16), (10, 64, 1)]
  return [
    LayerSpec(
      name=f"l{i}",
      kind="Conv2D" if i < 4 else "Dense",
      m=m,
      n=n,
      invocations=v,
      in_channels=n // 9 or 1,
      out_channels=m,
      kernel=(3, 3),
      stride=1,
      input_size=v,
      signed_input=(i == 0),
    )
    for i, (m, n, v) in enumerate(dims)
  ]


@pytest.mark.parametrize(
  "kind, hw_name, constraint",
  [
    ("additive", "rram_64_c2", "both"),
    ("saturating", "rram_256_c4", "weight"),
    ("additive", "rram_128_c2", "io"),
  ],
)
def test_dp_optimum_equals_exhaustive(kind, hw_name, constraint):
  specs = specs5()
  hw = hw_lib.load_hw(hw_name)
  table = cost_lib.cost_tables(specs, hw, xp=np).latency_us
  space = space_lib.make_space(5, constraint, hw.cell_bits, min_bits=3, max_bits=8)
  src = acc_lib.SyntheticAccuracy(specs, kind=kind, seed=11, drop44=3.0)
  target = src.acc8 - 0.5
  everything = space_lib.enumerate_policies(space, 0, space.size)
  acc = src.exact(everything)
  ex = baselines.exhaustive_optimum(space, table, acc, target)
  dp = baselines.dp_optimum(space, table, src.damage, src.acc_of_damage, target)
  assert dp.feasible and ex.feasible
  assert dp.reward == pytest.approx(ex.reward, rel=1e-12)
  np.testing.assert_array_equal(dp.policy, ex.policy)
  # the DP front is the exhaustive Pareto front
  np.testing.assert_allclose(dp.front_cost_ratio, ex.front_cost_ratio, rtol=1e-12)
  np.testing.assert_allclose(dp.front_accuracy, ex.front_accuracy, rtol=1e-12)


def test_synthetic_model_properties():
  specs = specs5()
  src = acc_lib.SyntheticAccuracy(specs, seed=0, drop44=2.0)
  p8 = np.full((1, 5, 2), 8)
  p4 = np.full((1, 5, 2), 4)
  assert src.exact(p8)[0] == pytest.approx(90.0)
  assert src.exact(p4)[0] == pytest.approx(88.0)  # uniform 4/4 loses drop44
  assert acc_lib.noise_gain(np.asarray([8, 4, 2])).tolist() == pytest.approx([0, 1, 4095 / 255])
  np.testing.assert_allclose(np.asarray(src.fn(p4)), src.exact(p4), rtol=1e-6)
  sat = acc_lib.SyntheticAccuracy(specs, kind="saturating", seed=0)
  low = np.full((1, 5, 2), 1)
  assert 10.0 < sat.exact(low)[0] < 90.0
  inter = acc_lib.SyntheticAccuracy(specs, kind="interaction", seed=0)
  assert not inter.separable and inter.exact(p8)[0] == pytest.approx(90.0)
  assert inter.exact(p4)[0] < sat.exact(p4)[0]  # neighbours compound
