"""Torchvision weights for the zoo's ResNet, VGG and ViT: :func:`load_torchvision`.

A torchvision ``state_dict()`` (saved as ``.safetensors``, read without torch, or as ``.pth``,
read with ``torch.load(..., weights_only=True)``) becomes the zoo model's variables
``{"params": ..., "batch_stats": ...}``. The mapping is a list of :class:`Entry` (one
torchvision key, the zoo variable it fills, the shape it must have and the layout change),
built from the zoo model's own variable shapes by :func:`torchvision_mapping`:

* convolutions: ``weight [O, I, kh, kw]`` (OIHW) -> ``kernel [kh, kw, I, O]`` (HWIO);
* linear layers: ``weight [out, in]`` -> ``kernel [in, out]``; biases as they are;
* batch norm: ``weight``/``bias`` -> params ``scale``/``bias``, ``running_mean``/``running_var``
  -> batch_stats ``mean``/``var``; ``num_batches_tracked`` is read and dropped;
* layer norm: ``weight``/``bias`` -> ``scale``/``bias``;
* VGG's first classifier layer reads the NCHW-flattened output of torchvision's
  ``AdaptiveAvgPool2d((7, 7))``; the zoo flattens the NHWC feature map (no pool). The pool is a
  linear map, so it is folded into the kernel: at 224x224 (a 7x7 map) that is only the
  reordering (c, h, w) -> (h, w, c); at other sizes the exact average-pool weights;
* ViT: ``self_attention.in_proj_weight [3D, D]`` (rows q, k, v, each head-major) is the zoo's
  ``attn/qkv`` kernel transposed (its outputs are split as ``[3, heads, head_dim]``).

Every key of the state dict is consumed exactly once: in strict mode (the default) a missing
key or one the mapping does not use is a :class:`~cimjax.errors.WeightsError` naming it (and
the file), as is a key of the wrong shape in any mode. The quantizer clip tables (``w_clip``,
``a_clip``) are not in torchvision's files: they get the model's own initial values computed
from the loaded weights (``w_clip``: each output channel's max ``|w|``), and the ``int8`` stage
calibrates them. The key lists and the float-forward agreement with torchvision are in
``docs/pretrained.md``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cimjax.errors import WeightsError
from cimjax.layers import QuantContext
from cimjax.models.resnet import ResNet
from cimjax.models.vgg import VGG
from cimjax.models.vit import ViT
from cimjax.variables import FAST_COMPILE, abstract_variables

Array = jax.Array
VarPath = tuple[str, ...]  # (collection, *module path, variable name)
StateDict = Mapping[str, Any]
CLIP_NAMES = ("w_clip", "a_clip")
VGG_POOL = 7  # torchvision's VGG: AdaptiveAvgPool2d((7, 7)) before the classifier
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _conv_kernel(a: np.ndarray) -> np.ndarray:
  """OIHW ``[O, I, kh, kw]`` -> HWIO ``[kh, kw, I, O]``."""
  return np.transpose(a, (2, 3, 1, 0))


def _linear_kernel(a: np.ndarray) -> np.ndarray:
  """``[out, in]`` -> ``[in, out]``."""
  return np.transpose(a)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """``[out, size]``: torch's ``adaptive_avg_pool`` from ``size`` to ``out`` along one axis.

  Row ``i`` averages the inputs ``floor(i * size / out) .. ceil((i + 1) * size / out) - 1``.
  """
  m = np.zeros((out, size), np.float64)
  for i in range(out):
    lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def _pooled_linear(h: int, w: int, c: int, pool: int) -> Callable[[np.ndarray], np.ndarray]:
  """A linear layer after an adaptive average pool, folded to read the feature map itself.

  Args:
    h, w, c: the zoo's feature map ``[h, w, c]`` (flattened NHWC before the dense layer).
    pool: torchvision's pool output size (``pool x pool``, flattened NCHW).

  Returns:
    ``convert(weight [out, c * pool * pool]) -> kernel [h * w * c, out]``.
  """

  def convert(a: np.ndarray) -> np.ndarray:
    k = a.reshape(a.shape[0], c, pool, pool).astype(np.float64)
    ph, pw = adaptive_pool_matrix(h, pool), adaptive_pool_matrix(w, pool)
    folded = np.einsum("ocij,ih,jw->hwco", k, ph, pw)
    return folded.reshape(h * w * c, a.shape[0])

  return convert


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torchvision state-dict tensor and the zoo variable it fills.

  Attributes:
    key: the torchvision key, e.g. ``"layer1.0.conv1.weight"``.
    target: the zoo variable ``(collection, *module path, name)``, e.g.
      ``("params", "stage1_block1", "conv_a", "kernel")``; empty: read and dropped.
    torch_shape: the shape the tensor must have.
    convert: torchvision layout -> zoo layout.
    aliases: other names of the same tensor (older torchvision files), tried in order.
    optional: may be absent in strict mode (``num_batches_tracked``).
  """

  key: str
  target: VarPath
  torch_shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray] = _same
  aliases: tuple[str, ...] = ()
  optional: bool = False


