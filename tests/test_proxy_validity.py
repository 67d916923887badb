"""Spearman's rho of the proxy-validity benchmark against scipy's implementation."""

import numpy as np
import pytest
from scipy import stats

from launch import proxy_validity


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed):
  rng = np.random.default_rng(seed)
  a = np.round(rng.normal(size=25), 1)  # rounding makes ties
  b = a + rng.normal(size=25) * 0.5
  expected = stats.spearmanr(a, b).statistic
  assert proxy_validity.spearman(a, b) == pytest.approx(expected, abs=1e-12)
  np.testing.assert_allclose(proxy_validity.rankdata(a), stats.rankdata(a) - 1)


def test_spearman_extremes():
  x = np.arange(10.0)
  assert proxy_validity.spearman(x, x**3) == pytest.approx(1.0)
  assert proxy_validity.spearman(x, -x) == pytest.approx(-1.0)
  assert np.isnan(proxy_validity.spearman(x, np.ones(10)))
