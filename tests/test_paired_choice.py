"""The final re-evaluation's paired comparison with INT8 and the pipeline's choice on it."""

from __future__ import annotations

import math
import types

import ml_collections
import numpy as np
import pytest

from cimjax import stages
from cimjax.search import accuracy as acc_lib
from cimjax.search import runner

POLS = np.asarray(
  [
    [[8, 8]] * 5,
    [[8, 8], [3, 2], [2, 2], [4, 3], [8, 8]],
    [[8, 8], [2, 2], [2, 2], [2, 2], [8, 8]],
  ],
  np.int32,
)  # three candidates: the vmapped path pads the last chunk


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_correct_images_add_up_to_the_counts_and_the_accuracy(strategy, random_small_cnn):
  m, var, x, y = random_small_cnn(70)
  src = acc_lib.DataAccuracy(m, var, x, y, batch_size=32, strategy=strategy, chunk=2)
  hits = src.correct_images(POLS)
  assert hits.shape == (3, 70) and hits.dtype == bool  # padding rows (96 - 70) are gone
  np.testing.assert_array_equal(hits.sum(axis=1), src.chunk_correct(POLS, 0, 70))
  np.testing.assert_array_equal(100.0 * hits.sum(axis=1) / 70, src(POLS))  # bit for bit
  assert 0 < hits.sum() < hits.size  # a random model gets some images right, not all
  one = src.correct_images(POLS[1])  # one policy [L, 2]
  np.testing.assert_array_equal(one[0], hits[1])
  memo = acc_lib.MemoAccuracy(src)
  np.testing.assert_array_equal(memo.correct_images(POLS), hits)
  multi = acc_lib.MultiProcessAccuracy(src, block=2)  # one process: the split is the batch
  np.testing.assert_array_equal(multi.correct_images(POLS), hits)
  np.testing.assert_array_equal(multi(POLS), src(POLS))
  assert multi.correct_images(POLS[:0]).shape == (0, 70) and multi(POLS[:0]).shape == (0,)
  assert not hasattr(acc_lib.SyntheticAccuracy(_specs()), "correct_images")


def _specs():
  from cimjax import models, trace

  return trace.trace_specs(models.get_model("small_cnn"))


class _TableSource(acc_lib.AccuracySource):
  """A final source from a table of per-image results (``paired=False``: accuracy only)."""

  def __init__(self, table: dict[bytes, np.ndarray], paired: bool):
    self.table, self.name = table, "table"
    self.num_images = len(next(iter(table.values())))
    if paired:
      self.correct_images = lambda p: np.stack([self.table[q.tobytes()] for q in _as3(p)])

  def __call__(self, policies):
    return np.asarray([100.0 * self.table[q.tobytes()].mean() for q in _as3(policies)])


def _as3(p):
  p = np.asarray(p, np.int32)
  return p[None] if p.ndim == 2 else p


def _result(pols, rewards):
  hist = types.SimpleNamespace(
    policies=np.asarray(pols, np.int32),
    reward=np.asarray(rewards, np.float64),
    accuracy=np.full(len(pols), 90.0),
  )
  return types.SimpleNamespace(
    history=hist, evals_used=len(pols), space={"io_bits": 8}, acc_drop=1.0
  )


