"""The ImageNet run configs (train/*_imagenet.py) on a tiny ImageNet-layout folder.

The folder is made here: ``imagenet/train/<synset>/`` and ``imagenet/val/<synset>/`` JPEGs of
varied sizes (one grey): ImageNet's own layout, whose ``val/`` the configs read as the test
split (``data.val_folder = "test"``). Pretrained weights: a random state dict with torchvision's
keys for the zoo ResNet-18 (3 classes), saved with ``safetensors.numpy``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cimjax import pipeline
from cimjax.cli import run as run_cli
from cimjax.errors import CimjaxError, WeightsError
from cimjax.models import get_model
from tests import test_pretrained as pre_t

REPO = Path(__file__).resolve().parents[1]
SYNSETS = ("n01440764", "n01443537", "n01484850")
CONFIGS = ("resnet18", "vgg16", "vit_b32")
# Tiny sizes for the tiny folder (the configs' own sizes need ImageNet).
TINY = dict(val_size=6, test_size=-1, workers=0)


def _jpegs(d: Path, n: int, cls: int, rng: np.random.Generator, grey: bool = False) -> None:
  d.mkdir(parents=True)
  for i in range(n):
    h, w = (int(v) for v in rng.integers(64, 300, 2))
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[..., cls] = 220  # a class signal
    im = Image.fromarray(img)
    if grey and i == 0:
      im = im.convert("L")  # ImageNet has grey JPEGs: channels=3 repeats them
    im.save(d / f"{d.name}_{i:05d}.JPEG", quality=85)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
  """ImageNet's own layout: ``train/<synset>/`` and ``val/<synset>/`` (the benchmark's set)."""
  base = tmp_path_factory.mktemp("imagenet")
  rng = np.random.default_rng(0)
  raw = base / "imagenet"
  for c, syn in enumerate(SYNSETS):
    _jpegs(raw / "train" / syn, 8, c, rng, grey=c == 1)
    _jpegs(raw / "val" / syn, 3, c, rng)
  return raw


def _pretrained_like(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Random tensors at a trained network's scale (He-scaled kernels, BN scales near 1, small
  biases and means): unscaled N(0, 1) kernels make 18 layers' logits explode (loss ~40)."""
  out = {}
  for k, v in sd.items():
    if k.endswith("weight") and v.ndim >= 2:
      v = v * np.sqrt(2.0 / np.prod(v.shape[1:]))
    elif k.endswith("weight"):  # batch-norm scales
      v = 1.0 + 0.1 * v
    elif k.endswith(("bias", "running_mean")):
      v = 0.1 * v
    out[k] = np.asarray(v, sd[k].dtype)
  return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
  """A torchvision-keyed random ResNet-18 state dict (3 classes) as .safetensors."""
  st = pytest.importorskip("safetensors.numpy")
  sd = _pretrained_like(pre_t.random_state_dict(get_model("resnet18", num_classes=3), seed=1))
  path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
  st.save_file(sd, str(path))
  return path, sd


def _config(name: str):
  path = REPO / "train" / f"{name}_imagenet.py"
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _tiny(c, root: Path, weights_path: Path, crop: int = 224, resize: int = 256):
  d = c.train.data
  d.path = str(root)
  d.update(TINY)
  d.crop_size, d.resize_size = crop, resize
  c.train.pretrained = str(weights_path)
  c.train.batch_size = 8
  c.search.search_images = 3
  return c