class _Builder:
  """Collects the entries of one model from its variable shapes."""

  def __init__(self, model_name: str, shapes: Mapping[VarPath, tuple[int, ...]]):
    self.model_name = model_name
    self.shapes = shapes
    self.entries: list[Entry] = []

  def shape(self, target: VarPath) -> tuple[int, ...]:
    if target not in self.shapes:
      raise WeightsError(
        f"model {self.model_name} has no variable {'/'.join(target)} (the torchvision "
        "mapping does not fit this model's structure)"
      )
    return self.shapes[target]

  def add(
    self,
    key: str,
    target: VarPath,
    torch_shape: tuple[int, ...],
    convert: Callable[[np.ndarray], np.ndarray] = _same,
    aliases: tuple[str, ...] = (),
  ) -> None:
    self.shape(target)
    self.entries.append(Entry(key, target, tuple(torch_shape), convert, aliases))

  def param(self, key: str, path: VarPath) -> None:
    self.add(key, ("params", *path), self.shape(("params", *path)))

  def conv(self, key: str, path: VarPath) -> None:
    kh, kw, i, o = self.shape(("params", *path, "kernel"))
    self.add(f"{key}.weight", ("params", *path, "kernel"), (o, i, kh, kw), _conv_kernel)
    self.bias(key, path)

  def linear(self, key: str, path: VarPath, aliases: tuple[str, ...] = ()) -> None:
    n, m = self.shape(("params", *path, "kernel"))
    alias_w = tuple(f"{a}.weight" for a in aliases)
    self.add(f"{key}.weight", ("params", *path, "kernel"), (m, n), _linear_kernel, alias_w)
    self.bias(key, path, aliases)

  def bias(self, key: str, path: VarPath, aliases: tuple[str, ...] = ()) -> None:
    target = ("params", *path, "bias")
    if target in self.shapes:
      self.add(
        f"{key}.bias", target, self.shapes[target], aliases=tuple(f"{a}.bias" for a in aliases)
      )

  def batch_norm(self, key: str, path: VarPath) -> None:
    self.param_as(f"{key}.weight", ("params", *path, "scale"))
    self.param_as(f"{key}.bias", ("params", *path, "bias"))
    self.param_as(f"{key}.running_mean", ("batch_stats", *path, "mean"))
    self.param_as(f"{key}.running_var", ("batch_stats", *path, "var"))
    self.entries.append(Entry(f"{key}.num_batches_tracked", (), (), optional=True))

  def layer_norm(self, key: str, path: VarPath) -> None:
    self.param_as(f"{key}.weight", ("params", *path, "scale"))
    self.param_as(f"{key}.bias", ("params", *path, "bias"))

  def param_as(self, key: str, target: VarPath) -> None:
    self.add(key, target, self.shape(target))


def _resnet_entries(b: _Builder, m: ResNet) -> None:
  """torchvision ``resnet18`` names: ``conv1``, ``bn1``, ``layerI.J.{conv1,bn1,conv2,bn2,
  downsample.0,downsample.1}``, ``fc``."""
  b.conv("conv1", ("conv1",))
  b.batch_norm("bn1", ("bn1",))
  for i, blocks in enumerate(m.stage_sizes):
    for j in range(blocks):
      zoo, tv = f"stage{i + 1}_block{j + 1}", f"layer{i + 1}.{j}"
      if ("params", zoo, "shortcut", "kernel") in b.shapes:
        b.conv(f"{tv}.downsample.0", (zoo, "shortcut"))
        b.batch_norm(f"{tv}.downsample.1", (zoo, "shortcut_bn"))
      b.conv(f"{tv}.conv1", (zoo, "conv_a"))
      b.batch_norm(f"{tv}.bn1", (zoo, "bn_a"))
      b.conv(f"{tv}.conv2", (zoo, "conv_b"))
      b.batch_norm(f"{tv}.bn2", (zoo, "bn_b"))
  b.linear("fc", ("fc",))


