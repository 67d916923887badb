"""Tests of cimjax.models.pretrained: torchvision state dicts into the zoo's ResNet/VGG/ViT.

The oracle is torch (CPU) running hand-written modules with torchvision's module structure and
names (``resnet18``, ``vgg16``, ``vit_b_32`` of torchvision/models/{resnet,vgg,
vision_transformer}.py; torchvision itself is not installed): their ``state_dict()`` keys equal
torchvision's, which is checked against the key lists written out below. Tests needing torch
are marked ``torch`` and skipped without it; the full-size checks are also ``slow``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import types
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cimjax import data, train
from cimjax.errors import CimjaxError, ConfigError, WeightsError
from cimjax.models import ModelDef, forward, get_model
from cimjax.models import pretrained as pt
from cimjax.models.resnet import ResNet
from cimjax.models.vgg import VGG16_CFG
from cimjax.models.vit import ViT
from cimjax.variables import abstract_variables, load_variables

REPO = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4  # max |logits_zoo - logits_torch| / max |logits_torch|, full-size models
# Reduced models: measured <= 1e-6; tanh-approximate GELU in the ViT gives 9e-5, so this bound
# (not REL_TOL) is what tells exact from approximate GELU.
TIGHT_TOL = 1e-5

# Reduced zoo models with the torchvision structure (same key names, smaller tensors).
TINY_VGG_CFG = (8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M")


def tiny_resnet18(image_size: int = 64, num_classes: int = 10) -> ModelDef:
  module = ResNet((2, 2, 2, 2), (8, 16, 32, 64), "imagenet", 8, num_classes)
  return ModelDef("resnet18_tiny", module, (image_size, image_size, 3), num_classes)


def tiny_vgg16(image_size: int = 96, num_classes: int = 10) -> ModelDef:
  return dataclasses.replace(
    get_model(
      "vgg16",
      num_classes=num_classes,
      image_size=image_size,
      cfg=TINY_VGG_CFG,
      hidden=(24, 24),
    ),
    name="vgg16_tiny",
  )


def tiny_vit(image_size: int = 64, num_classes: int = 10, depth: int = 2) -> ModelDef:
  module = ViT(patch=16, hidden=48, depth=depth, num_heads=4, mlp_dim=96, num_classes=num_classes)
  return ModelDef("vit_tiny", module, (image_size, image_size, 3), num_classes)


# ------------------------------------------------------------------- torchvision's key lists


def _bn(p: str) -> list[str]:
  return [f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var")] + [
    f"{p}.num_batches_tracked"
  ]


def tv_resnet18_keys() -> list[str]:
  """torchvision resnet18: conv1, bn1, layer1-4 of two BasicBlocks (conv1, bn1, conv2, bn2,
  downsample = Sequential(conv1x1, BatchNorm2d) in the first block of layers 2-4), fc."""
  keys = ["conv1.weight", *_bn("bn1")]
  for i in range(1, 5):
    for j in range(2):
      p = f"layer{i}.{j}"
      keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
      if i > 1 and j == 0:
        keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
  return keys + ["fc.weight", "fc.bias"]


def tv_vgg16_keys() -> list[str]:
  """torchvision vgg16: features = Sequential of Conv2d, ReLU and MaxPool2d (convs at these
  indices), classifier = Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear."""
  convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
  keys = [f"features.{i}.{s}" for i in convs for s in ("weight", "bias")]
  return keys + [f"classifier.{i}.{s}" for i in (0, 3, 6) for s in ("weight", "bias")]


def tv_vit_keys(depth: int = 12) -> list[str]:
  """torchvision vit_b_32: class_token, conv_proj, encoder (pos_embedding, layers.encoder_layer_i
  with ln_1, self_attention (MultiheadAttention), ln_2, mlp = MLP(Linear, GELU, Dropout,
  Linear, Dropout)), encoder.ln, heads.head."""
  keys = ["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"]
  for i in range(depth):
    p = f"encoder.layers.encoder_layer_{i}"
    for s in (
      "ln_1.weight",
      "ln_1.bias",
      "self_attention.in_proj_weight",
      "self_attention.in_proj_bias",
      "self_attention.out_proj.weight",
      "self_attention.out_proj.bias",
      "ln_2.weight",
      "ln_2.bias",
      "mlp.0.weight",
      "mlp.0.bias",
      "mlp.3.weight",
      "mlp.3.bias",
    ):
      keys.append(f"{p}.{s}")
  return keys + ["encoder.ln.weight", "encoder.ln.bias", "heads.head.weight", "heads.head.bias"]


TV_KEYS = {"resnet18": tv_resnet18_keys, "vgg16": tv_vgg16_keys, "vit_b32": tv_vit_keys}
TV_COUNTS = {"resnet18": 122, "vgg16": 32, "vit_b32": 152}  # len(model.state_dict())


def random_state_dict(model: ModelDef, seed: int = 0) -> dict[str, np.ndarray]:
  """A state dict with torchvision's keys and shapes for ``model`` (no torch needed)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for e in pt.torchvision_mapping(model):
    if e.key.endswith("running_var"):
      sd[e.key] = rng.uniform(0.5, 1.5, e.torch_shape).astype(np.float32)
    elif e.key.endswith("num_batches_tracked"):
      sd[e.key] = np.asarray(7, np.int64)
    else:
      sd[e.key] = rng.standard_normal(e.torch_shape).astype(np.float32)
  return sd


