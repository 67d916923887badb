"""Corrupt checkpoints: detected on restore, reported, and skipped for the newest intact one."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cimjax import checkpoint
from cimjax.errors import CheckpointError, CorruptCheckpointError


def _state(k):
  return {"w": jnp.arange(1000.0) + k, "b": jnp.full((20, 30), float(k)), "step": jnp.int32(k)}


def _flip(directory, step, which="d/"):
  files = [f for f in glob.glob(f"{directory}/{step}/**", recursive=True) if os.path.isfile(f)]
  hit = [f for f in files if which in f]
  assert hit, files
  for f in hit:
    b = bytearray(open(f, "rb").read())
    for i in range(0, len(b), 7):
      b[i] ^= 0xFF
    open(f, "wb").write(bytes(b))


@pytest.fixture
def ckpt(tmp_path):
  c = checkpoint.Checkpointer(tmp_path / "c", max_to_keep=3)
  for k in (1, 2, 3):
    c.save(k, _state(k), {"k": k})
  yield c
  c.close()


def test_intact_restore_checks_the_digest_and_returns_the_newest(ckpt):
  step, state, meta = ckpt.restore_intact(_state(0))
  assert step == 3 and meta == {"k": 3}  # the digest is not handed back in meta
  np.testing.assert_array_equal(state["w"], np.arange(1000.0) + 3)


def test_flipped_data_bytes_fall_back_to_the_previous_step(ckpt, caplog):
  _flip(ckpt.directory, 3)
  with pytest.raises(CorruptCheckpointError, match="checkpoint 3 is corrupt"):
    ckpt.restore(_state(0), 3)
  step, state, _ = ckpt.restore_intact(_state(0))
  assert step == 2
  np.testing.assert_array_equal(state["b"], np.full((20, 30), 2.0))
  assert any("checkpoint 3 is corrupt" in r.getMessage() for r in caplog.records)


def test_corrupt_metadata_counts_as_corrupt(ckpt):
  _flip(ckpt.directory, 3, which="meta")
  assert ckpt.restore_intact(_state(0))[0] == 2


def test_no_intact_checkpoint_left_gives_none(ckpt):
  for k in (1, 2, 3):
    _flip(ckpt.directory, k)
  assert ckpt.restore_intact(_state(0)) is None


def test_arrays_that_disagree_with_their_digest_are_corrupt(tmp_path):
  c = checkpoint.Checkpointer(tmp_path / "c")
  c.save(1, _state(1))
  # Written behind the Checkpointer's back: values that the stored digest does not describe.
  meta = {checkpoint.DIGEST_KEY: checkpoint.tree_digest(_state(1))}
  args = ocp.args.Composite(state=ocp.args.StandardSave(_state(5)), meta=ocp.args.JsonSave(meta))
  c._manager.save(2, args=args, force=True)
  c._manager.wait_until_finished()
  with pytest.raises(CorruptCheckpointError, match="digest"):
    c.restore(_state(0), 2)
  assert c.restore_intact(_state(0))[0] == 1
  c.close()


def test_a_mismatched_target_is_not_mistaken_for_corruption(ckpt):
  with pytest.raises(CheckpointError) as e:
    ckpt.restore_intact({"w": jnp.zeros(3)})
  assert not isinstance(e.value, CorruptCheckpointError)


def test_tree_digest_sees_values_dtypes_and_keys():
  d = checkpoint.tree_digest
  base = d(_state(1))
  assert base == d(_state(1))
  assert base != d(_state(2))
  assert base != d({**_state(1), "step": jnp.float32(1)})
  assert base != d({"v": _state(1)["w"], "b": _state(1)["b"], "step": _state(1)["step"]})
  assert d({"k": jax.random.key(0)}) != d({"k": jax.random.key(1)})


def test_a_64_bit_numpy_state_is_not_mistaken_for_corruption(tmp_path):
  """Without jax_enable_x64 float64/int64 arrays read back 32-bit; the digest is taken so."""
  c = checkpoint.Checkpointer(tmp_path / "c")
  state = {"w": np.random.default_rng(0).normal(size=500), "i": np.arange(7, dtype=np.int64)}
  c.save(1, state)
  restored, _ = c.restore({"w": np.zeros(500), "i": np.zeros(7, np.int64)}, 1)
  np.testing.assert_array_equal(restored["w"], state["w"].astype(np.float32))
  c.close()
