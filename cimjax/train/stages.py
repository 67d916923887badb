"""The training stages as a table: what each stage starts from, trains, calibrates and reports.

Stages (run by :func:`cimjax.train.run_stage`), each in ``workdir/<stage>/``, each starting
from the previous stage's final variables:

* ``fp32``: float pretraining (policy None).
* ``int8``: MSE calibration of every clip-table row, then QAT at 8/8 for all layers.
* ``anyprec``: any-precision QAT, one set of weights for every policy. Each step runs the
  "sandwich rule" (BigNAS / once-for-all): the max-bits policy, the min-bits policy and ``K``
  policies sampled uniformly among the allowed (w, a) pairs of each layer (``K = 1`` by
  default); the loss is the mean of their label cross-entropies. In-place distillation from the
  max-bits output is an option (``distill``); measured on Fashion-MNIST it did not beat the
  labels when starting from a converged INT8 model (BUILD_NOTES.md). Clip rows other than the
  max-bits one are re-calibrated from the INT8 weights first.
* ``finetune``: QAT of one given policy, from the anyprec (or int8) variables.

A stage is one :class:`StageSpec` in :data:`STAGE_SPECS`; its position there seeds its data
order and PRNG key. A stage is finished when its ``result.json`` exists (:func:`is_done`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cimjax import policy as policy_lib
from cimjax.errors import ConfigError, StageError
from cimjax.train.policies import step_policies
from cimjax.train.state import TrainState
from cimjax.train.steps import Trainer

Array = jax.Array
ConfigDict = ml_collections.ConfigDict
StepFn = Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, dict[str, Array]]]
# Clip-table rows a stage re-calibrates from its starting weights before training.
CALIB_ROWS: dict[str, tuple[int, ...] | None] = {
  "": (),  # none
  "all": None,  # every row
  "untrained": (1, 2, 3, 4, 5, 6, 7),  # the rows INT8 QAT does not train
}


def config_error(field: str, value: Any, allowed: str) -> ConfigError:
  """``ConfigError("config.<field> = <value>; allowed: <allowed>")``."""
  return ConfigError(f"config.{field} = {value!r}; allowed: {allowed}")


def stage_config(epochs: float, lr: float, optimizer: str = "adamw", **kw: Any) -> ConfigDict:
  """Optimizer and length of one stage (fields: see :func:`cimjax.train.default_config`)."""
  c = ConfigDict()
  c.epochs = float(epochs)
  c.steps = 0
  c.optimizer = optimizer
  c.lr = float(lr)
  c.warmup_epochs = 0.0
  c.end_lr_frac = 0.0
  c.weight_decay = 1e-4
  c.momentum = 0.9
  c.nesterov = True
  c.label_smoothing = 0.0
  c.clip_lr_mult = 1.0
  c.grad_clip_norm = 0.0
  c.update(kw)
  return c


@dataclasses.dataclass(frozen=True)
class StagePolicies:
  """The policies a stage can train, from the config's bit mask (and a given policy).

  Attributes:
    num_layers: L.
    layer_names: the quantized layers in call order.
    mask: bool ``[L, 8, 8]`` allowed (w, a) pairs (``config.bits``).
    max_policy: int32 ``[L, 2]`` largest allowed bits per layer.
    min_policy: int32 ``[L, 2]`` smallest allowed bits per layer.
    given: the policy passed to :func:`cimjax.train.run_stage`, or None.
    model_name: for messages.
  """

  num_layers: int
  layer_names: tuple[str, ...]
  mask: np.ndarray
  max_policy: Array
  min_policy: Array
  given: Any = None
  model_name: str = ""


def one_policy_steps(
  trainer: Trainer, config: ConfigDict, policies: StagePolicies, train_policy: Any
) -> StepFn:
  """Steps on the training policy alone (``train_policy`` None: float)."""
  del config, policies  # unused: one fixed policy
  return lambda state, batch: trainer.train_step(state, batch, train_policy)


def anyprec_steps(
  trainer: Trainer, config: ConfigDict, policies: StagePolicies, train_policy: Any
) -> StepFn:
  """Sandwich steps: the max-bits policy, ``K`` sampled policies (and the min-bits one)."""
  del train_policy  # the trainer holds the max-bits policy
  k, include_min = int(config.anyprec.num_policies), bool(config.anyprec.include_min)
  mask = jnp.asarray(policies.mask)

  def step_fn(state, batch):
    pols = step_policies(
      state.key, state.step, mask, policies.min_policy, k=k, include_min=include_min
    )
    return trainer.anyprec_step(state, batch, pols)

  return step_fn


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One training stage.

  Attributes:
    name: the stage (its directory and config section).
    defaults: the stage's config section with default values.
    source: ``source(config, workdir)``: the finished stage whose variables it starts from
      (None: random initialisation).
    policy: ``policy(StagePolicies) -> int [L, 2] | None``: the policy trained (None: float).
    steps: ``steps(trainer, config, policies, train_policy) -> step_fn``, the step
      :func:`cimjax.train.fit` runs: :func:`one_policy_steps` or :func:`anyprec_steps`.
    calibrate: ``calibrate(config, source)``: which clip-table rows are re-calibrated from
      the starting weights before training, a key of :data:`CALIB_ROWS` (``""``: none).
    ptq_key: if set, the result key of the calibrated model's validation accuracy (percent)
      with the training policy, measured before training (post-training quantisation).
    recal_bn: re-estimate batch-norm statistics for the policy before training.
    needs_policy: the stage trains a policy given by the caller (``workdir/<stage>/<name>/``;
      recorded in the result).
    final_evals: ``final_evals(config, num_layers, train_policy) -> {name: policy}`` evaluated
      on val and test at the end.
    validate: optional ``validate(section)`` raising :class:`ConfigError` (beyond the checks
      every stage's optimizer fields get).
  """

  name: str
  defaults: Callable[[], ConfigDict]
  source: Callable[[ConfigDict, Path], str | None]
  policy: Callable[[StagePolicies], Any]
  final_evals: Callable[[ConfigDict, int, Any], dict[str, Any]]
  steps: Callable[[Trainer, ConfigDict, StagePolicies, Any], StepFn] = one_policy_steps
  calibrate: Callable[[ConfigDict, str | None], str] = lambda config, source: ""
  ptq_key: str = ""
  recal_bn: bool = False
  needs_policy: bool = False
  validate: Callable[[ConfigDict], None] | None = None