# ------------------------------------------------------------------------------ the configs


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_the_reference_flow(name):
  c = _config(name)
  t, d = c.train, c.train.data
  assert t.model == name and c.hw == "rram_256_c4"
  assert (d.source, d.stream, d.normalize) == ("folder", True, "imagenet")
  assert (d.crop_size, d.resize_size, d.augment, d.min_scale) == (224, 256, True, 0.08)
  assert (d.val_size, d.test_size, d.test_fraction, d.num_classes) == (10_000, 50_000, 0.0, 0)
  assert (c.search.acc_drop, c.search.constraint) == (1.0, "both")  # CIM-AQ's ImageNet configs
  assert (t.bits.min_bits, t.bits.max_bits) == (2, 8)
  assert c.search.search_images == 5_000 < d.val_size
  assert (t.fp32.steps, t.fp32.epochs) == (0, 0.0)  # pretrained: load and evaluate
  for stage in ("int8", "anyprec", "finetune"):
    assert t[stage].epochs == 1.0 and t[stage].lr <= 2e-4
  assert d.path == "" and not os.path.exists(t.pretrained)  # both must be given


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_with_data_and_weights(name, imagenet, weights):
  # validate_run checks every field, the target, the model at 224x224, loads the data (the
  # stream's in-memory val/test/sample) and reads the weights file's keys and shapes: the
  # ResNet-18 file fits resnet18 only; the others are checked without the fp32 stage.
  cfg = _tiny(_config(name), imagenet, weights[0])
  if name == "resnet18":
    c = pipeline.validate_run(cfg)
  else:
    with pytest.raises(WeightsError, match=f"^{re.escape(str(weights[0]))}: ") as info:
      pipeline.validate_run(cfg)
    assert "\n" not in str(info.value) and name in str(info.value)
    c = pipeline.validate_run(cfg, stages=["int8", "anyprec"])
  assert c.train.bits.cell_bits == 4 and c.train.bits.constraint == "both"
  from cimjax import train as train_lib

  splits = train_lib.load_splits(c.train)
  assert splits.num_classes == len(SYNSETS) and splits.class_names == SYNSETS
  assert splits.test.images.shape == (9, 224, 224, 3)  # all of ImageNet's val, as test
  assert len(splits.val) == 6  # held out of train
  assert splits.info["sizes"] == {"train": 18, "val": 6, "test": 9}
  model = train_lib.build_model(c.train, splits)
  assert tuple(model.input_shape) == (224, 224, 3)


def _main(argv: list[str], capsys) -> tuple[int, str]:
  status = run_cli.main(["cimjax", *argv])
  return status, capsys.readouterr().err


def test_missing_data_path_or_weights_is_one_line_exit_2(imagenet, weights, tmp_path, capsys):
  wd = tmp_path / "wd"
  cfg = "--config=" + str(REPO / "train" / "resnet18_imagenet.py")
  status, err = _main([cfg, f"--workdir={wd}"], capsys)
  assert status == 2 and err.count("\n") == 1, err
  assert "config.train.data.path" in err
  status, err = _main([cfg, f"--workdir={wd}", f"--config.train.data.path={imagenet}"], capsys)
  assert status == 2 and err.count("\n") == 1, err
  assert "config.train.pretrained" in err and "--config.train.pretrained=" in err
  status, err = _main(
    [
      cfg,
      f"--workdir={wd}",
      f"--config.train.data.path={imagenet}",
      f"--config.train.pretrained={weights[0].parent / 'nope.safetensors'}",
    ],
    capsys,
  )
  assert status == 2 and err.count("\n") == 1 and "nope.safetensors" in err, err
  assert not wd.exists()  # nothing written


def test_weights_of_the_wrong_shape_are_refused_before_any_stage(
  imagenet, weights, tmp_path, capsys
):
  """A head for another class count: one line naming the file, the key and both shapes, exit
  2, nothing written (the file's header is read before the workdir is created)."""
  st = pytest.importorskip("safetensors.numpy")
  sd = dict(weights[1])
  sd["fc.weight"] = np.zeros((5, sd["fc.weight"].shape[1]), np.float32)
  bad = tmp_path / "five_classes.safetensors"
  st.save_file(sd, str(bad))
  wd = tmp_path / "wd"
  cfg = "--config=" + str(REPO / "train" / "resnet18_imagenet.py")
  argv = [cfg, f"--workdir={wd}", f"--config.train.data.path={imagenet}"]
  argv += [f"--config.train.data.{k}={v}" for k, v in TINY.items()]
  argv += ["--config.train.batch_size=8", "--config.search.search_images=3"]
  status, err = _main([*argv, f"--config.train.pretrained={bad}"], capsys)
  assert status == 2 and err.count("\n") == 1, err
  assert str(bad) in err and "'fc.weight' has shape (5, 512)" in err and "(3, 512)" in err
  assert not wd.exists()
  pt = pytest.importorskip("torch")
  pth = tmp_path / "five_classes.pth"
  pt.save({k: pt.from_numpy(np.array(v)) for k, v in sd.items()}, str(pth))
  status, err = _main([*argv, f"--config.train.pretrained={pth}"], capsys)
  assert status == 2 and str(pth) in err and "'fc.weight' has shape (5, 512)" in err, err
  assert not wd.exists()


