"""The training config: defaults, validation, and the data and model it names."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import ml_collections
from absl import logging

from cimjax import data as data_lib
from cimjax import models as models_lib
from cimjax.errors import ConfigError, DataError, ModelError, UnknownModelError
from cimjax.models import ModelDef
from cimjax.train.stages import STAGE_SPECS, STAGES, config_error, stage_config
from cimjax.train.state import OPTIMIZERS

ConfigDict = ml_collections.ConfigDict


# The train.data fields of the streaming loader (cimjax.data.stream.StreamOptions), with the
# in-memory path's data-parallel switch; a checkpoint written before they existed resumes as if
# it had these values.
STREAM_DEFAULTS: dict[str, Any] = dict(
  stream=False,
  workers=0,
  prefetch=2,
  threads=1,
  augment=True,
  crop_size=224,
  resize_size=256,
  min_scale=0.08,
  normalize="data",
  stats_images=1000,
  data_parallel=False,
  # the part an image folder's val/ holds (val, or test for ImageNet's train/ + val/ layout);
  # listed here so that checkpoints from before the field resume with its default
  val_folder="val",
)
# train.data fields a resumed stage may change (they change speed, not batches).
DATA_RESUME_IGNORED = ("workers", "prefetch", "threads")


def default_config() -> ConfigDict:
  """All config fields with defaults (small CNN on full Fashion-MNIST).

  Top level: ``model`` (a model reference: docs/own_models.md), ``model_kwargs`` (e.g.
  ``channels``), ``pretrained``
  (a torchvision ``.safetensors``/``.pth`` state dict the fp32 stage starts from instead of a
  random init, :func:`cimjax.models.pretrained.load_torchvision`; empty: none), ``data``
  (``source`` and ``path``, or the built-in ``name`` when ``source`` is empty; see
  :func:`cimjax.data.load_dataset` and BUILD_NOTES.md "Data sources"; -1 means default/all, 0
  for image_size/channels/num_classes means native / from the data; ``stream`` (decode the
  train split on the fly with grain, :mod:`cimjax.data.stream`, for ``folder``/``npy``/``npz``
  sources too large for memory) with ``workers`` (decoding processes, 0: in-process),
  ``prefetch`` (batches buffered per worker), ``threads`` (per worker), ``augment`` (random
  resized crop + flip), ``crop_size``, ``resize_size`` (eval: resize then centre-crop),
  ``min_scale``, ``normalize`` (data|imagenet), ``stats_images``; ``data_parallel`` (in-memory
  data: split each batch over all devices; a stream always is)), ``seed``, ``batch_size`` (the
  global batch: per-device batch x devices x processes),
  ``eval_batch_size``, ``checkpoint_every`` (steps; 0: only
  at the end), ``max_to_keep``, ``log_every`` (steps), ``eval_every`` (steps; 0: every epoch;
  negative: never), ``progress`` (rich bar), ``fast_compile`` (skip XLA's expensive
  optimisations: faster compiles, slower steps; for runs of a few dozen steps),
  ``throttle_s`` (sleep after each step; tests),
  ``bn_recal_batches``, ``calib_images``, ``bits`` (min/max bits, constraint, cell_bits for
  the anyprec sampling mask), ``eval_bits`` (uniform bit-widths reported after anyprec).

  Per stage (``fp32``, ``int8``, ``anyprec``, ``finetune``; the sections come from
  :data:`cimjax.train.stages.STAGE_SPECS`): ``epochs`` (float) or ``steps`` (>0 overrides),
  ``optimizer`` (sgd|adamw), ``lr``, ``warmup_epochs``, ``end_lr_frac``, ``weight_decay``,
  ``momentum``, ``nesterov``, ``label_smoothing``, ``clip_lr_mult``, ``grad_clip_norm``.
  ``anyprec`` adds ``num_policies`` (K sampled), ``include_min``, ``sandwich``, ``distill``,
  ``distill_weight``, ``temperature``, ``recalibrate_clips``; ``finetune`` adds ``source``
  (auto|anyprec|int8).
  """
  c = ConfigDict()
  c.model = "small_cnn"
  c.model_kwargs = ConfigDict()
  c.pretrained = ""  # torchvision weights the fp32 stage starts from (docs/pretrained.md)
  c.data = ConfigDict(
    dict(
      name="fashion_mnist",
      source="",  # "" or a built-in name: the built-in `name`; npz|npy|folder|hf|tfds
      path="",  # the file, folder or hub dataset of a non-built-in source
      data_dir="",
      train_size=-1,
      val_size=-1,
      test_size=-1,
      split_seed=0,
      image_size=0,
      channels=0,
      val_fraction=0.1,
      test_fraction=0.2,
      num_classes=0,
      on_bad_image="skip",
      **STREAM_DEFAULTS,
    )
  )
  c.seed = 0
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.checkpoint_every = 500
  c.max_to_keep = 2
  c.log_every = 50
  c.eval_every = 0
  c.progress = True
  c.fast_compile = False
  c.throttle_s = 0.0
  c.bn_recal_batches = 10
  c.calib_images = 512
  c.bits = ConfigDict(dict(min_bits=2, max_bits=8, constraint="none", cell_bits=0))
  c.eval_bits = (8, 6, 4, 3, 2)
  for spec in STAGE_SPECS:
    c[spec.name] = spec.defaults()
  return c


def resolve_model(name: str, **kwargs: Any) -> ModelDef:
  """The model that ``name`` refers to, built with ``kwargs``: a config's ``model`` and the
  CLIs' ``--model`` go through here to :func:`cimjax.models.resolve_model` (zoo and registered
  names, ``package.module:factory``, ``path/file.py:factory``, ``.onnx`` files).

  Args:
    name: the model reference.
    **kwargs: its options (``num_classes``, ``image_size``, module attributes).

  Raises:
    UnknownModelError: the reference resolves to nothing (``allowed`` says what is allowed
      and what was tried).
    ConfigError: the model cannot be built with the options (or its factory fails).
  """
  try:
    return models_lib.resolve_model(name, **kwargs)
  except UnknownModelError:
    raise
  except ModelError as e:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(msg) from None


def check_model(name: str) -> None:
  """Checks that a model reference names something, without building the model.

  Raises:
    UnknownModelError: as :func:`resolve_model`.
    ConfigError: the reference cannot be loaded (e.g. its module fails to import).
  """
  try:
    models_lib.check_model_ref(name)
  except UnknownModelError:
    raise
  except ModelError as e:
    raise ConfigError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None


def _validate_top_level(config: ConfigDict) -> None:
  try:
    check_model(config.model)
  except UnknownModelError as e:
    raise config_error("model", config.model, e.allowed) from None
  except ConfigError as e:
    raise ConfigError(f"config.model = {config.model!r}: {e}") from None
  _validate_data_source(config.data)
  d = config.data
  for f in ("train_size", "val_size", "test_size"):
    if not isinstance(d[f], int):
      raise config_error(f"data.{f}", d[f], "an integer (-1: the default)")
  for f in ("split_seed", "image_size", "channels"):
    if not isinstance(d[f], int) or d[f] < 0:
      raise config_error(f"data.{f}", d[f], "an integer >= 0")
  native = _NATIVE_SIZE.get(data_source(d))
  if d.image_size and native and d.image_size < native:
    raise config_error("data.image_size", d.image_size, f"0 (native) or >= {native}")
  if not isinstance(config.seed, int) or config.seed < 0:
    raise config_error("seed", config.seed, "an integer >= 0")
  if not isinstance(config.eval_every, int):
    raise config_error("eval_every", config.eval_every, "an integer")
  for f in ("batch_size", "eval_batch_size"):
    if not isinstance(config[f], int) or config[f] < 1:
      raise config_error(f, config[f], "an integer >= 1")
  for f in ("checkpoint_every", "log_every", "max_to_keep", "bn_recal_batches", "calib_images"):
    if not isinstance(config[f], int) or config[f] < 0:
      raise config_error(f, config[f], "an integer >= 0")
  if config.max_to_keep < 1:
    raise config_error("max_to_keep", config.max_to_keep, "an integer >= 1")
  b = config.bits
  if not (1 <= b.min_bits <= b.max_bits <= 8):
    raise config_error("bits", (b.min_bits, b.max_bits), "1 <= min_bits <= max_bits <= 8")
  if b.constraint not in ("none", "io", "weight", "both"):
    raise config_error("bits.constraint", b.constraint, "none, io, weight, both")
  if b.constraint in ("weight", "both") and not b.cell_bits:
    raise config_error("bits.cell_bits", b.cell_bits, "an integer >= 1 with constraint weight|both")
  for e in config.eval_bits:
    if not isinstance(e, int) or not 1 <= e <= 8:
      raise config_error("eval_bits", tuple(config.eval_bits), "bit-widths in 1..8")


def _validate_stage(s: str, sc: ConfigDict) -> None:
  if sc.optimizer not in OPTIMIZERS:
    raise config_error(f"{s}.optimizer", sc.optimizer, ", ".join(OPTIMIZERS))
  if not sc.lr > 0:
    raise config_error(f"{s}.lr", sc.lr, "a number > 0")
  if sc.epochs < 0 or sc.steps < 0:
    raise config_error(f"{s}.epochs/steps", (sc.epochs, sc.steps), "numbers >= 0")
  if not 0 <= sc.label_smoothing < 1:
    raise config_error(f"{s}.label_smoothing", sc.label_smoothing, "0 <= x < 1")


def _validate_pretrained(config: ConfigDict) -> None:
  path = config.get("pretrained", "")
  if path and not (isinstance(path, str) and os.path.isfile(path)):
    raise config_error("pretrained", path, "a .safetensors or .pth file that exists, or empty")


def validate_config(config: ConfigDict) -> None:
  """Checks the fields the stages use.

  Raises:
    ConfigError: naming the first bad field and what is allowed.
  """
  _validate_top_level(config)
  _validate_pretrained(config)
  for spec in STAGE_SPECS:
    _validate_stage(spec.name, config[spec.name])
  for spec in STAGE_SPECS:
    if spec.validate is not None:
      spec.validate(config[spec.name])


def data_source(d: ConfigDict) -> str:
  """The source of a ``data`` config: ``source``, or the built-in ``name`` when it is empty."""
  return d.get("source", "") or d.name


def _validate_data_source(d: ConfigDict) -> None:
  if d.name not in data_lib.DATASET_NAMES:
    raise config_error("data.name", d.name, ", ".join(data_lib.DATASET_NAMES))
  source = data_source(d)
  if source not in data_lib.SOURCES:
    raise config_error("data.source", source, ", ".join(data_lib.SOURCES))
  if source in data_lib.USER_SOURCES and not d.get("path", ""):
    raise config_error("data.path", d.get("path", ""), f"the file, folder or dataset of {source}")
  fractions = [d.get(f, v) for f, v in (("val_fraction", 0.1), ("test_fraction", 0.2))]
  for f, v in zip(("val_fraction", "test_fraction"), fractions):
    if not isinstance(v, (int, float)) or not 0 <= v < 1:
      raise config_error(f"data.{f}", v, "a number 0 <= x < 1")
  if sum(fractions) >= 1:
    raise config_error("data.val_fraction + test_fraction", sum(fractions), "< 1")
  n_cls = d.get("num_classes", 0)
  if not isinstance(n_cls, int) or n_cls < 0:
    raise config_error("data.num_classes", n_cls, "an integer >= 0 (0: from the data)")
  if d.get("on_bad_image", "skip") not in data_lib.ON_BAD_IMAGE:
    raise config_error("data.on_bad_image", d.on_bad_image, ", ".join(data_lib.ON_BAD_IMAGE))
  if d.get("val_folder", "val") not in ("val", "test"):
    raise config_error("data.val_folder", d.get("val_folder"), "val, test")
  _validate_stream(d)


def _validate_stream(d: ConfigDict) -> None:
  for f in ("stream", "data_parallel"):
    if not isinstance(d.get(f, False), bool):
      raise config_error(f"data.{f}", d.get(f), "True or False")
  if not d.get("stream", False):
    return
  if data_source(d) not in data_lib.STREAM_SOURCES:
    raise config_error(
      "data.source", data_source(d), f"{', '.join(data_lib.STREAM_SOURCES)} with data.stream=True"
    )
  try:
    stream_options(d).validate()
  except DataError as e:
    field, _, rest = str(e).partition("=")
    value, _, allowed = rest.partition("; allowed: ")
    raise ConfigError(
      f"config.{field.removeprefix('train.')} = {value}; allowed: {allowed}"
    ) from None


def stream_options(d: ConfigDict) -> data_lib.StreamOptions:
  """The :class:`cimjax.data.StreamOptions` of a ``data`` config."""
  g = lambda f: d.get(f, STREAM_DEFAULTS.get(f))
  return data_lib.StreamOptions(
    workers=g("workers"),
    prefetch=g("prefetch"),
    threads=g("threads"),
    augment=g("augment"),
    crop_size=g("crop_size"),
    resize_size=g("resize_size"),
    min_scale=g("min_scale"),
    normalize=g("normalize"),
    stats_images=g("stats_images"),
    channels=d.get("channels", 0),
    on_bad_image=d.get("on_bad_image", "skip"),
  )


def _load_options(d: ConfigDict) -> data_lib.LoadOptions:
  opt = lambda v: None if v < 0 else v
  return data_lib.LoadOptions(
    train_size=opt(d.train_size),
    val_size=opt(d.val_size),
    test_size=opt(d.test_size),
    split_seed=d.split_seed,
    val_fraction=float(d.val_fraction),
    test_fraction=float(d.test_fraction),
    num_classes=d.num_classes or None,
    on_bad_image=d.on_bad_image,
    val_folder=d.get("val_folder", "val"),
  )


def load_stream(config: ConfigDict, local_devices: int | None = None) -> data_lib.StreamData:
  """The config's streamed train split and its in-memory val/test and training sample.

  The sample (``splits.train``) holds ``max(calib_images, bn_recal_batches * batch_size,
  stats_images)`` training images (clip calibration and batch-norm re-estimation read it).
  Each call opens the data afresh (a folder is scanned): keep the returned splits (they carry
  the stream, ``splits.stream``) and pass them on, as the pipeline does.

  Args:
    config: the training config (``data.stream`` True).
    local_devices: this host's devices the batch splits over (default: all local devices).

  Raises:
    DataError: bad data or a batch that does not split over the hosts and devices.
  """
  import jax  # pylint: disable=g-import-not-at-top

  d = config.data
  devices = jax.local_device_count() if local_devices is None else int(local_devices)
  sample = max(config.calib_images, config.bn_recal_batches * config.batch_size, 1)
  return data_lib.open_stream(
    data_source(d),
    d.path,
    _load_options(d),
    stream_options(d),
    global_batch=config.batch_size,
    local_devices=devices,
    sample_images=sample,
    sample_seed=config.seed,
  )


def load_splits(config: ConfigDict) -> data_lib.Splits:
  """The config's dataset (see :func:`cimjax.data.load_dataset`); with ``data.stream`` the
  in-memory splits of :func:`load_stream` (val, test, and a sample of the train split)."""
  d = config.data
  if d.get("stream", False):
    return load_stream(config).splits
  opt = lambda v: None if v < 0 else v
  source = data_source(d)
  if source in data_lib.DATASET_NAMES:
    return data_lib.load_dataset(
      source,
      data_dir=d.data_dir or None,
      train_size=opt(d.train_size),
      val_size=opt(d.val_size),
      test_size=opt(d.test_size),
      split_seed=d.split_seed,
      image_size=d.image_size or None,
      channels=d.channels or None,
    )
  return data_lib.load_dataset(
    source,
    path=d.path,
    data_dir=d.data_dir or None,
    train_size=opt(d.train_size),
    val_size=opt(d.val_size),
    test_size=opt(d.test_size),
    split_seed=d.split_seed,
    image_size=d.image_size or None,
    channels=d.channels or None,
    val_fraction=float(d.val_fraction),
    test_fraction=float(d.test_fraction),
    num_classes=d.num_classes or None,
    on_bad_image=d.on_bad_image,
    val_folder=d.get("val_folder", "val"),
  )


def build_model(config: ConfigDict, splits: data_lib.Splits) -> ModelDef:
  """The zoo model of the config, with its input shape taken from the data."""
  return _model_for(config, tuple(splits.input_shape), splits.num_classes, log=True)


def _model_for(
  config: ConfigDict, input_shape: tuple[int, ...], num_classes: int, *, log: bool = False
) -> ModelDef:
  kw = {
    k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model_kwargs.to_dict().items()
  }
  model = resolve_model(config.model, num_classes=num_classes, **kw)
  if tuple(model.input_shape) != tuple(input_shape):
    if log:
      logging.info(
        "model %s expects %s; using the data's shape %s",
        config.model,
        model.input_shape,
        input_shape,
      )
    model = dataclasses.replace(model, input_shape=tuple(input_shape))
  return model


# Image side and classes of each dataset's files (what load_dataset returns before padding), so
# that a model can be built and checked before the data is loaded.
_NATIVE_SIZE = {"fashion_mnist": 28, "fashion_mnist_subset": 28, "digits": 8}
_NUM_CLASSES = 10


def check_data(config: ConfigDict) -> data_lib.Splits | None:
  """Checks that the config's dataset is there without loading a large built-in one.

  Fashion-MNIST: its four files exist; the committed subset: its file exists; any other source
  (the small digits set, a user's data) is loaded: that is the check, and it checks the split
  sizes too.

  Returns:
    The loaded splits when checking meant loading them (pass them on), else None.

  Raises:
    DataError: naming the missing file and how to get it.
  """
  d = config.data
  if data_source(d) == "fashion_mnist":
    root = data_lib.fashion_mnist_dir(d.data_dir or None)
    for name in data_lib.FASHION_FILES.values():
      if not (root / name).is_file():
        raise DataError(
          f"config.data.name = 'fashion_mnist': {root / name} not found; install it with "
          f"`apt-get install dataset-fashion-mnist`, or set config.data.data_dir (or "
          f"${data_lib.DATA_DIR_ENV}) to a folder holding the four Fashion-MNIST IDX .gz files"
        )
  elif data_source(d) == "fashion_mnist_subset":
    p = data_lib.subset_path()
    if not p.is_file():
      raise DataError(f"config.data.name = 'fashion_mnist_subset': {p} not found")
  else:
    return load_splits(config)
  return None


def static_model(config: ConfigDict, splits: data_lib.Splits | None = None) -> ModelDef:
  """The config's model as :func:`build_model` builds it, without loading the data (the input
  shape and classes of the dataset's files; the dataset is loaded for a dataset not known here).

  Raises:
    ConfigError: an unknown model, or options it does not accept (naming the field).
  """
  native = _NATIVE_SIZE.get(data_source(config.data))
  if splits is not None or native is None:
    splits = splits if splits is not None else load_splits(config)
    shape, classes = tuple(splits.input_shape), splits.num_classes
  else:
    side = config.data.image_size or native
    shape, classes = (side, side, config.data.channels or 1), _NUM_CLASSES
  try:
    return _model_for(config, shape, classes)
  except UnknownModelError as e:
    raise config_error("model", config.model, e.allowed) from None
  except ConfigError as e:
    allowed = f"options that {config.model} accepts ({e})"
    raise config_error("model_kwargs", config.model_kwargs.to_dict(), allowed) from None


def static_specs(config: ConfigDict, splits: data_lib.Splits | None = None) -> list[Any]:
  """The layer specs (policy order) of :func:`static_model`; checks the model's options.

  Raises:
    ConfigError: the model cannot be built or traced with the config's options.
  """
  from cimjax.trace import trace_specs  # pylint: disable=g-import-not-at-top

  model = static_model(config, splits)
  try:
    return trace_specs(model)
  except (TypeError, ValueError) as e:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise config_error(
      "model_kwargs", config.model_kwargs.to_dict(), f"options that {config.model} accepts ({msg})"
    ) from None


def num_steps(config: ConfigDict, stage: str, steps_per_epoch: int) -> int:
  """The stage's length: ``steps`` if > 0, else ``ceil(epochs * steps_per_epoch)``."""
  sc = config[stage]
  return int(sc.steps) if sc.steps > 0 else int(math.ceil(sc.epochs * steps_per_epoch))


__all__ = [
  "DATA_RESUME_IGNORED",
  "STAGES",
  "STREAM_DEFAULTS",
  "build_model",
  "check_data",
  "check_model",
  "default_config",
  "load_splits",
  "load_stream",
  "num_steps",
  "resolve_model",
  "stage_config",
  "static_model",
  "static_specs",
  "stream_options",
  "validate_config",
]