def _vgg_entries(b: _Builder, m: VGG, input_shape: Sequence[int]) -> None:
  """torchvision ``vgg16`` names: ``features.<index>`` (conv, ReLU and pool modules counted),
  ``classifier.<3 j>`` (Linear, ReLU, Dropout repeated)."""
  index, conv, h, w, c = 0, 0, int(input_shape[0]), int(input_shape[1]), int(input_shape[2])
  for v in m.cfg:
    if v == "M":
      index, h, w = index + 1, h // 2, w // 2
      continue
    conv += 1
    b.conv(f"features.{index}", (f"conv{conv}",))
    index, c = index + 2, int(v)
  for j in range(len(m.hidden) + 1):
    key, path = f"classifier.{3 * j}", (f"fc{j + 1}",)
    if j > 0:
      b.linear(key, path)
      continue
    n, out = b.shape(("params", *path, "kernel"))
    if n != h * w * c:
      raise WeightsError(
        f"model {b.model_name}: fc1 reads {n} features, not the {h}x{w}x{c} feature map"
      )
    b.add(
      f"{key}.weight",
      ("params", *path, "kernel"),
      (out, c * VGG_POOL * VGG_POOL),
      _pooled_linear(h, w, c, VGG_POOL),
    )
    b.bias(key, path)


def _vit_entries(b: _Builder, m: ViT) -> None:
  """torchvision ``vit_b_32`` names: ``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
  ``encoder.layers.encoder_layer_I.{ln_1,self_attention,ln_2,mlp.0,mlp.3}``, ``encoder.ln``,
  ``heads.head``."""
  b.conv("conv_proj", ("embed",))
  b.param("class_token", ("cls",))
  b.param("encoder.pos_embedding", ("pos_embedding",))
  for i in range(m.depth):
    zoo, tv = f"block{i + 1}", f"encoder.layers.encoder_layer_{i}"
    b.layer_norm(f"{tv}.ln_1", (zoo, "ln1"))
    # in_proj rows are [q; k; v], each head-major ([heads, head_dim]): the zoo's qkv outputs.
    n, m3 = b.shape(("params", zoo, "attn", "qkv", "kernel"))
    att = f"{tv}.self_attention"
    b.add(
      f"{att}.in_proj_weight", ("params", zoo, "attn", "qkv", "kernel"), (m3, n), _linear_kernel
    )
    b.param_as(f"{att}.in_proj_bias", ("params", zoo, "attn", "qkv", "bias"))
    b.linear(f"{att}.out_proj", (zoo, "attn", "out"))
    b.layer_norm(f"{tv}.ln_2", (zoo, "ln2"))
    b.linear(f"{tv}.mlp.0", (zoo, "mlp1"), aliases=(f"{tv}.mlp.linear_1",))
    b.linear(f"{tv}.mlp.3", (zoo, "mlp2"), aliases=(f"{tv}.mlp.linear_2",))
  b.layer_norm("encoder.ln", ("ln_final",))
  b.linear("heads.head", ("head",))


def _shapes(model: Any) -> dict[VarPath, tuple[int, ...]]:
  flat = traverse_util.flatten_dict(abstract_variables(model))
  return {k: tuple(v.shape) for k, v in flat.items()}


def torchvision_mapping(model: Any) -> list[Entry]:
  """The entries that fill ``model``'s variables from a torchvision state dict.

  Args:
    model: a :class:`cimjax.models.ModelDef` whose module is a zoo :class:`ResNet`
      (``resnet18``; ``resnet20`` takes the same names), :class:`VGG` (``vgg16``) or
      :class:`ViT` (``vit_b32``), at any width, depth and input size.

  Returns:
    One :class:`Entry` per torchvision key, in torchvision's order within each layer.

  Raises:
    WeightsError: the model is not one of those (or its variables do not fit the mapping).
  """
  b = _Builder(model.name, _shapes(model))
  module = model.module
  if isinstance(module, ResNet):
    _resnet_entries(b, module)
  elif isinstance(module, VGG):
    _vgg_entries(b, module, model.input_shape)
  elif isinstance(module, ViT):
    _vit_entries(b, module)
  else:
    raise WeightsError(
      f"model {model.name}: no torchvision mapping for {type(module).__name__}; "
      "supported: the zoo's ResNet (resnet18), VGG (vgg16) and ViT (vit_b32)"
    )
  return b.entries