def test_paired_statistics_equal_a_per_image_oracle():
  rng = np.random.default_rng(3)
  n = 400
  ref = rng.random(n) < 0.9
  pols = [np.full((5, 2), b, np.int32) for b in (2, 3, 4, 6)]
  table = {np.full((5, 2), 8, np.int32).tobytes(): ref}
  for k, p in enumerate(pols):
    flip = rng.random(n) < 0.02 * (k + 1)  # candidates disagree with INT8 on a few images
    table[p.tobytes()] = np.where(flip, ~ref, ref)
  res = _result(pols, [5.0, 7.0, 1.0, 3.0])
  cost = np.ones((5, 9, 9))
  paired = runner.reevaluate(res, _TableSource(table, True), cost, top_k=4)
  plain = runner.reevaluate(res, _TableSource(table, False), cost, top_k=4)
  assert paired["paired"] and paired["images"] == n and "paired" not in plain
  assert paired["acc_ref"] == plain["acc_ref"] == 100.0 * ref.mean()
  for c, q in zip(paired["candidates"], plain["candidates"]):
    assert c["accuracy"] == q["accuracy"] and c["reward"] == q["reward"]
    h = table[np.asarray(c["policy"], np.int32).tobytes()]
    wins = sum(1 for i in range(n) if h[i] and not ref[i])
    losses = sum(1 for i in range(n) if ref[i] and not h[i])
    diff = (wins - losses) / n
    se = math.sqrt(((wins + losses) / n - diff**2) / n)  # McNemar's paired SE
    assert c["discordant"] == [wins, losses] and wins + losses > 0
    assert c["acc_diff"] == pytest.approx(100.0 * diff, abs=1e-9)
    assert c["diff_se"] == pytest.approx(100.0 * se, rel=1e-9)
  # the order is the search's (by search reward): 3, 2, 6, 4 bits
  assert [c["policy"][0][0] for c in paired["candidates"]] == [3, 2, 6, 4]


def _cand(bits, diff, se, speedup, target_ok=True):
  acc = 90.0 + diff
  return {
    "policy": np.full((5, 2), bits).tolist(),
    "accuracy": acc,
    "reward": 100.0 * (speedup - 1) if target_ok else -abs(diff),
    "feasible": target_ok,
    "speedup": speedup,
    "acc_diff": diff,
    "diff_se": se,
  }


def test_choice_needs_the_paired_lower_bound_to_clear_the_drop():
  final = {
    "name": "val_final",
    "acc_ref": 90.0,
    "acc_target": 89.5,
    "paired": True,
    "candidates": [
      _cand(2, -0.5, 0.3, 2.5),  # exactly at the target: clears it, not by a margin
      _cand(3, -0.2, 0.25, 2.2),  # lower bound -0.45: passes at 1 SE
      _cand(4, -0.1, 0.5, 2.4),  # lower bound -0.6 at 1 SE, -0.35 at 0.5 SE
      _cand(5, 0.0, 0.1, 1.5),
    ],
  }
  win = np.full((5, 2), 7, np.int32)
  pol, pick = stages.choose_policy(win, final, margin=1.0)
  assert (pol == 3).all() and pick["passed"] == 2 and pick["rank_in_search"] == 1
  assert pick["lower_bound"] == pytest.approx(-0.45) and pick["margin_se"] == 1.0
  assert "paired lower bound at 1 SE" in pick["by"]
  pol, pick = stages.choose_policy(win, final, margin=0.5)
  assert (pol == 4).all() and pick["passed"] == 3
  pol, pick = stages.choose_policy(win, final, margin=0.0)
  assert (pol == 2).all() and pick["passed"] == 4  # margin 0: the target alone
  none = dict(final, candidates=[final["candidates"][0], _cand(6, -0.9, 0.2, 3.0, False)])
  pol, pick = stages.choose_policy(win, none, margin=1.0)
  assert (pol == 2).all() and pick["passed"] == 0 and "none passes" in pick["by"]


def test_choice_without_paired_statistics_is_the_target_rule():
  final = {
    "name": "test",
    "acc_ref": 90.0,
    "acc_target": 89.5,
    "candidates": [_cand(2, -0.5, 0.3, 2.5), _cand(3, -0.2, 0.25, 2.2)],
  }
  pol, pick = stages.choose_policy(np.zeros((5, 2)), final, margin=3.0)
  assert (pol == 2).all() and pick["passed"] == 2 and "lower_bound" not in pick


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "x", True])
def test_bad_choose_margin_is_refused(bad):
  from cimjax import pipeline
  from cimjax.errors import ConfigError

  c = pipeline.default_config()
  stages.validate_search(c)  # the default (1.0) passes
  c.search.choose_margin = 0  # so does 0, the target alone
  stages.validate_search(c)
  d = c.to_dict()  # a config read from a file need not keep the default's type
  d["search"]["choose_margin"] = bad
  with pytest.raises(ConfigError, match="search.choose_margin"):
    stages.validate_search(ml_collections.ConfigDict(d))
