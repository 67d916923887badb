"""Models by reference: the zoo, registered names, import paths, user files and ONNX files.

Everywhere cimjax names a model (``train.model`` of a run config, every CLI's ``--model``, the
``model`` of a compiled program) it takes a *reference*, resolved by :func:`resolve_model`:

- a zoo name (``small_cnn``, ``resnet20``, ``resnet18``, ``vgg16``, ``vit_b32``) or a name
  added with :func:`register_model`;
- ``package.module:factory``: imported like ``python -m`` imports (the current directory is
  searched first), so ``file_module:factory`` finds ``./file_module.py``;
- ``path/to/file.py:factory``: a user's file outside any package, loaded from its path;
- ``path/to/model.onnx``: imported by :func:`cimjax.onnx.import_model`.

A factory is called with the reference's keyword options (``num_classes`` only if it takes
it) and returns a :class:`~cimjax.models.ModelDef`, a ``(module, input_shape)`` pair or a dict
with the keys ``module``, ``input_shape`` and optionally ``num_classes``, ``rules`` and
``description``. A plain Flax module (one whose ``__call__`` takes no ``ctx``) is run through
:func:`cimjax.models.quantize_model`; a module written with cimjax layers is used as it is.

The registry is the dict :data:`MODELS` (zoo entries first): :func:`register_model` adds to it
for the running process, so a registered name must be registered again (e.g. by importing the
research code that registers it) in every process that resolves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn

from cimjax.errors import ModelError, ModelNotFoundError
from cimjax.models.base import ModelDef
from cimjax.models.intercept import QuantizedModel, quantize_model
from cimjax.models.resnet import resnet18, resnet20
from cimjax.models.small_cnn import SmallCNN
from cimjax.models.vgg import VGG
from cimjax.models.vit import ViT


def _small_cnn(num_classes: int = 10, **kw: Any) -> ModelDef:
  return ModelDef(
    "small_cnn",
    SmallCNN(num_classes=num_classes, **kw),
    (28, 28, 1),
    num_classes,
    "3-conv CNN for 28x28 grayscale (Fashion-MNIST), 5 quantizable layers",
  )


def _resnet20(num_classes: int = 10, image_size: int = 32) -> ModelDef:
  return ModelDef(
    "resnet20",
    resnet20(num_classes),
    (image_size, image_size, 3),
    num_classes,
    "ResNet-20 (CIFAR style), 22 quantizable layers",
  )


def _resnet18(num_classes: int = 1000, image_size: int = 224) -> ModelDef:
  return ModelDef(
    "resnet18",
    resnet18(num_classes),
    (image_size, image_size, 3),
    num_classes,
    "ResNet-18 (ImageNet), 21 quantizable layers",
  )


def _vgg16(num_classes: int = 1000, image_size: int = 224, **kw: Any) -> ModelDef:
  return ModelDef(
    "vgg16",
    VGG(num_classes=num_classes, **kw),
    (image_size, image_size, 3),
    num_classes,
    "VGG-16 (ImageNet), 16 quantizable layers",
  )


def _vit_b32(num_classes: int = 1000, image_size: int = 224, **kw: Any) -> ModelDef:
  return ModelDef(
    "vit_b32",
    ViT(num_classes=num_classes, **kw),
    (image_size, image_size, 3),
    num_classes,
    "ViT-B/32 (ImageNet), 74 quantizable layers",
  )


ZOO: tuple[str, ...] = ("small_cnn", "resnet20", "resnet18", "vgg16", "vit_b32")
MODELS: dict[str, Callable[..., Any]] = {
  "small_cnn": _small_cnn,
  "resnet20": _resnet20,
  "resnet18": _resnet18,
  "vgg16": _vgg16,
  "vit_b32": _vit_b32,
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def allowed_refs() -> str:
  """What a model reference may be, in words (for messages)."""
  return (
    f"a zoo or registered name ({', '.join(model_names())}), 'package.module:factory', "
    "'path/file.py:factory' or a .onnx file"
  )


def _not_found(ref: str, tried: str) -> ModelNotFoundError:
  """``model <ref>: <tried>`` as the error of a reference that resolves to nothing."""
  return ModelNotFoundError(
    f"model {ref!r}: {tried}", name=ref, allowed=f"{allowed_refs()} (tried: {tried})"
  )


def model_names() -> tuple[str, ...]:
  """The zoo names and the registered names, in registration order (the zoo first)."""
  return tuple(MODELS)


def register_model(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
  """Makes ``name`` a model reference for this process (research code, notebooks, tests).

  Example::

    cimjax.register_model("my_cnn", lambda num_classes=10: (MyCNN(num_classes), (28, 28, 1)))
    # then: cimjax --config.train.model=my_cnn (in a process that ran the line above)

  Args:
    name: a new name (letters, digits, ``_``, ``.``, ``-``; not a zoo name, no ``:``, not
      ending in ``.py`` or ``.onnx``).
    factory: called with the reference's keyword options (``num_classes`` if it takes it);
      returns what a factory returns (see the module docstring).
    overwrite: replace an earlier registration of ``name`` (never a zoo model).

  Raises:
    ModelError: a bad or taken name, or a factory that is not callable.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith((".py", ".onnx")):
    raise ModelError(
      f"register_model: name {name!r}: allowed: letters, digits, '_', '.', '-' (no ':', not "
      "ending in .py or .onnx)"
    )
  if name in ZOO:
    raise ModelError(f"register_model: {name!r} is a zoo model; choose another name")
  if name in MODELS and not overwrite:
    raise ModelError(f"register_model: {name!r} is already registered (pass overwrite=True)")
  if not callable(factory):
    raise ModelError(f"register_model({name!r}): the factory {factory!r} is not callable")
  MODELS[name] = factory


