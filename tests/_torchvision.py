"""Import the real torchvision as a test oracle, also where its wheel is the CUDA build.

The torchvision wheel on PyPI (0.28.0, the pair of torch 2.13) is built against CUDA torch: its
C extension ``torchvision/_C.so`` needs ``libtorch_cuda.so``, which the CPU torch wheel does not
ship, so ``import torchvision`` fails with ``operator torchvision::nms does not exist`` (its
``_meta_registrations`` registers fake kernels for ``nms``/``qnms`` even when the extension did not
load). The models themselves are pure Python: when the extension cannot load, the two op schemas
are declared here first (no kernels: nothing in these tests calls them), and torchvision imports.
Tests using it skip where torch or torchvision is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

_SCHEMAS = (
  "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
  "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBS: list = []  # keeps the torch.library.Library alive (its ops vanish with it)


def _extension_loads(torch: ModuleType, spec) -> bool:
  so = [p for p in Path(spec.origin).parent.glob("_C*.so")]
  if not so:
    return False
  try:
    torch.ops.load_library(str(so[0]))
  except OSError:
    return False
  return True


def import_torchvision() -> ModuleType:
  """``torchvision`` (skips the test where torch or torchvision is missing)."""
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("torchvision")
  if spec is None or spec.origin is None:
    pytest.skip("torchvision is not installed")
  if not _LIBS and not _extension_loads(torch, spec):
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
      lib.define(schema)
    _LIBS.append(lib)
  return importlib.import_module("torchvision")
