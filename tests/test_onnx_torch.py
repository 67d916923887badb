"""ONNX import of models exported by ``torch.onnx.export`` (opset 17, TorchScript exporter).

The models are hand-written ``nn.Module``s with the layer shapes of torchvision's ``resnet18``,
``vgg16`` and ``vit_b_32`` (torchvision's wheels do not pair reliably with the CPU torch wheel;
nothing is downloaded: random init) and the reference work's Fashion-MNIST CNN. Each file is
imported, its float logits are compared with onnxruntime's, and its layer geometry with the zoo
model's, so the reference work's policies and the cost model apply to the imported model
unchanged. Marked ``torch`` (skipped without torch); the full-size models are also ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

from cimjax import cost, models, trace  # noqa: E402
from cimjax import hw as hw_lib  # noqa: E402
from cimjax import onnx as connx  # noqa: E402
from cimjax import policy as policy_lib  # noqa: E402

pytestmark = [
  pytest.mark.torch,
  pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
  pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),
  pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
]

# ----------------------------------------------------------------------------------------------
# torchvision-shaped models (same modules, names and forward as torchvision 0.2x)


class BasicBlock(nn.Module):
  def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet18(nn.Module):
  """torchvision.models.resnet18 (BasicBlock, [2, 2, 2, 2])."""

  def __init__(self, num_classes: int = 1000) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    layers, inplanes = [], 64
    for i, planes in enumerate((64, 128, 256, 512)):
      stride = 1 if i == 0 else 2
      layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
      inplanes = planes
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG16(nn.Module):
  """torchvision.models.vgg16 (configuration D, no batch norm)."""

  CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

  def __init__(self, num_classes: int = 1000) -> None:
    super().__init__()
    feats, c = [], 3
    for v in self.CFG:
      if v == "M":
        feats.append(nn.MaxPool2d(2, 2))
      else:
        feats += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
        c = v
    self.features = nn.Sequential(*feats)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
      nn.Linear(512 * 7 * 7, 4096),
      nn.ReLU(True),
      nn.Dropout(),
      nn.Linear(4096, 4096),
      nn.ReLU(True),
      nn.Dropout(),
      nn.Linear(4096, num_classes),
    )

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EncoderBlock(nn.Module):
  def __init__(self, heads: int, hidden: int, mlp: int) -> None:
    super().__init__()
    self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
    self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
    self.dropout = nn.Dropout(0.0)
    self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
    self.mlp = nn.Sequential(
      nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, hidden), nn.Dropout(0.0)
    )

  def forward(self, x):
    y = self.ln_1(x)
    y, _ = self.self_attention(y, y, y, need_weights=False)
    x = x + self.dropout(y)
    return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
  """torchvision.models.vit_b_32 (patch 32, 12 layers, 12 heads, 768 wide, MLP 3072)."""

  def __init__(
    self,
    image_size: int = 224,
    patch: int = 32,
    layers: int = 12,
    heads: int = 12,
    hidden: int = 768,
    mlp: int = 3072,
    num_classes: int = 1000,
  ) -> None:
    super().__init__()
    self.patch_size, self.hidden_dim = patch, hidden
    self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
    self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
    seq = (image_size // patch) ** 2 + 1
    self.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden).normal_(std=0.02))
    self.layers = nn.Sequential(*[EncoderBlock(heads, hidden, mlp) for _ in range(layers)])
    self.ln = nn.LayerNorm(hidden, eps=1e-6)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x):
    n = x.shape[0]
    x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
    x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
    x = self.ln(self.layers(x))
    return self.head(x[:, 0])


class FashionCNN(nn.Module):
  """The reference work's Fashion-MNIST CNN: conv 1->32, conv 32->64 + pool, conv 64->128 +
  pool, dense 6272->256, dense 256->10."""

  def __init__(self) -> None:
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
    self.pool = nn.MaxPool2d(2)
    self.fc1 = nn.Linear(6272, 256)
    self.fc2 = nn.Linear(256, 10)

  def forward(self, x):
    x = torch.relu(self.conv1(x))
    x = self.pool(torch.relu(self.conv2(x)))
    x = self.pool(torch.relu(self.conv3(x)))
    return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


# ----------------------------------------------------------------------------------------------


def export(module: nn.Module, shape, path, *, dynamic: bool = True) -> str:
  """``torch.onnx.export`` (TorchScript exporter, opset 17) of a random-init model."""
  module.eval()
  x = torch.randn(2, *shape)
  kw = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
  torch.onnx.export(
    module,
    (x,),
    str(path),
    opset_version=17,
    dynamo=False,
    input_names=["input"],
    output_names=["logits"],
    dynamic_axes=kw,
  )
  return str(path)


def compare_with_ort(path: str, md, batch: int = 2, seed: int = 0):
  """Max |cimjax - onnxruntime| and max |onnxruntime| of the float logits on random images."""
  v = connx.import_variables(md)
  x = np.random.default_rng(seed).normal(size=(batch, *md.input_shape)).astype(np.float32)
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  ref = sess.run(None, {sess.get_inputs()[0].name: x.transpose(0, 3, 1, 2)})[0]
  out = np.asarray(models.forward(md.module, v, jnp.asarray(x))[0])
  return float(np.abs(out - ref).max()), float(np.abs(ref).max()), v


GEOMETRY = (
  "kind",
  "m",
  "n",
  "invocations",
  "repeat",
  "in_channels",
  "out_channels",
  "kernel",
  "stride",
  "groups",
  "input_size",
  "signed_input",
)


def geometry(specs):
  return [tuple(getattr(s, f) for f in GEOMETRY) for s in specs]


def test_fashion_cnn_export_import_matches_onnxruntime_and_hand_table(tmp_path):
  torch.manual_seed(0)
  path = export(FashionCNN(), (1, 28, 28), tmp_path / "fashion_cnn.onnx")
  md = connx.import_model(path)
  assert md.input_shape == (28, 28, 1) and md.num_classes == 10
  err, scale, _ = compare_with_ort(path, md, batch=3)
  assert err <= 1e-5 * max(scale, 1.0), (err, scale)
  specs = trace.trace_specs(md)
  assert [s.name for s in specs] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
  assert [(s.kind, s.m, s.n, s.invocations, s.repeat, s.signed_input) for s in specs] == [
    ("Conv2D", 32, 9, 784, 1, True),
    ("Conv2D", 64, 288, 784, 1, False),
    ("Conv2D", 128, 576, 196, 1, False),
    ("Dense", 256, 6272, 1, 1, False),
    ("Dense", 10, 256, 1, 1, False),
  ]


def _check_zoo_model(tmp_path, module, zoo_name, shape, *, tol, policies=4, **zoo_kw):
  torch.manual_seed(0)
  path = export(module, shape, tmp_path / f"{zoo_name}.onnx")
  md = connx.import_model(path)
  err, scale, _ = compare_with_ort(path, md, batch=2)
  assert err <= tol * max(scale, 1.0), (err, scale)
  got = trace.trace_specs(md)
  zoo = trace.trace_specs(models.get_model(zoo_name, **zoo_kw))
  assert geometry(got) == geometry(zoo)
  hw = hw_lib.load_hw("rram_256_c4")
  t_got, t_zoo = cost.cost_tables(got, hw, xp=np), cost.cost_tables(zoo, hw, xp=np)
  rng = np.random.default_rng(0)
  for i in range(policies):  # policies saved and loaded as the reference work's .npy files
    pol = rng.integers(2, 9, (len(zoo), 2))
    f = policy_lib.save_policy(tmp_path / f"p{i}.npy", pol)
    pol = policy_lib.load_policy(f, len(got), layer_names=[s.name for s in got])
    for field in ("latency_us", "energy_pj", "tiles"):
      a = cost.policy_cost(getattr(t_got, field), pol)
      b = cost.policy_cost(getattr(t_zoo, field), pol)
      assert a == b, (field, a, b)
  return md, got


@pytest.mark.slow
def test_resnet18_import_matches_zoo_geometry_and_cost(tmp_path):
  md, specs = _check_zoo_model(tmp_path, ResNet18(), "resnet18", (3, 224, 224), tol=1e-4)
  assert len(specs) == 21
  # the projection shortcut of a downsampling block claims its row before the main path
  assert [s.kernel for s in specs[5:8]] == [(1, 1), (3, 3), (3, 3)]


@pytest.mark.slow
def test_vgg16_import_matches_zoo_geometry_and_cost(tmp_path):
  _, specs = _check_zoo_model(tmp_path, VGG16(), "vgg16", (3, 224, 224), tol=1e-4)
  assert len(specs) == 16


@pytest.mark.slow
def test_vit_b32_import_matches_zoo_geometry_and_cost(tmp_path):
  _, specs = _check_zoo_model(tmp_path, ViT(), "vit_b32", (3, 224, 224), tol=1e-4)
  assert len(specs) == 74
  assert [s.kind for s in specs[1:7]] == ["Dense", "MatMul", "MatMul", "Dense", "Dense", "Dense"]


def test_small_vit_import_matches_zoo_geometry(tmp_path):
  """A 1-block ViT (torch MultiheadAttention) at 64x64: the attention path in seconds."""
  vit = ViT(image_size=64, layers=1, heads=4, hidden=64, mlp=128, num_classes=10)
  kw = dict(image_size=64, depth=1, hidden=64, num_heads=4, mlp_dim=128, num_classes=10)
  md, specs = _check_zoo_model(tmp_path, vit, "vit_b32", (3, 64, 64), tol=1e-5, **kw)
  assert [s.signed_input for s in specs] == [True, True, True, False, True, True, True, True]