def unregister_model(name: str) -> None:
  """Removes a name added by :func:`register_model` (zoo names stay)."""
  if name in ZOO:
    raise ModelError(f"unregister_model: {name!r} is a zoo model")
  MODELS.pop(name, None)


def _kind(ref: str) -> str:
  """``"name"``, ``"onnx"``, ``"file"`` (``path.py:factory``) or ``"import"`` (``pkg.mod:f``)."""
  if ref in MODELS:
    return "name"
  if ref.lower().endswith(".onnx"):
    return "onnx"
  if ":" in ref:
    target = ref.rsplit(":", 1)[0]
    if target.endswith(".py") or "/" in target or os.sep in target:
      return "file"
    return "import"
  return "unknown"


def _unknown(ref: str) -> ModelNotFoundError:
  hint = ""
  if "." in ref and ":" not in ref and not ref.endswith(".py"):
    mod, _, attr = ref.rpartition(".")
    hint = f" (did you mean {mod}:{attr}?)"
  elif ref.endswith(".py"):
    hint = f" (name the factory: {ref}:factory)"
  return ModelNotFoundError(
    f"unknown model {ref!r}{hint}: not a zoo or registered model ({', '.join(model_names())}), "
    "not an import path 'package.module:factory' or 'path/file.py:factory', not an .onnx file",
    name=ref,
    allowed=allowed_refs(),
  )


def _split(ref: str) -> tuple[str, str]:
  target, attr = ref.rsplit(":", 1)
  if not target or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", attr):
    raise ModelError(
      f"model {ref!r}: expected 'package.module:factory' or 'path/file.py:factory' "
      "(factory a Python name)"
    )
  return target, attr


def _import(module_name: str, ref: str) -> Any:
  """``importlib.import_module`` with the current directory searched first (as ``python -m``)."""
  cwd = os.getcwd()
  added = cwd not in sys.path and "" not in sys.path
  if added:
    sys.path.insert(0, cwd)
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
      raise _not_found(
        ref,
        f"import {module_name!r}: no module {e.name!r} on the Python path (the current "
        f"directory {cwd} included)",
      ) from None
    raise ModelError(f"model {ref!r}: importing {module_name!r} failed: {e}") from e
  except Exception as e:  # the user's module failed to import
    raise ModelError(
      f"model {ref!r}: importing {module_name!r} failed: {type(e).__name__}: {_first_line(e)}"
    ) from e
  finally:
    if added and cwd in sys.path:
      sys.path.remove(cwd)


def _load_file(path: str, ref: str) -> Any:
  """The module of a ``.py`` file outside any package (loaded once per file and content)."""
  p = Path(path).expanduser()
  if not p.is_file():
    raise _not_found(ref, f"file {str(p.resolve())!r} not found")
  p = p.resolve()
  digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
  name = f"_cimjax_user_{re.sub(r'[^0-9A-Za-z_]', '_', p.stem)}_{digest}"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, p)
  if spec is None or spec.loader is None:
    raise ModelError(f"model {ref!r}: {str(p)!r} is not a loadable Python file")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses (Flax modules) look their module up while defined
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the user's file failed to run
    del sys.modules[name]
    raise ModelError(
      f"model {ref!r}: running {str(p)!r} failed: {type(e).__name__}: {_first_line(e)}"
    ) from e
  return module


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else ""