def _flat(tree):
  return traverse_util.flatten_dict(tree)


# ----------------------------------------------------------------- the mapping (no torch)


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "vit_b32"])
def test_mapping_consumes_torchvision_keys_once(name):
  model = get_model(name)
  entries = pt.torchvision_mapping(model)
  keys = [e.key for e in entries]
  assert len(keys) == len(set(keys)) == TV_COUNTS[name]
  assert sorted(keys) == sorted(TV_KEYS[name]())  # the order is the zoo's call order
  # every zoo variable but the clip tables is filled by exactly one key
  targets = [e.target for e in entries if e.target]
  assert len(targets) == len(set(targets))
  zoo = {k for k in _flat(abstract_variables(model)) if k[-1] not in pt.CLIP_NAMES}
  assert set(targets) == zoo


def test_mapping_shapes_are_torchvision_shapes():
  shapes = {
    "resnet18": {"conv1.weight": (64, 3, 7, 7), "layer4.0.downsample.0.weight": (512, 256, 1, 1)},
    "vgg16": {"classifier.0.weight": (4096, 25088), "features.28.weight": (512, 512, 3, 3)},
    "vit_b32": {
      "conv_proj.weight": (768, 3, 32, 32),
      "class_token": (1, 1, 768),
      "encoder.pos_embedding": (1, 50, 768),
      "encoder.layers.encoder_layer_11.self_attention.in_proj_weight": (2304, 768),
      "encoder.layers.encoder_layer_0.mlp.0.weight": (3072, 768),
      "heads.head.weight": (1000, 768),
    },
  }
  for name, want in shapes.items():
    got = {e.key: e.torch_shape for e in pt.torchvision_mapping(get_model(name))}
    assert {k: got[k] for k in want} == want