def stage_dir(workdir: str | os.PathLike[str], stage: str, policy_name: str | None = None) -> Path:
  """``workdir/<stage>`` (``workdir/<stage>/<policy_name>`` for a stage given a policy)."""
  d = Path(workdir) / stage
  spec = _BY_NAME.get(stage)
  return d / policy_name if spec is not None and spec.needs_policy and policy_name else d


def is_done(sdir: str | os.PathLike[str]) -> bool:
  """Whether the stage in ``sdir`` finished: its ``result.json`` exists (written last)."""
  return (Path(sdir) / "result.json").is_file()


def _after(stage: str) -> Callable[[ConfigDict, Path], str]:
  return lambda config, workdir: stage


def _configured_source(config: ConfigDict, workdir: Path) -> str:
  """``config.finetune.source``; ``auto``: anyprec when it finished, else int8."""
  source = config.finetune.source
  if source == "auto":
    source = "anyprec" if is_done(stage_dir(workdir, "anyprec")) else "int8"
  return source


def _given_policy(p: StagePolicies) -> np.ndarray:
  try:
    return policy_lib.validate_policy(
      p.given, p.num_layers, min_bits=1, max_bits=8, layer_names=list(p.layer_names)
    )
  except policy_lib.PolicyError as e:
    raise StageError(f"bad policy for {p.model_name}: {e}") from None


def _eval_bits(config: ConfigDict, num_layers: int, train_policy: Any) -> dict[str, Any]:
  """Every ``config.eval_bits`` width, uniform over the layers, widest first."""
  return {
    f"w{e}a{e}": policy_lib.uniform_policy(num_layers, e, e)
    for e in sorted(set(config.eval_bits), reverse=True)
  }


def _eval_as(name: str) -> Callable[[ConfigDict, int, Any], dict[str, Any]]:
  return lambda config, num_layers, train_policy: {name: train_policy}


def _anyprec_defaults() -> ConfigDict:
  return stage_config(
    2,
    5e-4,
    "adamw",
    num_policies=1,
    include_min=True,
    sandwich=True,
    distill=False,
    distill_weight=1.0,
    temperature=1.0,
    recalibrate_clips=True,
  )


def _validate_anyprec(a: ConfigDict) -> None:
  if a.num_policies < 0 or (a.num_policies == 0 and not a.include_min and not a.sandwich):
    raise config_error(
      "anyprec.num_policies", a.num_policies, "an integer >= 0 (with at least one policy a step)"
    )
  if a.distill and not a.sandwich:
    raise config_error("anyprec.distill", a.distill, "False unless anyprec.sandwich is True")


def _validate_finetune(f: ConfigDict) -> None:
  if f.source not in ("auto", "anyprec", "int8"):
    raise config_error("finetune.source", f.source, "auto, anyprec, int8")


STAGE_SPECS: tuple[StageSpec, ...] = (
  StageSpec(
    "fp32",
    defaults=lambda: stage_config(6, 2e-3, "adamw", warmup_epochs=0.2),
    source=lambda config, workdir: None,
    policy=lambda p: None,
    final_evals=_eval_as("float"),
  ),
  StageSpec(
    "int8",
    defaults=lambda: stage_config(1, 2e-4, "adamw"),
    source=_after("fp32"),
    policy=lambda p: policy_lib.uniform_policy(p.num_layers, 8, 8),
    calibrate=lambda config, source: "all",
    ptq_key="ptq_val_w8a8",
    final_evals=_eval_as("w8a8"),
  ),
  StageSpec(
    "anyprec",
    defaults=_anyprec_defaults,
    source=_after("int8"),
    policy=lambda p: p.max_policy,
    steps=anyprec_steps,
    calibrate=lambda config, source: "untrained" if config.anyprec.recalibrate_clips else "",
    final_evals=_eval_bits,
    validate=_validate_anyprec,
  ),
  StageSpec(
    "finetune",
    defaults=lambda: stage_config(1, 2e-4, "adamw", source="auto"),
    source=_configured_source,
    policy=_given_policy,
    calibrate=lambda config, source: "untrained" if source == "int8" else "",
    recal_bn=True,
    needs_policy=True,
    final_evals=_eval_as("policy"),
    validate=_validate_finetune,
  ),
)
STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_SPECS)
_BY_NAME = {s.name: s for s in STAGE_SPECS}


def get_stage(stage: str) -> StageSpec:
  """The spec of ``stage``.

  Raises:
    StageError: unknown stage.
  """
  if stage not in _BY_NAME:
    raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
  return _BY_NAME[stage]


def stage_index(stage: str) -> int:
  """The stage's position in the table (seeds its data order and PRNG key)."""
  return STAGES.index(stage)


__all__ = [
  "CALIB_ROWS",
  "STAGES",
  "STAGE_SPECS",
  "StagePolicies",
  "StageSpec",
  "config_error",
  "get_stage",
  "is_done",
  "stage_config",
  "stage_dir",
  "stage_index",
]
