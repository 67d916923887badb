"""Tests for cimjax.policy: validation messages, constraints, masks, sampling and .npy I/O."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimjax import policy as pl

NAMES = ["conv1", "block1/conv_a", "block1/conv_b", "block2/conv_a", "fc"]


# ---------------------------------------------------------------------------------------------
# Validation.


def test_valid_policy_returns_int32():
  out = pl.validate_policy([[8, 8], [4, 3], [2, 2], [5, 7], [8, 8]], 5)
  assert out.dtype == np.int32 and out.shape == (5, 2)
  assert pl.validate_policy(np.array([[3.0, 4.0]]), 1).dtype == np.int32
  assert pl.validate_policy(jnp.array([[3, 4]]), None).tolist() == [[3, 4]]


@pytest.mark.parametrize(
  "policy,match",
  [
    (
      [[8, 8], [4, 9], [2, 2], [5, 7], [8, 8]],
      r"layer 1 \(block1/conv_a\): activation bits 9 outside the allowed range 2\.\.8",
    ),
    (
      [[8, 8], [4, 4], [2, 2], [1, 7], [8, 8]],
      r"layer 3 \(block2/conv_a\): weight bits 1 outside the allowed range 2\.\.8",
    ),
    (
      [[8, 8], [4, 4], [2.5, 2], [5, 7], [8, 8]],
      r"layer 2 \(block1/conv_b\): weight bits 2\.5 is not an integer",
    ),
    ([[8, 8], [4, 4]], r"policy has 2 layers; the model has 5"),
    ([8, 8, 8], r"policy has shape \[3\]; expected \[5, 2\]"),
    (np.zeros((5, 3), int), r"shape \[5, 3\]"),
    (np.array([["a", "b"]] * 5), r"must hold integers"),
    (np.ones((5, 2), bool), r"must hold integers"),
  ],
)
def test_validation_messages_name_the_layer(policy, match):
  with pytest.raises(pl.PolicyError, match=match):
    pl.validate_policy(policy, 5, layer_names=NAMES)


def test_layer_index_without_names_and_custom_range():
  with pytest.raises(
    pl.PolicyError, match=r"^layer 0: weight bits 9 outside the allowed range 1\.\.8$"
  ):
    pl.validate_policy([[9, 1]], 1, min_bits=1)
  assert pl.validate_policy([[16, 1]], 1, min_bits=1, max_bits=16)[0, 0] == 16


def test_constraint_violations():
  ok = [[8, 8], [4, 3], [8, 2], [4, 7], [8, 8]]
  pl.validate_policy(ok, 5, constraint="both", cell_bits=4)
  with pytest.raises(
    pl.PolicyError,
    match=r"layer 4 \(fc\): bits \(4, 8\) violate constraint "
    r"'io': the first and last layers must be \(8, 8\)",
  ):
    pl.validate_policy(ok[:4] + [[4, 8]], 5, constraint="io", layer_names=NAMES)
  with pytest.raises(
    pl.PolicyError,
    match=r"layer 1 \(block1/conv_a\): weight bits 5 violate "
    r"constraint 'weight': allowed weight bits 4, 8",
  ):
    pl.validate_policy(
      [[8, 8], [5, 3]] + ok[2:], 5, constraint="weight", cell_bits=4, layer_names=NAMES
    )
  # Forced layers are exempt from the cell rule under "both" (8 is not a multiple of 3).
  pl.validate_policy([[8, 8], [6, 2], [3, 5], [8, 8]], 4, constraint="both", cell_bits=3)
  with pytest.raises(pl.PolicyError, match="layer 0"):
    pl.validate_policy([[8, 8], [6, 2]], 2, constraint="weight", cell_bits=3)


def test_constraint_names_and_errors():
  assert pl.normalize_constraint(None) == "none"
  assert pl.normalize_constraint("both_constraints") == "both"
  assert pl.normalize_constraint("input_output_constraint") == "io"
  with pytest.raises(pl.PolicyError, match="constraint = 'all'; allowed: none, io, weight, both"):
    pl.action_mask(3, "all")
  with pytest.raises(pl.PolicyError, match="needs cell_bits"):
    pl.action_mask(3, "weight")
  with pytest.raises(
    pl.PolicyError, match="no weight bit-width in 2..8 is a multiple of cell_bits = 9"
  ):
    pl.action_mask(3, "weight", cell_bits=9)
  with pytest.raises(pl.PolicyError, match="io_bits = 8 outside"):
    pl.action_mask(3, "io", max_bits=4)


# ---------------------------------------------------------------------------------------------
# Masks.


@pytest.mark.parametrize(
  "constraint,cell_bits,per_layer",
  [
    ("none", None, [49] * 5),
    ("io", None, [1, 49, 49, 49, 1]),
    ("weight", 4, [14] * 5),
    ("weight", 2, [28] * 5),
    ("both", 4, [1, 14, 14, 14, 1]),
    ("both", 2, [1, 28, 28, 28, 1]),
  ],
)
def test_mask_counts(constraint, cell_bits, per_layer):
  mask = pl.action_mask(5, constraint, cell_bits=cell_bits)
  assert mask.shape == (5, 8, 8) and mask.dtype == bool
  assert mask.sum(axis=(1, 2)).tolist() == per_layer
  assert not mask[:, 0, :].any() and not mask[:, :, 0].any()  # 1 bit never allowed (2..8)
  if constraint in ("io", "both"):
    assert mask[0, 7, 7] and mask[-1, 7, 7]


def test_mask_policy_count_both_c4():
  mask = pl.action_mask(5, "both", cell_bits=4)
  assert np.prod(mask.sum(axis=(1, 2))) == 14**3 == 2744
  w_allowed = np.flatnonzero(mask[2].any(axis=1)) + 1
  assert w_allowed.tolist() == [4, 8]


def test_allowed_bits_and_single_layer():
  assert pl.allowed_bits(1, 3, "weight", cell_bits=2) == ((2, 4, 6, 8), tuple(range(2, 9)))
  assert pl.allowed_bits(0, 1, "io") == ((8,), (8,))
  assert pl.action_mask(1, "both", cell_bits=4).sum() == 1


# ---------------------------------------------------------------------------------------------
# Sampling.


# Few distinct shapes: random_policies compiles once per (L, n); the mask values are data.
@settings(max_examples=40, deadline=None)
@given(
  num_layers=st.sampled_from([1, 2, 5, 12]),
  constraint=st.sampled_from(pl.CONSTRAINTS),
  cell_bits=st.integers(1, 4),
  seed=st.integers(0, 2**31 - 1),
)
def test_random_policies_satisfy_validation(num_layers, constraint, cell_bits, seed):
  n = 6
  mask = pl.action_mask(num_layers, constraint, cell_bits=cell_bits)
  pols = pl.random_policies(jax.random.key(seed), mask, n)
  assert pols.shape == (n, num_layers, 2) and pols.dtype == jnp.int32
  for p in np.asarray(pols):
    pl.validate_policy(p, num_layers, constraint=constraint, cell_bits=cell_bits)
    assert mask[np.arange(num_layers), p[:, 0] - 1, p[:, 1] - 1].all()


def test_random_policies_uniform_over_allowed_pairs():
  mask = pl.action_mask(3, "both", cell_bits=4)
  pols = np.asarray(pl.random_policies(jax.random.key(0), mask, 14_000))
  assert (pols[:, 0] == 8).all() and (pols[:, 2] == 8).all()
  pairs, counts = np.unique(pols[:, 1], axis=0, return_counts=True)
  assert len(pairs) == 14
  assert np.abs(counts - 1000).max() < 150  # ~4.7 sigma for a binomial(14000, 1/14)


def test_random_policies_inside_jit():
  mask = pl.action_mask(4, "none")

  @jax.jit
  def f(key):
    return pl.random_policies(key, mask, 3).sum()

  assert int(f(jax.random.key(1))) > 0


def test_uniform_policy():
  p = pl.uniform_policy(4, 6, 5)
  assert p.dtype == np.int32 and p.tolist() == [[6, 5]] * 4
  with pytest.raises(pl.PolicyError, match="num_layers"):
    pl.uniform_policy(0)


# ---------------------------------------------------------------------------------------------
# Files.


def test_npy_round_trip(tmp_path):
  pol = np.array([[8, 8], [4, 3], [2, 6]], np.int32)
  path = pl.save_policy(tmp_path / "sub" / "p.npy", pol)
  assert path == tmp_path / "sub" / "p.npy"
  raw = np.load(path, allow_pickle=False)
  assert raw.dtype == np.int64 and raw.tolist() == pol.tolist()  # CIM-AQ files: int64 [L, 2]
  back = pl.load_policy(path, 3)
  assert back.dtype == np.int32 and (back == pol).all()
  pl.save_policy(path, pol[::-1])  # overwrite in place
  assert (pl.load_policy(path) == pol[::-1]).all()
  assert os.listdir(path.parent) == ["p.npy"]  # no temporary files left behind


def test_cim_aq_style_file_loads(tmp_path):
  # CIM-AQ writes np.save(path, np.array(strategy)) with Python ints.
  np.save(tmp_path / "cim_aq.npy", np.array([[8, 8], [4, 6], [8, 8]]))
  assert pl.load_policy(tmp_path / "cim_aq.npy", 3, constraint="both", cell_bits=4).tolist() == [
    [8, 8],
    [4, 6],
    [8, 8],
  ]


def test_pickled_and_object_files_are_rejected(tmp_path):
  obj = tmp_path / "obj.npy"
  np.save(obj, np.array([[8, 8], [4, {"x": 1}]], dtype=object), allow_pickle=True)
  with pytest.raises(pl.PolicyError, match="pickled or object data is refused"):
    pl.load_policy(obj)
  pkl = tmp_path / "pkl.npy"
  pkl.write_bytes(pickle.dumps([[8, 8]]))
  with pytest.raises(pl.PolicyError, match=str(pkl)):
    pl.load_policy(pkl)
  npz = tmp_path / "p.npz"
  np.savez(npz, p=np.array([[8, 8]]))
  with pytest.raises(pl.PolicyError, match="expected a .npy array"):
    pl.load_policy(npz)


def test_load_errors_name_file_and_layer(tmp_path):
  with pytest.raises(pl.PolicyError, match="policy file not found"):
    pl.load_policy(tmp_path / "missing.npy")
  path = pl.save_policy(tmp_path / "p.npy", [[8, 8], [9, 8]])
  with pytest.raises(pl.PolicyError, match=r"p\.npy: layer 1 \(fc\): weight bits 9"):
    pl.load_policy(path, 2, layer_names=["conv", "fc"])
  with pytest.raises(pl.PolicyError, match="policy has 2 layers; the model has 3"):
    pl.load_policy(path, 3, max_bits=16)


def test_save_rejects_bad_shapes(tmp_path):
  with pytest.raises(pl.PolicyError, match="shape"):
    pl.save_policy(tmp_path / "bad.npy", np.zeros((2, 3), int))
  assert not any(tmp_path.iterdir())
