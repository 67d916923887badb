"""The training config: defaults, validation, and the data and model it names."""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from absl import logging

from cimjax import data as data_lib
from cimjax.models import MODEL_NAMES, ModelDef, get_model
from cimjax.train.stages import STAGE_SPECS, STAGES, config_error, stage_config
from cimjax.train.state import OPTIMIZERS

ConfigDict = ml_collections.ConfigDict


def default_config() -> ConfigDict:
  """All config fields with defaults (small CNN on full Fashion-MNIST).

  Top level: ``model`` (zoo name), ``model_kwargs`` (e.g. ``channels``), ``data`` (see
  :func:`cimjax.data.load_dataset`; -1 means default/all, 0 for image_size/channels means
  native), ``seed``, ``batch_size``, ``eval_batch_size``, ``checkpoint_every`` (steps; 0: only
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
  c.data = ConfigDict(
    dict(
      name="fashion_mnist",
      data_dir="",
      train_size=-1,
      val_size=-1,
      test_size=-1,
      split_seed=0,
      image_size=0,
      channels=0,
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


def _validate_top_level(config: ConfigDict) -> None:
  if config.model not in MODEL_NAMES:
    raise config_error("model", config.model, ", ".join(MODEL_NAMES))
  if config.data.name not in data_lib.DATASET_NAMES:
    raise config_error("data.name", config.data.name, ", ".join(data_lib.DATASET_NAMES))
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


def validate_config(config: ConfigDict) -> None:
  """Checks the fields the stages use.

  Raises:
    ConfigError: naming the first bad field and what is allowed.
  """
  _validate_top_level(config)
  for spec in STAGE_SPECS:
    _validate_stage(spec.name, config[spec.name])
  for spec in STAGE_SPECS:
    if spec.validate is not None:
      spec.validate(config[spec.name])


def load_splits(config: ConfigDict) -> data_lib.Splits:
  """The config's dataset (see :func:`cimjax.data.load_dataset`)."""
  d = config.data
  opt = lambda v: None if v < 0 else v
  return data_lib.load_dataset(
    d.name,
    data_dir=d.data_dir or None,
    train_size=opt(d.train_size),
    val_size=opt(d.val_size),
    test_size=opt(d.test_size),
    split_seed=d.split_seed,
    image_size=d.image_size or None,
    channels=d.channels or None,
  )


def build_model(config: ConfigDict, splits: data_lib.Splits) -> ModelDef:
  """The zoo model of the config, with its input shape taken from the data."""
  kw = {
    k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model_kwargs.to_dict().items()
  }
  model = get_model(config.model, num_classes=splits.num_classes, **kw)
  if tuple(model.input_shape) != tuple(splits.input_shape):
    logging.info(
      "model %s expects %s; using the data's shape %s",
      config.model,
      model.input_shape,
      splits.input_shape,
    )
    model = dataclasses.replace(model, input_shape=tuple(splits.input_shape))
  return model


def num_steps(config: ConfigDict, stage: str, steps_per_epoch: int) -> int:
  """The stage's length: ``steps`` if > 0, else ``ceil(epochs * steps_per_epoch)``."""
  sc = config[stage]
  return int(sc.steps) if sc.steps > 0 else int(math.ceil(sc.epochs * steps_per_epoch))


__all__ = [
  "STAGES",
  "build_model",
  "default_config",
  "load_splits",
  "num_steps",
  "stage_config",
  "validate_config",
]