def test_adaptive_pool_matrix():
  np.testing.assert_array_equal(pt.adaptive_pool_matrix(7, 7), np.eye(7))
  np.testing.assert_array_equal(pt.adaptive_pool_matrix(1, 7), np.ones((7, 1)))
  m = pt.adaptive_pool_matrix(3, 7)  # torch: windows [0,1) [0,1) [0,2) [1,2) [1,3) [2,3) [2,3)
  np.testing.assert_allclose(m[2], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(m.sum(axis=1), 1.0)


def test_vgg_fc1_at_224_is_the_chw_to_hwc_reordering():
  model = get_model("vgg16", cfg=TINY_VGG_CFG, hidden=(4, 4), num_classes=3)
  (e,) = [e for e in pt.torchvision_mapping(model) if e.key == "classifier.0.weight"]
  w = np.random.default_rng(0).standard_normal(e.torch_shape).astype(np.float32)  # [4, 32*49]
  k = e.convert(w)
  want = w.reshape(4, 32, 7, 7).transpose(2, 3, 1, 0).reshape(49 * 32, 4)
  np.testing.assert_allclose(k, want, rtol=1e-6)


def test_unsupported_model():
  with pytest.raises(WeightsError, match="small_cnn.*no torchvision mapping for SmallCNN"):
    pt.torchvision_mapping(get_model("small_cnn"))


# --------------------------------------------------------------- loading and errors (no torch)


@pytest.fixture(scope="module")
def resnet():
  return tiny_resnet18(image_size=32)


@pytest.fixture(scope="module")
def resnet_sd(resnet):
  return random_state_dict(resnet)


def test_load_layouts_and_clip_tables(resnet, resnet_sd, tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  path = tmp_path / "r18.safetensors"
  st.save_file(resnet_sd, str(path))
  v = pt.load_torchvision(resnet, path)
  v2 = pt.load_torchvision(resnet, resnet_sd)
  jax.tree.map(np.testing.assert_array_equal, v, v2)
  # same tree and shapes as the model's init
  want = jax.tree.map(lambda a: a.shape, abstract_variables(resnet))
  assert jax.tree.map(lambda a: a.shape, v) == want
  p, bs = v["params"], v["batch_stats"]
  sd = resnet_sd
  np.testing.assert_array_equal(
    p["stage2_block1"]["conv_a"]["kernel"], sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    p["stage2_block1"]["shortcut"]["kernel"],
    sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(p["stage3_block2"]["bn_b"]["scale"], sd["layer3.1.bn2.weight"])
  np.testing.assert_array_equal(
    bs["stage2_block1"]["shortcut_bn"]["var"], sd["layer2.0.downsample.1.running_var"]
  )
  np.testing.assert_array_equal(bs["bn1"]["mean"], sd["bn1.running_mean"])
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(p["fc"]["bias"], sd["fc.bias"])
  # clip tables: the layers' own init for these weights (max |w| per output channel)
  w_max = np.abs(sd["layer1.0.conv2.weight"]).max(axis=(1, 2, 3))
  np.testing.assert_array_equal(p["stage1_block1"]["conv_b"]["w_clip"], np.tile(w_max, (8, 1)))
  np.testing.assert_array_equal(p["conv1"]["a_clip"], np.full(8, 3.0, np.float32))  # signed
  np.testing.assert_array_equal(p["fc"]["a_clip"], np.full(8, 6.0, np.float32))  # after ReLU


def _one_line_error(model, sd, match, **kw):
  with pytest.raises(WeightsError, match=match) as info:
    pt.load_torchvision(model, sd, **kw)
  assert "\n" not in str(info.value) and isinstance(info.value, CimjaxError)
  return str(info.value)


def test_wrong_shape_missing_and_unused_keys(resnet, resnet_sd):
  sd = dict(resnet_sd)
  sd["layer1.0.conv1.weight"] = np.zeros((8, 8, 1, 3), np.float32)
  msg = _one_line_error(resnet, sd, r"'layer1\.0\.conv1\.weight' has shape \(8, 8, 1, 3\)")
  assert "expects (8, 8, 3, 3)" in msg and "stage1_block1/conv_a/kernel" in msg
  # a wrong shape is an error in non-strict mode too
  _one_line_error(resnet, sd, "layer1.0.conv1.weight", strict=False)
  sd = {k: v for k, v in resnet_sd.items() if k not in ("fc.bias", "bn1.running_mean")}
  _one_line_error(resnet, sd, r"missing key 'bn1\.running_mean' \(and 1 more\)")
  sd = {**resnet_sd, "layer5.0.conv1.weight": np.zeros((1,), np.float32)}
  _one_line_error(resnet, sd, r"unexpected key 'layer5\.0\.conv1\.weight'")
  # num_batches_tracked is optional (older torch files lack it)
  sd = {k: v for k, v in resnet_sd.items() if not k.endswith("num_batches_tracked")}
  pt.load_torchvision(resnet, sd)


def test_non_strict_and_exclude(resnet, resnet_sd):
  sd = {k: v for k, v in resnet_sd.items() if k != "fc.bias"}
  sd["extra"] = np.zeros(3, np.float32)
  v = pt.load_torchvision(resnet, sd, strict=False)
  np.testing.assert_array_equal(v["params"]["fc"]["bias"], np.zeros(10, np.float32))  # its init
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], resnet_sd["fc.weight"].T)
  # a new head: ImageNet's 1000-class fc excluded, the rest strict
  sd = {**resnet_sd, "fc.weight": np.zeros((1000, 64), np.float32), "fc.bias": np.zeros(1000)}
  _one_line_error(resnet, sd, "'fc.weight' has shape")
  v = pt.load_torchvision(resnet, sd, exclude=("fc.",), key=3)
  assert v["params"]["fc"]["kernel"].shape == (64, 10)
  assert float(jnp.abs(v["params"]["fc"]["kernel"]).sum()) > 0  # randomly initialised
  np.testing.assert_array_equal(
    v["params"]["conv1"]["kernel"], resnet_sd["conv1.weight"].transpose(2, 3, 1, 0)
  )


def test_files(resnet, resnet_sd, tmp_path):
  with pytest.raises(WeightsError, match="nope.safetensors: no such weights file"):
    pt.load_torchvision(resnet, tmp_path / "nope.safetensors")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
  with pytest.raises(WeightsError, match="bad.safetensors: not a readable .safetensors file"):
    pt.load_torchvision(resnet, bad)
  other = tmp_path / "w.npz"
  other.write_bytes(b"")
  with pytest.raises(WeightsError, match=r"w\.npz: unknown weights format '\.npz'"):
    pt.load_torchvision(resnet, other)
  with pytest.raises(WeightsError, match="key 'model' holds a dict, not a tensor"):
    pt.load_torchvision(resnet, {"model": dict(resnet_sd), "epoch": 3})


def test_pth_without_torch(resnet, tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"PK")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(WeightsError, match=r"w\.pth: reading a torch file needs torch"):
    pt.load_torchvision(resnet, path)


def test_vit_legacy_mlp_names():
  model = tiny_vit(depth=1)
  sd = random_state_dict(model)
  rename = lambda k: k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2.")
  legacy = {rename(k): v for k, v in sd.items()}
  assert "encoder.layers.encoder_layer_0.mlp.linear_1.weight" in legacy
  v = pt.load_torchvision(model, legacy)
  np.testing.assert_array_equal(
    v["params"]["block1"]["mlp2"]["kernel"], sd["encoder.layers.encoder_layer_0.mlp.3.weight"].T
  )
  both = {**sd, "encoder.layers.encoder_layer_0.mlp.linear_1.bias": np.zeros(96, np.float32)}
  _one_line_error(model, both, "'.*mlp.0.bias' and '.*mlp.linear_1.bias' are the same tensor")


def test_vit_pos_embedding_length_mismatch():
  sd = random_state_dict(tiny_vit(image_size=64))
  _one_line_error(tiny_vit(image_size=32), sd, r"'encoder.pos_embedding' has shape \(1, 17, 48\)")


# ---------------------------------------------------------------------- the config hook


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_cfg", REPO / "train" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config().train


def test_config_validates_the_pretrained_path(tmp_path):
  config = _tiny_config()
  assert config.pretrained == ""
  train.validate_config(config)
  config.pretrained = str(tmp_path / "missing.safetensors")
  with pytest.raises(ConfigError, match=r"config\.pretrained = '.*missing\.safetensors'"):
    train.validate_config(config)


def test_fp32_stage_starts_from_pretrained(tmp_path, monkeypatch):
  st = pytest.importorskip("safetensors.numpy")
  config = _tiny_config()
  config.model = "resnet20"  # torchvision ResNet names; digits: 8x8x1
  config.model_kwargs = type(config.model_kwargs)()
  splits = data.load_dataset("digits")
  model = train.build_model(config, splits)
  sd = random_state_dict(model, seed=5)
  st.save_file(sd, str(tmp_path / "w.safetensors"))
  config.pretrained = str(tmp_path / "w.safetensors")
  # no training, no evaluation: the stage's variables are then its starting point
  monkeypatch.setattr(train.runner, "fit", lambda step_fn, state, *a, **k: (state, {}))
  monkeypatch.setattr(train.runner, "evaluate_splits", lambda *a, **k: {})
  train.run_stage(config, "fp32", tmp_path / "wd", splits=splits)
  got = load_variables(tmp_path / "wd" / "fp32", model)
  want = pt.load_torchvision(model, sd)
  jax.tree.map(np.testing.assert_array_equal, dict(got), want)


# ------------------------------------------------------------------- the torch oracle


@functools.cache
def _tv():
  """torchvision's module structure and names, written out (torch only; no torchvision)."""
  import torch
  from torch import nn

  class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      identity = x if self.downsample is None else self.downsample(x)
      return self.relu(out + identity)

  class TvResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem=64, classes=1000):
      super().__init__()
      self.inplanes = stem
      self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
      self.bn1 = nn.BatchNorm2d(stem)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
      for i, (n, w) in enumerate(zip(layers, widths)):
        setattr(self, f"layer{i + 1}", self._make_layer(w, n, 1 if i == 0 else 2))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(widths[-1], classes)

    def _make_layer(self, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes:
        downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )
      layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes
      layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  class TvVGG(nn.Module):
    def __init__(self, cfg, hidden=(4096, 4096), classes=1000):
      super().__init__()
      layers, c = [], 3
      for v in cfg:
        if v == "M":
          layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
          layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
          c = v
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      head, n = [], c * 7 * 7
      for h in hidden:
        head += [nn.Linear(n, h), nn.ReLU(True), nn.Dropout()]
        n = h
      self.classifier = nn.Sequential(*head, nn.Linear(n, classes))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  class MLPBlock(nn.Sequential):  # torchvision.ops.MLP: Linear, GELU, Dropout, Linear, Dropout
    def __init__(self, d, mlp_dim):
      super().__init__(
        nn.Linear(d, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, d), nn.Dropout(0.0)
      )

  class EncoderBlock(nn.Module):
    def __init__(self, heads, d, mlp_dim):
      super().__init__()
      self.ln_1 = nn.LayerNorm(d, eps=1e-6)
      self.self_attention = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
      self.dropout = nn.Dropout(0.0)
      self.ln_2 = nn.LayerNorm(d, eps=1e-6)
      self.mlp = MLPBlock(d, mlp_dim)

    def forward(self, inp):
      x = self.ln_1(inp)
      x, _ = self.self_attention(x, x, x, need_weights=False)
      x = self.dropout(x) + inp
      return x + self.mlp(self.ln_2(x))

  class Encoder(nn.Module):
    def __init__(self, seq, depth, heads, d, mlp_dim):
      super().__init__()
      self.pos_embedding = nn.Parameter(torch.empty(1, seq, d).normal_(std=0.02))
      self.dropout = nn.Dropout(0.0)
      self.layers = nn.Sequential(
        OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, d, mlp_dim)) for i in range(depth))
      )
      self.ln = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):
      return self.ln(self.layers(self.dropout(x + self.pos_embedding)))

  class TvViT(nn.Module):
    def __init__(self, image=224, patch=32, depth=12, heads=12, d=768, mlp_dim=3072, classes=1000):
      super().__init__()
      self.patch, self.d = patch, d
      self.conv_proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
      self.class_token = nn.Parameter(torch.zeros(1, 1, d))
      self.encoder = Encoder((image // patch) ** 2 + 1, depth, heads, d, mlp_dim)
      self.heads = nn.Sequential(OrderedDict(head=nn.Linear(d, classes)))

    def forward(self, x):
      n = x.shape[0]
      x = self.conv_proj(x).reshape(n, self.d, -1).permute(0, 2, 1)
      x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
      return self.heads(self.encoder(x)[:, 0])

  return types.SimpleNamespace(torch=torch, ResNet=TvResNet, VGG=TvVGG, ViT=TvViT)


def _randomize(net, seed):
  """Random norms, running stats, biases, class token (torch's init leaves them 0 or 1)."""
  torch = _tv().torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
      if name.endswith("num_batches_tracked"):
        continue
      leaf = name.rsplit(".", 1)[-1]
      is_norm = any(s in name for s in ("bn", "ln", "downsample.1")) or name == "encoder.ln.weight"
      if leaf == "running_var" or (is_norm and leaf == "weight"):
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
      elif leaf in ("running_mean", "bias", "in_proj_bias", "class_token"):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
      elif name.endswith("mlp.0.weight"):
        t.mul_(4.0)  # GELU inputs over [-4, 4], where erf and tanh GELU differ most
  return net.eval()


def _torch_net(kind: str, full: bool, image: int, classes: int):
  tv = _tv()
  tv.torch.manual_seed(0)
  if kind == "resnet18" and full:
    net = tv.ResNet(classes=classes)
  elif kind == "resnet18":
    net = tv.ResNet(widths=(8, 16, 32, 64), stem=8, classes=classes)
  elif kind == "vgg16" and full:
    net = tv.VGG(VGG16_CFG, (4096, 4096), classes)
  elif kind == "vgg16":
    net = tv.VGG(TINY_VGG_CFG, (24, 24), classes)
  elif full:
    net = tv.ViT(image=image, classes=classes)
  else:
    net = tv.ViT(image=image, patch=16, depth=2, heads=4, d=48, mlp_dim=96, classes=classes)
  return _randomize(net, 1)


def _zoo(kind: str, full: bool, image: int, classes: int) -> ModelDef:
  if full:
    return get_model(kind, num_classes=classes, image_size=image)
  return {"resnet18": tiny_resnet18, "vgg16": tiny_vgg16, "vit_b32": tiny_vit}[kind](image, classes)


def _compare(kind, full, image, classes, tmp_path, batch=2, fmt="safetensors", tol=REL_TOL):
  torch = _tv().torch
  net = _torch_net(kind, full, image, classes)
  sd = net.state_dict()
  if fmt == "safetensors":
    from safetensors.torch import save_file

    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  else:
    path = tmp_path / f"{kind}.pth"
    torch.save(sd, path)
  model = _zoo(kind, full, image, classes)
  v = pt.load_torchvision(model, path)
  x = np.random.default_rng(2).standard_normal((batch, 3, image, image)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy()
  got, _ = forward(model.module, v, jnp.asarray(x.transpose(0, 2, 3, 1)))
  rel = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
  print(f"{kind} full={full} image={image} {fmt}: max|diff|/max|logit| = {rel:.2e}")
  assert rel < tol, rel
  return sd


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["resnet18", "vgg16", "vit_b32"])
def test_mirror_keys_are_torchvision_keys(kind):
  pytest.importorskip("torch")
  tv = _tv()
  with tv.torch.device("meta"):  # full size, no memory
    net = {"resnet18": tv.ResNet, "vgg16": lambda: tv.VGG(VGG16_CFG), "vit_b32": tv.ViT}[kind]()
  assert list(net.state_dict()) == TV_KEYS[kind]()


@pytest.mark.torch
@pytest.mark.parametrize(
  "kind,image,fmt",
  [
    ("resnet18", 64, "safetensors"),
    ("resnet18", 32, "pth"),
    ("vgg16", 96, "safetensors"),  # 3x3 feature map, pooled up to 7x7
    ("vgg16", 224, "pth"),  # 7x7: the pool is the identity
    ("vit_b32", 64, "safetensors"),
    ("vit_b32", 32, "pth"),
  ],
)
def test_float_forward_matches_torch(kind, image, fmt, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  _compare(kind, False, image, 10, tmp_path, fmt=fmt, tol=TIGHT_TOL)


@pytest.mark.torch
def test_pth_refuses_pickled_objects(resnet, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pth"
  torch.save({"conv1.weight": torch.zeros(1), "obj": types.SimpleNamespace(a=1)}, path)
  with pytest.raises(WeightsError, match=r"evil\.pth: not a weights-only torch file"):
    pt.load_torchvision(resnet, path)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet18", "vgg16", "vit_b32"])
def test_full_size_float_forward_matches_torch(kind, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("safetensors")
  sd = _compare(kind, True, 224, 1000, tmp_path, batch=1)
  assert list(sd) == TV_KEYS[kind]()
