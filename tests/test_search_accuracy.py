"""MemoAccuracy: each policy evaluated once, save/load round trip, stale memos refused."""

import numpy as np
import pytest

from cimjax import models, trace
from cimjax.search import accuracy as acc_lib


class Counting(acc_lib.SyntheticAccuracy):
  """Synthetic accuracy that records every policy it is asked to evaluate."""

  def __init__(self, specs):
    super().__init__(specs, seed=0)
    self._num_layers = len(specs)
    self.asked = []

  def __call__(self, policies):
    self.asked.extend(np.asarray(policies).reshape(-1, self._num_layers * 2).tolist())
    return super().__call__(policies)


@pytest.fixture(scope="module")
def specs():
  return trace.trace_specs(models.get_model("small_cnn"))


def _random_policies(n, num_layers, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(2, 9, size=(n, num_layers, 2)).astype(np.int32)


def test_memo_evaluates_each_policy_once_and_matches_inner(specs):
  inner = Counting(specs)
  memo = acc_lib.MemoAccuracy(inner)
  pols = _random_policies(20, len(specs), 0)
  batch = np.concatenate([pols, pols[:7], pols[3:5]])  # duplicates inside one call
  got = memo(batch)
  np.testing.assert_allclose(got, acc_lib.SyntheticAccuracy(specs, seed=0)(batch), rtol=1e-6)
  assert len(inner.asked) == len({tuple(p) for p in inner.asked}) == 20
  memo(pols[::-1])
  assert len(inner.asked) == 20 and memo.computed == 20 and len(memo) == 20


def test_memo_round_trip_and_stale_tag_refused(specs, tmp_path):
  memo = acc_lib.MemoAccuracy(Counting(specs))
  pols = _random_policies(12, len(specs), 1)
  want = memo(pols)
  path = tmp_path / "memo.npz"
  memo.save(path, tag="weights-A val[:1000]")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["memo.npz"]  # no temp file left
  inner = Counting(specs)
  fresh = acc_lib.MemoAccuracy(inner)
  assert fresh.load(path, tag="weights-A val[:1000]") == 12
  np.testing.assert_array_equal(fresh(pols), want)
  assert inner.asked == []  # all from the file
  with pytest.raises(ValueError, match="weights-B"):
    acc_lib.MemoAccuracy(Counting(specs)).load(path, tag="weights-B val[:1000]")
  with pytest.raises(ValueError, match="another source"):
    acc_lib.MemoAccuracy(Counting(specs)).load(path)  # untagged reader
  assert acc_lib.MemoAccuracy(Counting(specs)).load(tmp_path / "missing.npz") == 0