def _to_numpy(value: Any, key: str, source: str) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (only reached when torch is installed)
    t = value.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()
  if isinstance(value, Mapping) or not hasattr(value, "shape"):
    raise WeightsError(
      f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor (save "
      "model.state_dict() itself)"
    )
  return np.asarray(value)


def _state_dict_arrays(obj: Any, source: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, Mapping):
    raise WeightsError(f"{source}: holds a {type(obj).__name__}, not a state dict")
  return {str(k): _to_numpy(v, str(k), source) for k, v in obj.items()}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` or ``.pth`` (``.pt``, ``.bin``) file as NumPy arrays.

  ``.safetensors`` is read by ``safetensors.numpy.load_file`` (no torch needed; install
  ``cimjax[weights]``); a torch file by ``torch.load(path, weights_only=True)``, which refuses
  pickled objects other than tensors and plain containers. Floating tensors become float32.

  Raises:
    WeightsError: a missing or unreadable file, a missing package, or a file that is not a
      flat ``{name: tensor}`` state dict.
  """
  p = Path(path)
  if not p.is_file():
    raise WeightsError(f"{p}: no such weights file (a .safetensors or .pth state dict)")
  suffix = p.suffix.lower()
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise WeightsError(
        f"{p}: reading .safetensors needs the safetensors package (pip install 'cimjax[weights]')"
      ) from None
    try:
      arrays = load_file(str(p))
    except Exception as e:  # safetensors raises its own error type for a corrupt header
      raise WeightsError(f"{p}: not a readable .safetensors file ({_first_line(e)})") from None
    return {k: np.asarray(v) for k, v in arrays.items()}
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError:
      raise WeightsError(
        f"{p}: reading a torch file needs torch; on a machine with torch, save the state dict "
        "with safetensors.torch.save_file instead (docs/pretrained.md)"
      ) from None
    try:
      obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (not weights-only), RuntimeError (corrupt zip)
      raise WeightsError(f"{p}: not a weights-only torch file ({_first_line(e)})") from None
    return _state_dict_arrays(obj, str(p))
  raise WeightsError(f"{p}: unknown weights format {suffix!r}; use {', '.join(SUFFIXES)}")


def _complete(model: Any, variables: dict[str, Any], key: Array) -> dict[str, Any]:
  """Runs the model's init for every variable not in ``variables`` (the clip tables).

  One float forward pass with every collection mutable: a layer's ``self.param`` returns a
  given variable and initialises an absent one with the layer's own init (``w_clip`` from the
  loaded kernel).
  """
  x = jnp.zeros((1, *model.input_shape), jnp.float32)

  def fill(v: dict[str, Any], k: Array) -> Any:
    _, out = model.module.apply(v, x, QuantContext(), mutable=True, rngs={"params": k})
    return out

  compiled = jax.jit(fill).lower(variables, key).compile(compiler_options=FAST_COMPILE)
  return flax.core.unfreeze(compiled(variables, key))


def _plan(
  model: Any,
  shapes: Mapping[str, tuple[int, ...]],
  source: str,
  *,
  strict: bool,
  exclude: Sequence[str],
) -> list[tuple[Entry, str]]:
  """The mapping entries of ``model`` and the state-dict key each one reads, checked.

  Args:
    model: the zoo model.
    shapes: the state dict's ``{key: shape}``.
    source: the file (or a label) for messages.
    strict, exclude: as in :func:`load_torchvision`.

  Raises:
    WeightsError: a key of the wrong shape, two names of one tensor, or (strict) a missing or
      unused key or a model variable no key fills.
  """
  excluded = lambda k: any(k.startswith(p) for p in exclude)  # noqa: E731
  shapes = {k: v for k, v in shapes.items() if not excluded(k)}
  entries = [e for e in torchvision_mapping(model) if not excluded(e.key)]
  used: set[str] = set()
  plan: list[tuple[Entry, str]] = []
  missing: list[Entry] = []
  for e in entries:
    present = [k for k in (e.key, *e.aliases) if k in shapes]
    if len(present) > 1:
      raise WeightsError(f"{source}: keys {present[0]!r} and {present[1]!r} are the same tensor")
    if not present:
      if not e.optional:
        missing.append(e)
      continue
    key = present[0]
    used.add(key)
    if tuple(shapes[key]) != e.torch_shape:
      where = "/".join(e.target) if e.target else "nothing"
      raise WeightsError(
        f"{source}: key {key!r} has shape {tuple(shapes[key])}; model {model.name} expects "
        f"{e.torch_shape} (for {where})"
      )
    plan.append((e, key))
  unused = [k for k in shapes if k not in used]
  if strict and missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    first = missing[0]
    raise WeightsError(
      f"{source}: missing key {first.key!r}{more} for {'/'.join(first.target)} of model "
      f"{model.name} (strict=False keeps the model's initial values)"
    )
  if strict and unused:
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise WeightsError(
      f"{source}: unexpected key {unused[0]!r}{more}: model {model.name} has no such "
      "variable (a different model, or strict=False to ignore it)"
    )
  if strict and not exclude:
    covered = {e.target for e in entries}
    for target in _shapes(model):
      if target[-1] not in CLIP_NAMES and target not in covered:
        raise WeightsError(
          f"model {model.name}: variable {'/'.join(target)} has no torchvision key"
        )
  return plan


def read_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
  """The ``{key: shape}`` of a weights file without reading its tensors' data.

  ``.safetensors``: the file's header; a torch file: ``torch.load(..., mmap=True)`` (the
  tensors stay on disk).

  Raises:
    WeightsError: as :func:`read_state_dict`.
  """
  p = Path(path)
  if p.is_file() and p.suffix.lower() == ".safetensors":
    try:
      from safetensors import safe_open
    except ImportError:
      return {k: tuple(v.shape) for k, v in read_state_dict(p).items()}  # names the extra
    try:
      with safe_open(str(p), framework="numpy") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error type for a corrupt header
      raise WeightsError(f"{p}: not a readable .safetensors file ({_first_line(e)})") from None
  if p.is_file() and p.suffix.lower() in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError:
      return {k: tuple(v.shape) for k, v in read_state_dict(p).items()}  # names torch
    try:
      obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError (not weights-only), RuntimeError (corrupt zip)
      raise WeightsError(f"{p}: not a weights-only torch file ({_first_line(e)})") from None
    if not isinstance(obj, Mapping):
      raise WeightsError(f"{p}: not a state dict (a {type(obj).__name__})")
    return {str(k): tuple(getattr(v, "shape", ())) for k, v in obj.items()}
  return {k: tuple(v.shape) for k, v in read_state_dict(p).items()}  # the errors


def check_weights_file(
  model: Any,
  path: str | os.PathLike[str],
  *,
  strict: bool = True,
  exclude: Sequence[str] = (),
) -> None:
  """Checks a weights file against ``model`` as :func:`load_torchvision` would, reading only
  its keys and shapes (a run checks its ``pretrained`` file before any stage starts).

  Raises:
    WeightsError: the first problem :func:`load_torchvision` would report.
  """
  _plan(model, read_shapes(path), str(path), strict=strict, exclude=exclude)


def _as_key(key: Array | int) -> Array:
  return jax.random.PRNGKey(int(key)) if isinstance(key, int | np.integer) else key


def load_torchvision(
  model: Any,
  path_or_state_dict: str | os.PathLike[str] | StateDict,
  *,
  strict: bool = True,
  exclude: Sequence[str] = (),
  key: Array | int = 0,
) -> dict[str, Any]:
  """A zoo model's variables from a torchvision state dict.

  Args:
    model: a :class:`cimjax.models.ModelDef` (ResNet, VGG or ViT, see
      :func:`torchvision_mapping`); its ``input_shape`` sets VGG's pool folding and ViT's
      position-embedding length.
    path_or_state_dict: a ``.safetensors`` / ``.pth`` file (:func:`read_state_dict`) or a
      mapping ``{key: array or torch tensor}``.
    strict: every mapped key must be present and every key of the state dict used.
    exclude: key prefixes to ignore (e.g. ``("fc.",)`` for a new head); the zoo variables they
      would fill keep the model's initial values, as do those of keys missing in non-strict
      mode.
    key: PRNG key (or seed) of those initial values.

  Returns:
    ``{"params": ..., ["batch_stats": ...]}`` shaped like the model's init; the clip tables
    hold the model's initial values for the loaded weights.

  Raises:
    WeightsError: an unreadable file, a key of the wrong shape, or (strict) a missing or
      unused key; the message names the file and the key.
  """
  if isinstance(path_or_state_dict, Mapping):
    source = f"state dict for {model.name}"
    sd = _state_dict_arrays(path_or_state_dict, source)
  else:
    source = str(path_or_state_dict)
    sd = read_state_dict(path_or_state_dict)
  shapes = {k: tuple(v.shape) for k, v in sd.items()}
  loaded: dict[VarPath, np.ndarray] = {}
  for e, present in _plan(model, shapes, source, strict=strict, exclude=exclude):
    if e.target:
      loaded[e.target] = np.asarray(e.convert(sd[present].astype(np.float32)), np.float32)
  tree = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in loaded.items()})
  variables = _complete(model, flax.core.unfreeze(tree), _as_key(key))
  return {c: variables[c] for c in ("params", "batch_stats") if c in variables}


__all__ = [
  "CLIP_NAMES",
  "Entry",
  "adaptive_pool_matrix",
  "check_weights_file",
  "load_torchvision",
  "read_shapes",
  "read_state_dict",
  "torchvision_mapping",
]