def _attribute(module: Any, attr: str, ref: str, where: str) -> Any:
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise _not_found(ref, f"{where} has no attribute {attr!r}")
    obj = getattr(obj, part)
  return obj


def _factory(ref: str) -> Any:
  """The factory (or ModelDef) a reference names, without calling it."""
  kind = _kind(ref)
  if kind == "name":
    return MODELS[ref]
  if kind == "file":
    target, attr = _split(ref)
    return _attribute(_load_file(target, ref), attr, ref, f"file {target!r}")
  if kind == "import":
    target, attr = _split(ref)
    return _attribute(_import(target, ref), attr, ref, f"module {target!r}")
  if kind == "onnx":
    return _onnx_importer(ref)
  raise _unknown(ref)


def _onnx_importer(ref: str) -> Callable[..., Any]:
  if not Path(ref).expanduser().is_file():
    raise _not_found(ref, f"ONNX file {str(Path(ref).resolve())!r} not found")
  try:
    onnx_lib = importlib.import_module("cimjax.onnx")
  except ModuleNotFoundError as e:
    if e.name and (e.name == "cimjax.onnx" or e.name.split(".")[0].startswith("onnx")):
      raise ModelError(
        f"model {ref!r}: ONNX import is unavailable ({e.name} is not installed)"
      ) from None
    raise
  importer = getattr(onnx_lib, "import_model", None)
  if importer is None:
    raise ModelError(f"model {ref!r}: ONNX import is unavailable (no cimjax.onnx.import_model)")
  return _onnx_factory(importer, ref)


def _onnx_factory(importer: Callable[..., Any], path: str) -> Callable[..., Any]:
  """``importer(path, **kw)`` as a factory of keyword options (keeps the signature's names)."""

  def factory(**kw: Any) -> Any:
    return importer(path, **kw)

  factory.__signature__ = _without_first(importer)  # type: ignore[attr-defined]
  return factory


def _without_first(fn: Callable[..., Any]) -> inspect.Signature:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return inspect.Signature([inspect.Parameter("kw", inspect.Parameter.VAR_KEYWORD)])
  return sig.replace(parameters=list(sig.parameters.values())[1:])


def _accepts(fn: Callable[..., Any], name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _takes_ctx(module: nn.Module) -> bool:
  """Whether a module already follows the cimjax convention ``__call__(x, ctx)``."""
  if isinstance(module, QuantizedModel):
    return True
  try:
    return "ctx" in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False


def _as_model_def(obj: Any, ref: str) -> ModelDef:
  """A factory's result as a ModelDef (see the module docstring for the accepted forms)."""
  if isinstance(obj, ModelDef):
    return obj
  spec: dict[str, Any]
  if isinstance(obj, Mapping):
    spec = dict(obj)
  elif isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[0], nn.Module):
    spec = dict(zip(("module", "input_shape", "num_classes"), obj))
  elif isinstance(obj, nn.Module):
    raise ModelError(
      f"model {ref!r}: the factory returned a bare {type(obj).__name__}; return "
      "(module, input_shape), e.g. (module, (28, 28, 1)), or a ModelDef"
    )
  else:
    raise ModelError(
      f"model {ref!r}: the factory returned a {type(obj).__name__}; expected a ModelDef, "
      "(module, input_shape) or a dict with 'module' and 'input_shape'"
    )
  unknown = set(spec) - {"module", "input_shape", "num_classes", "rules", "description", "name"}
  missing = {"module", "input_shape"} - set(spec)
  if unknown or missing or not isinstance(spec.get("module"), nn.Module):
    raise ModelError(
      f"model {ref!r}: the factory's dict needs 'module' (a Flax module) and 'input_shape' "
      f"(optional: num_classes, rules, description); got keys {sorted(spec)}"
    )
  module = spec["module"]
  shape = tuple(int(d) for d in spec["input_shape"])
  if _takes_ctx(module):
    if spec.get("rules"):
      raise ModelError(f"model {ref!r}: rules apply to plain Flax modules only")
    num = spec.get("num_classes")
    if num is None:
      raise ModelError(f"model {ref!r}: a cimjax-layer module needs num_classes in its result")
    return ModelDef(ref, module, shape, int(num), spec.get("description", ""))
  return quantize_model(
    module,
    input_shape=shape,
    rules=spec.get("rules") or (),
    num_classes=spec.get("num_classes"),
    name=ref,
    description=spec.get("description", ""),
  )


