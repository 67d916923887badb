"""The reference work's Fashion-MNIST CNN brought by a user, through ``cimjax`` end to end.

The CNN of CIM-AQ (conv 1->32, conv 32->64 + pool, conv 64->128 + pool, dense 6272->256,
dense 256->10) is given twice, as a user would:

- a plain Flax module in the user's own file (``nn.Conv``/``nn.Dense``, no cimjax layer, no
  cimjax import), run as ``cimjax --config.train.model=file_module:factory`` from its folder;
- the same network written in PyTorch and exported with ``torch.onnx.export``, run as
  ``cimjax --config.train.model=ref_cnn.onnx`` (marked ``torch`` too).

Each run goes through every stage (fp32, int8, anyprec, search, finetune, evaluate, compile) on
the committed Fashion-MNIST subset with the tiny run's step counts, and must end with a
bit-exact compiled program; both models have the reference work's layer geometry, hence equal
cost tables. Slow (two whole runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cimjax import cost, models, trace
from cimjax import hw as hw_lib

pytestmark = [
  pytest.mark.slow,
  pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),
  pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
]

USER_FILE = textwrap.dedent(
  '''
  """A user's model file: plain Flax, nothing from cimjax."""
  import flax.linen as nn


  class RefCNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
      x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = nn.relu(nn.Conv(128, (3, 3), name="conv3")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(256, name="fc1")(x))
      return nn.Dense(self.num_classes, name="fc2")(x)


  def factory():
    return RefCNN(), (28, 28, 1)
  '''
)

USER_CONFIG = textwrap.dedent(
  """
  from train.run_tiny import get_config as tiny


  def get_config():
    c = tiny()
    c.train.model_kwargs = {}
    c.train.data.name = "fashion_mnist_subset"
    c.train.data.train_size = -1
    c.train.data.val_size = -1
    c.train.calib_images = 64
    c.search.search_images = 200
    return c
  """
)

# (kind, m, n, invocations): the reference work's table for this CNN on 28x28x1
REF_GEOMETRY = [
  ("Conv2D", 32, 9, 784),
  ("Conv2D", 64, 288, 784),
  ("Conv2D", 128, 576, 196),
  ("Dense", 256, 6272, 1),
  ("Dense", 10, 256, 1),
]


def _cimjax_cmd() -> list[str]:
  exe = shutil.which("cimjax")
  return [exe] if exe else [sys.executable, "-c", "from cimjax.cli.run import run; run()"]


def _run(repo_root: str, cwd: Path, model: str, workdir: Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo_root)
  proc = subprocess.run(
    [
      *_cimjax_cmd(),
      f"--config={cwd / 'user_config.py'}",
      f"--config.train.model={model}",
      f"--workdir={workdir}",
    ],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  compiled = json.loads((workdir / "compile" / "result.json").read_text())
  assert compiled["verify"]["ok"] and compiled["verify"]["logits_equal"], compiled["verify"]
  assert report["model"] == model
  return report


def _geometry(md) -> list[tuple]:
  return [(s.kind, s.m, s.n, s.invocations) for s in trace.trace_specs(md)]


@pytest.fixture()
def user_dir(tmp_path, repo_root):
  (tmp_path / "ref_cnn.py").write_text(USER_FILE)
  (tmp_path / "user_config.py").write_text(USER_CONFIG)
  return tmp_path


def test_plain_flax_reference_cnn_runs_end_to_end(user_dir, repo_root, monkeypatch):
  assert "cimjax" not in USER_FILE.split('"""', 2)[2]  # no cimjax layer in the user's source
  report = _run(repo_root, user_dir, "ref_cnn:factory", user_dir / "wd")
  monkeypatch.syspath_prepend(str(user_dir))
  md = models.resolve_model("ref_cnn:factory")
  assert _geometry(md) == REF_GEOMETRY
  assert len(report["policy"]) == 5
  assert report["speedup"] >= 1.0


@pytest.mark.torch
def test_pytorch_reference_cnn_through_onnx_runs_end_to_end(user_dir, repo_root, monkeypatch):
  pytest.importorskip("torch")
  pytest.importorskip("onnx")
  import torch

  from tests import test_onnx_torch as onnx_t

  torch.manual_seed(0)
  path = onnx_t.export(onnx_t.FashionCNN(), (1, 28, 28), user_dir / "ref_cnn.onnx")
  report = _run(repo_root, user_dir, "ref_cnn.onnx", user_dir / "wd_onnx")
  md_onnx = models.resolve_model(path)
  assert _geometry(md_onnx) == REF_GEOMETRY
  monkeypatch.syspath_prepend(str(user_dir))
  md_flax = models.resolve_model("ref_cnn:factory")
  hw = hw_lib.load_hw("rram_64_c2")
  t_onnx = cost.cost_tables(trace.trace_specs(md_onnx), hw, xp=np)
  t_flax = cost.cost_tables(trace.trace_specs(md_flax), hw, xp=np)
  pol = np.asarray(report["policy"])
  for field in ("latency_us", "energy_pj", "tiles"):
    assert cost.policy_cost(getattr(t_onnx, field), pol) == cost.policy_cost(
      getattr(t_flax, field), pol
    )
