"""Models: the zoo, models by reference, plain Flax models, and the functional forward pass.

- :mod:`~cimjax.models.base`: :class:`ModelDef`, :func:`forward`, :func:`init`;
- :mod:`~cimjax.models.registry`: :func:`resolve_model` (zoo and registered names,
  ``package.module:factory``, ``path/file.py:factory``, ``model.onnx``),
  :func:`register_model`, :func:`model_names`;
- :mod:`~cimjax.models.intercept`: :func:`quantize_model` (a plain Flax module as a CIM model,
  by method interception) and its :class:`Rule`;
- the zoo: :class:`SmallCNN`, :class:`ResNet` (ResNet-18/20), :class:`VGG`, :class:`ViT`.

``MODEL_NAMES`` is computed on access (the zoo and the names registered so far); code that
checks a reference calls :func:`resolve_model` or :func:`check_model_ref`, never a copy.
See docs/own_models.md.
"""

from __future__ import annotations

from typing import Any

from cimjax.models.base import ModelDef, forward, init
from cimjax.models.intercept import QuantizedModel, Rule, quantize_model
from cimjax.models.registry import (
  MODELS,
  ZOO,
  check_model_ref,
  get_model,
  model_names,
  register_model,
  resolve_model,
  unregister_model,
)
from cimjax.models.resnet import BasicBlock, ResNet, resnet18, resnet20
from cimjax.models.small_cnn import SmallCNN
from cimjax.models.vgg import VGG
from cimjax.models.vit import ViT


def __getattr__(name: str) -> Any:
  if name == "MODEL_NAMES":  # the current names, not an import-time copy
    return model_names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
  "BasicBlock",
  "MODELS",
  "MODEL_NAMES",
  "ModelDef",
  "QuantizedModel",
  "ResNet",
  "Rule",
  "SmallCNN",
  "VGG",
  "ViT",
  "ZOO",
  "check_model_ref",
  "forward",
  "get_model",
  "init",
  "model_names",
  "quantize_model",
  "register_model",
  "resnet18",
  "resnet20",
  "resolve_model",
  "unregister_model",
]