def _canonical(ref: str) -> str:
  """The name a resolved model records: file references get an absolute path."""
  if _kind(ref) == "file":
    target, attr = ref.rsplit(":", 1)
    return f"{Path(target).expanduser().resolve()}:{attr}"
  if _kind(ref) == "onnx":
    return str(Path(ref).expanduser().resolve())
  return ref


def resolve_model(ref: str | ModelDef, **kwargs: Any) -> ModelDef:
  """The model a reference names (see the module docstring), built with ``kwargs``.

  Args:
    ref: a zoo or registered name, ``package.module:factory``, ``path/file.py:factory``,
      ``path/model.onnx``, or a :class:`ModelDef` (returned as it is; no options allowed).
    **kwargs: the factory's options, e.g. ``num_classes``, ``image_size`` or module
      attributes; ``num_classes`` is dropped for factories that do not take it (then the
      model's own class count must equal it).

  Returns:
    The :class:`ModelDef`; its ``name`` is the reference (file paths made absolute), so a
    compiled program of it reloads by that name.

  Raises:
    ModelError: one line naming what was tried: the zoo and registered names, the import, the
      file, the factory call and its options, or the factory's result.
  """
  if isinstance(ref, ModelDef):
    if kwargs:
      raise ModelError(f"model {ref.name!r}: a ModelDef takes no options (got {kwargs})")
    return ref
  if not isinstance(ref, str) or not ref.strip():
    raise ModelError(f"model {ref!r}: expected a model reference string")
  ref = ref.strip()
  name = _canonical(ref)
  factory = _factory(ref)
  if isinstance(factory, ModelDef):
    if kwargs:
      raise ModelError(f"model {ref!r} names a ModelDef, which takes no options (got {kwargs})")
    md = factory
  else:
    if not callable(factory):
      raise ModelError(f"model {ref!r}: {factory!r} is not callable")
    kw = dict(kwargs)
    wanted = kw.get("num_classes")
    if "num_classes" in kw and not _accepts(factory, "num_classes"):
      del kw["num_classes"]
    try:
      obj = factory(**kw)
    except ModelError:
      raise
    except TypeError as e:
      raise ModelError(f"model {ref!r}: calling its factory with {kw} failed: {e}") from None
    except Exception as e:  # the user's factory failed
      raise ModelError(
        f"model {ref!r}: its factory failed with {kw}: {type(e).__name__}: {_first_line(e)}"
      ) from e
    md = _as_model_def(obj, name)
    if wanted is not None and md.num_classes != wanted:
      raise ModelError(
        f"model {ref!r} has {md.num_classes} outputs but {wanted} classes are needed "
        "(let its factory take num_classes)"
      )
  return md if md.name == name else dataclasses.replace(md, name=name)


def check_model_ref(ref: Any) -> None:
  """Checks that a reference names something, without building the model.

  Zoo and registered names, the import of ``package.module`` or the file of ``file.py`` and
  its attribute, and the existence of an ``.onnx`` file.

  Raises:
    ModelError: as :func:`resolve_model` would for the same reference.
  """
  if isinstance(ref, ModelDef):
    return
  if not isinstance(ref, str) or not ref.strip():
    raise ModelError(f"model {ref!r}: expected a model reference string")
  _factory(ref.strip())


def get_model(name: str | ModelDef, **overrides: Any) -> ModelDef:
  """Builds a model by reference: the same as :func:`resolve_model` (kept for callers).

  Args:
    name: a zoo name (:data:`ZOO`), a registered name or any reference of
      :func:`resolve_model`.
    **overrides: model options, e.g. ``num_classes``, ``image_size`` (ResNets, VGG, ViT) or
      module attributes (``channels`` for the small CNN, ``depth`` for ViT).

  Raises:
    ModelError: unknown reference (the message lists what was tried); a ``ValueError``.
  """
  return resolve_model(name, **overrides)


__all__ = [
  "MODELS",
  "allowed_refs",
  "ZOO",
  "check_model_ref",
  "get_model",
  "model_names",
  "register_model",
  "resolve_model",
  "unregister_model",
]
