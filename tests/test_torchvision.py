"""The real torchvision models as oracles: ONNX export -> import, and state dicts -> the zoo.

``tests/test_onnx_torch.py`` and ``tests/test_pretrained.py`` run hand-written torch modules with
torchvision's structure; here the same checks run on ``torchvision.models`` itself (random
initialisation: nothing is downloaded), imported through :mod:`tests._torchvision` (the CPU torch
wheel and PyPI's torchvision wheel). Checked:

- the hand-written mirrors' state-dict keys are torchvision's (so the cheaper tests stand in
  for torchvision exactly);
- reduced torchvision models (the real classes at small widths) exported by ``torch.onnx.export``
  import with logits equal to onnxruntime's and geometry equal to the zoo's;
- full-size ``resnet18``, ``vgg16``, ``vit_b_32`` (slow): ONNX import with logits equal to
  onnxruntime's, geometry equal to the zoo's, the same latency for saved ``.npy`` policies through
  ``python -m launch.cost`` with ``--model=FILE.onnx`` and with the zoo name, and torchvision's
  state dict loaded into the zoo model gives torch's logits.

Marked ``torch``; skipped without torch or torchvision.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import test_onnx_torch as onnx_t
from tests import test_pretrained as pre_t
from tests._torchvision import import_torchvision

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = [
  pytest.mark.torch,
  pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
  pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),
  pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
  pytest.mark.filterwarnings("ignore::UserWarning:torchvision.*"),
]

ZOO_OF = {"resnet18": "resnet18", "vgg16": "vgg16", "vit_b_32": "vit_b32"}


def _tv_full(name: str, num_classes: int = 1000):
  """torchvision's model at random init, with no all-zero weight matrix left.

  torchvision initialises the ViT's classification head to zeros: its logits would be the bias
  whatever the input, and every comparison of logits would pass trivially.
  """
  torch = sys.modules.get("torch") or pytest.importorskip("torch")
  net = getattr(import_torchvision().models, name)(weights=None, num_classes=num_classes)
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for p in net.parameters():
      if p.ndim >= 2 and not bool(p.any()):
        p.copy_(0.02 * torch.randn(p.shape, generator=g))
  return net


@pytest.mark.parametrize("name", sorted(ZOO_OF))
def test_mirror_keys_are_torchvision_keys(name):
  tv = import_torchvision()
  torch = sys.modules["torch"]
  with torch.device("meta"):
    net = getattr(tv.models, name)(weights=None)
  assert list(net.state_dict()) == pre_t.TV_KEYS[ZOO_OF[name]]()
  shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  mirror = {
    "resnet18": onnx_t.ResNet18,
    "vgg16": onnx_t.VGG16,
    "vit_b_32": onnx_t.ViT,
  }[name]
  with torch.device("meta"):
    m = mirror()
  # the ONNX-test mirrors name their modules like torchvision only in part (no "encoder."
  # prefix in the ViT), but every tensor shape of torchvision appears in them
  assert sorted(shapes.values()) == sorted(tuple(v.shape) for v in m.state_dict().values())


def _small_resnet18():
  tv = import_torchvision()
  from torchvision.models.resnet import BasicBlock, ResNet

  del tv
  return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10)


def _small_vit():
  import_torchvision()
  from torchvision.models.vision_transformer import VisionTransformer

  return VisionTransformer(
    image_size=64,
    patch_size=32,
    num_layers=1,
    num_heads=4,
    hidden_dim=64,
    mlp_dim=128,
    num_classes=10,
  )


@pytest.mark.slow  # ~60 s on 2 cores; the ViT below covers the default suite
def test_torchvision_resnet18_small_input_import(tmp_path):
  """The real torchvision ResNet-18 at 32x32, 10 classes: logits, geometry, cost."""
  md, specs = onnx_t._check_zoo_model(
    tmp_path,
    _small_resnet18(),
    "resnet18",
    (3, 32, 32),
    tol=1e-5,
    image_size=32,
    num_classes=10,
  )
  assert len(specs) == 21 and md.num_classes == 10


def test_torchvision_vit_small_import(tmp_path):
  """torchvision's VisionTransformer class at 64x64, one block: the attention path."""
  kw = dict(image_size=64, depth=1, hidden=64, num_heads=4, mlp_dim=128, num_classes=10)
  _, specs = onnx_t._check_zoo_model(tmp_path, _small_vit(), "vit_b32", (3, 64, 64), tol=1e-5, **kw)
  assert [s.kind for s in specs[:4]] == ["Conv2D", "Dense", "MatMul", "MatMul"]


def _cost_cli(model: str, policy: str) -> dict:
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.cost",
      f"--model={model}",
      "--hw=rram_256_c4",
      f"--policy={policy}",
      "--json",
    ],
    capture_output=True,
    text=True,
    check=True,
    timeout=600,
  )
  return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO_OF))
def test_full_size_torchvision_onnx_import_and_cost_cli(name, tmp_path):
  md, specs = onnx_t._check_zoo_model(
    tmp_path, _tv_full(name), ZOO_OF[name], (3, 224, 224), tol=1e-4, policies=2
  )
  assert len(specs) == {"resnet18": 21, "vgg16": 16, "vit_b_32": 74}[name]
  path = tmp_path / f"{ZOO_OF[name]}.onnx"
  pol = np.random.default_rng(7).integers(1, 9, (len(specs), 2))
  np.save(tmp_path / "ref_policy.npy", pol)
  got = _cost_cli(str(path), str(tmp_path / "ref_policy.npy"))
  want = _cost_cli(ZOO_OF[name], str(tmp_path / "ref_policy.npy"))
  for field in ("total_latency_us", "baseline_latency_us", "speedup", "total_energy_pj"):
    assert got[field] == want[field], (field, got[field], want[field])
  assert [r["latency_us"] for r in got["layers"]] == [r["latency_us"] for r in want["layers"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO_OF))
def test_full_size_torchvision_state_dict_into_zoo(name, tmp_path, monkeypatch):
  """torchvision's own module -> safetensors -> the zoo model: torch's float logits."""
  pytest.importorskip("safetensors")
  torch = sys.modules["torch"]
  net = pre_t._randomize(_tv_full(name), 1)
  with torch.no_grad():  # the logits depend on the image (no constant head)
    out = net(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
  assert float((out[0] - out[1]).abs().max()) > 1e-3 * float(out.abs().max())
  monkeypatch.setattr(pre_t, "_torch_net", lambda *a, **k: net)
  sd = pre_t._compare(ZOO_OF[name], True, 224, 1000, tmp_path, batch=2)
  assert list(sd) == pre_t.TV_KEYS[ZOO_OF[name]]()