def test_val_folder_read_as_validation_is_refused(imagenet, weights):
  # val_folder=val: ImageNet's val/ would be the search split and nothing would be left for test
  c = _tiny(_config("resnet18"), imagenet, weights[0])
  c.train.data.val_folder = "val"
  c.train.data.test_size = 50_000
  with pytest.raises(CimjaxError, match="test_size") as info:
    pipeline.validate_run(c)
  assert "\n" not in str(info.value)


def test_val_folder_as_test_with_a_test_folder_too_is_one_line(imagenet, weights, tmp_path):
  import shutil

  root = tmp_path / "both"
  shutil.copytree(imagenet, root)
  shutil.copytree(imagenet / "val", root / "test")
  c = _tiny(_config("resnet18"), root, weights[0])
  with pytest.raises(CimjaxError, match=r"val_folder=test reads val/ as the test part") as info:
    pipeline.validate_run(c)
  assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ the stages


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
    [sys.executable, "-m", "launch.run", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _small(root: Path, weights_path: Path, wd: Path, stages: str) -> list[str]:
  """The resnet18 config on the tiny folder at 64x64 (resize 72), a few steps."""
  t = "--config.train."
  return [
    "--config=train/resnet18_imagenet.py",
    f"{t}data.path={root}",
    f"{t}pretrained={weights_path}",
    f"--workdir={wd}",
    f"--stages={stages}",
    f"{t}data.crop_size=64",
    f"{t}data.resize_size=72",
    f"{t}data.val_size=6",
    f"{t}data.test_size=-1",
    f"{t}data.workers=0",
    f"{t}batch_size=4",
    f"{t}eval_batch_size=16",
    f"{t}calib_images=8",
    f"{t}bn_recal_batches=1",
    f"{t}int8.steps=2",
    f"{t}checkpoint_every=0",
    f"{t}progress=False",
    f"{t}fast_compile=True",
    "--config.search.search_images=3",
  ]


def _variables(stage_dir: Path, side: int = 64):
  import dataclasses

  from cimjax import train as train_lib

  model = get_model("resnet18", num_classes=len(SYNSETS))
  model = dataclasses.replace(model, input_shape=(side, side, 3))
  return train_lib.load_variables(stage_dir, model)


@pytest.mark.slow
def test_resnet18_pretrained_fp32_and_int8(imagenet, weights, tmp_path):
  path, sd = weights
  wd = tmp_path / "run"
  proc = _run(_small(imagenet, path, wd, "fp32,int8"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[fp32] done" in proc.stdout and "[int8] done" in proc.stdout
  fp32 = json.loads((wd / "fp32" / "result.json").read_text())
  int8 = json.loads((wd / "int8" / "result.json").read_text())
  assert fp32["steps"] == 0 and fp32["source"] is None
  assert (fp32["train_images"], fp32["val_images"], fp32["test_images"]) == (18, 6, 9)
  assert int8["steps"] == 2 and int8["source"] == "fp32" and "ptq_val_w8a8" in int8
  saved = json.loads((wd / "config.json").read_text())
  assert saved["train"]["pretrained"] == str(path)
  # the fp32 stage's variables are the file's tensors, mapped (OIHW -> HWIO, transposes)
  v = _variables(wd / "fp32")
  p, bs = v["params"], v["batch_stats"]
  np.testing.assert_array_equal(p["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
    p["stage4_block1"]["shortcut"]["kernel"],
    sd["layer4.0.downsample.0.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(bs["stage2_block2"]["bn_b"]["var"], sd["layer2.1.bn2.running_var"])
  # int8 started from them: two small steps away, not a fresh init
  k8 = np.asarray(_variables(wd / "int8")["params"]["stage1_block1"]["conv_a"]["kernel"])
  k32 = sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0)
  assert not np.array_equal(k8, k32)
  assert np.abs(k8 - k32).max() < 0.05 * np.abs(k32).max()
