"""Quantization-aware training: FP32 -> INT8 -> any-precision -> mixed-precision fine-tuning.

One concept a module:

* :mod:`cimjax.train.state`: :class:`TrainState` (an explicit pytree orbax saves and restores
  exactly), :func:`make_optimizer` (a hashable :class:`Optimizer`: SGD/AdamW, warmup + cosine,
  weight decay on kernels only), the masks and the losses.
* :mod:`cimjax.train.steps`: the pure jitted steps ``train_step(state, batch, policy)`` and
  ``anyprec_step(state, batch, policies [K, L, 2])`` with a static :class:`StepConfig`;
  policies are traced, so changing bits never recompiles. :class:`Trainer` binds a config.
* :mod:`cimjax.train.policies`: a stage's bit mask, extreme and sampled policies.
* :mod:`cimjax.train.calibrate`: MSE-optimal clip tables (:func:`calibrate_clips`) and
  batch-norm recalibration (:func:`recalibrate_bn`).
* :mod:`cimjax.train.evaluation`: :func:`evaluate` (one policy over a split) and
  :func:`evaluate_splits` (named splits after BN recalibration); accuracies in percent.
* :mod:`cimjax.train.loop`: :func:`fit`, the metrics file and the resume check.
* :mod:`cimjax.train.stages`: the stages as a table of :class:`StageSpec` (a new stage is one
  entry), :func:`stage_dir` and the one "stage finished" rule :func:`is_done`.
* :mod:`cimjax.train.config`: :func:`default_config`, :func:`validate_config`, the data and
  the model a config names.
* :mod:`cimjax.train.runner`: :func:`run_stage` (used by ``python -m launch.train``).
* :mod:`cimjax.train.noise`: :func:`finetune_noisy`, noise-aware fine-tuning through the
  crossbar simulator.

Variables (init, save, load, restore) live in :mod:`cimjax.variables`; they are re-exported
here. The architecture is described in docs/architecture.md.
"""

from cimjax.errors import ConfigError, StageError
from cimjax.optim import standard_promotion
from cimjax.train import (
  calibrate,
  config,
  evaluation,
  loop,
  noise,
  policies,
  runner,
  stages,
  state,
  steps,
)
from cimjax.train.calibrate import calibrate_clips, recalibrate_bn
from cimjax.train.config import (
  build_model,
  default_config,
  load_splits,
  validate_config,
)
from cimjax.train.evaluation import evaluate, evaluate_splits
from cimjax.train.loop import MetricsWriter, fit
from cimjax.train.noise import NoisyStepConfig, finetune_noisy, noisy_step
from cimjax.train.policies import bits_mask, extreme_policy
from cimjax.train.runner import run_stage
from cimjax.train.stages import (
  STAGE_SPECS,
  STAGES,
  StageSpec,
  is_done,
  stage_config,
  stage_dir,
)
from cimjax.train.state import (
  OPTIMIZERS,
  Optimizer,
  TrainState,
  as_variables,
  clip_mask,
  create_state,
  cross_entropy,
  decay_mask,
  distill_loss,
  make_optimizer,
  make_schedule,
  variables_dict,
)
from cimjax.train.steps import (
  AnyPrecConfig,
  StepConfig,
  Trainer,
  anyprec_step,
  jit_step,
  train_step,
)
from cimjax.variables import abstract_variables, init_variables, load_variables, save_variables

__all__ = [
  "OPTIMIZERS",
  "STAGES",
  "STAGE_SPECS",
  "AnyPrecConfig",
  "ConfigError",
  "MetricsWriter",
  "NoisyStepConfig",
  "Optimizer",
  "StageError",
  "StageSpec",
  "StepConfig",
  "TrainState",
  "Trainer",
  "abstract_variables",
  "anyprec_step",
  "as_variables",
  "bits_mask",
  "build_model",
  "calibrate",
  "calibrate_clips",
  "clip_mask",
  "config",
  "create_state",
  "cross_entropy",
  "decay_mask",
  "default_config",
  "distill_loss",
  "evaluate",
  "evaluate_splits",
  "evaluation",
  "extreme_policy",
  "finetune_noisy",
  "fit",
  "init_variables",
  "is_done",
  "jit_step",
  "load_splits",
  "load_variables",
  "loop",
  "make_optimizer",
  "make_schedule",
  "noise",
  "noisy_step",
  "policies",
  "recalibrate_bn",
  "run_stage",
  "runner",
  "save_variables",
  "stage_config",
  "stage_dir",
  "stages",
  "standard_promotion",
  "state",
  "steps",
  "train_step",
  "validate_config",
  "variables_dict",
]
