"""Atomic writes leave the old file intact when the writer fails."""

import json

import numpy as np
import pytest

from cimjax import io


def test_write_json_roundtrip_and_numpy(tmp_path):
  p = io.write_json(tmp_path / "sub" / "r.json", {"a": np.float32(1.5), "b": np.arange(3)})
  assert json.loads(p.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
  assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
  p = tmp_path / "r.json"
  io.write_json(p, {"ok": 1})
  with pytest.raises(ValueError):
    io.write_json(p, {"bad": float("nan")})
  with pytest.raises(RuntimeError):
    with io.atomic_path(p) as tmp:
      tmp.write_text("half")
      raise RuntimeError("crash")
  assert json.loads(p.read_text()) == {"ok": 1}
  assert [f.name for f in tmp_path.iterdir()] == ["r.json"]
