"""Running one training stage of the table in :mod:`cimjax.train.stages`: :func:`run_stage`.

Layout: ``workdir/<stage>/`` holds ``checkpoints/`` (orbax, every ``checkpoint_every`` steps
and at the end), ``variables/`` (final params and batch_stats), ``metrics.jsonl`` and
``result.json`` (written last: its presence marks the stage done). A stage given a policy
(fine-tuning) uses ``workdir/<stage>/<policy_name>/``.

Data: in memory (the default), or streamed with ``train.data.stream`` (:func:`load_stream`;
the iterator state is saved in each checkpoint's ``data`` item and restored on resume). A
stream, or ``train.data.data_parallel``, runs each step on all devices with the batch split
over a ``data`` mesh axis (:func:`cimjax.train.loop.data_mesh`), and so does the periodic
validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cimjax import checkpoint as ckpt_lib
from cimjax import data as data_lib
from cimjax import multihost
from cimjax import policy as policy_lib
from cimjax.errors import StageError
from cimjax.models import ModelDef
from cimjax.models.pretrained import load_torchvision
from cimjax.trace import trace_specs
from cimjax.train.calibrate import calib_images, calibrate_clips, recal_batches, recalibrate_bn
from cimjax.train.config import (
  build_model,
  load_splits,
  load_stream,
  num_steps,
  static_specs,
  validate_config,
)
from cimjax.train.evaluation import evaluate, evaluate_splits
from cimjax.train.loop import (
  MetricsWriter,
  check_mesh_batch,
  check_resume,
  data_mesh,
  evaluate_sharded,
  fit,
)
from cimjax.train.policies import bits_mask, extreme_policy, policy_label
from cimjax.train.stages import (
  CALIB_ROWS,
  STAGES,
  StagePolicies,
  StageSpec,
  get_stage,
  is_done,
  stage_dir,
  stage_index,
)
from cimjax.train.state import TrainState, create_state, make_optimizer, variables_dict
from cimjax.train.steps import AnyPrecConfig, Trainer
from cimjax.variables import (
  VariablesError,
  abstract_variables,
  init_variables,
  load_variables,
  save_variables,
)

Array = jax.Array
ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What one run of a stage works with (derived from the config, the data and the table)."""

  spec: StageSpec
  config: ConfigDict
  workdir: Path
  sdir: Path
  source: str | None
  splits: data_lib.Splits
  model: ModelDef
  policies: StagePolicies
  train_policy: Any
  num_steps: int
  steps_per_epoch: int
  key: Array
  stream: data_lib.TrainStream | None = None
  mesh: jax.sharding.Mesh | None = None

  @property
  def train_images(self) -> int:
    """Images of the train split (streamed or in memory)."""
    return len(self.stream) if self.stream is not None else len(self.splits.train)

  def meta(self) -> dict[str, Any]:
    """What a checkpoint records of the run (compared on resume)."""
    return {
      "stage": self.spec.name,
      "num_steps": self.num_steps,
      "config": self.config.to_dict(),
      "policy": np.asarray(self.train_policy).tolist() if self.spec.needs_policy else None,
      "source": self.source,
      "model": self.model.name,
      "input_shape": list(self.model.input_shape),
      "layers": list(self.policies.layer_names),
    }


def _setup(
  spec: StageSpec,
  config: ConfigDict,
  workdir: Path,
  sdir: Path,
  source: str | None,
  policy: Any,
  splits: data_lib.Splits,
  stream: data_lib.TrainStream | None = None,
) -> _Setup:
  model = build_model(config, splits)
  names = tuple(s.name for s in trace_specs(model))
  b = config.bits
  mask = bits_mask(
    len(names),
    min_bits=b.min_bits,
    max_bits=b.max_bits,
    constraint=b.constraint,
    cell_bits=b.cell_bits or None,
  )
  policies = StagePolicies(
    num_layers=len(names),
    layer_names=names,
    mask=mask,
    max_policy=extreme_policy(mask, "max"),
    min_policy=extreme_policy(mask, "min"),
    given=policy,
    model_name=config.model,
  )
  if stream is not None:
    spe = stream.steps_per_epoch
  else:
    spe = data_lib.steps_per_epoch(len(splits.train), config.batch_size)
  parallel = stream is not None or config.data.get("data_parallel", False)
  mesh = data_mesh() if parallel or jax.process_count() > 1 else None
  check_mesh_batch(config.batch_size, mesh)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), stage_index(spec.name))
  return _Setup(
    spec=spec,
    config=config,
    workdir=workdir,
    sdir=sdir,
    source=source,
    splits=splits,
    model=model,
    policies=policies,
    train_policy=spec.policy(policies),
    num_steps=num_steps(config, spec.name, spe),
    steps_per_epoch=spe,
    key=key,
    stream=stream,
    mesh=mesh,
  )


def stage_trainer(
  model: Any,
  config: Any,
  stage: str,
  num_steps: int,
  steps_per_epoch: float,
  max_policy: Any,
  fast_compile: bool = False,
) -> Trainer:
  """A stage's optimizer and jitted steps from its config section (``config[stage]``).

  Args:
    model: the :class:`cimjax.models.ModelDef`.
    config: the training config (``config[stage]``: optimizer fields; ``config.anyprec``: the
      any-precision recipe).
    stage: the stage name.
    num_steps: the stage's steps (the learning-rate schedule's length).
    steps_per_epoch: steps an epoch (converts ``warmup_epochs``).
    max_policy: the all-maximum policy (any-precision's teacher).
    fast_compile: compile the steps for speed of compilation (tests).
  """
  sc, ap = config[stage], config.anyprec
  tx = make_optimizer(
    sc.optimizer,
    sc.lr,
    num_steps,
    warmup_steps=int(round(sc.warmup_epochs * steps_per_epoch)),
    weight_decay=sc.weight_decay,
    momentum=sc.momentum,
    nesterov=sc.nesterov,
    end_lr_frac=sc.end_lr_frac,
    clip_lr_mult=sc.clip_lr_mult,
    grad_clip_norm=sc.grad_clip_norm,
  )
  recipe = AnyPrecConfig(
    sandwich=ap.sandwich,
    distill=ap.distill,
    distill_weight=ap.distill_weight,
    temperature=ap.temperature,
  )
  return Trainer(
    model,
    tx,
    label_smoothing=sc.label_smoothing,
    max_policy=max_policy,
    anyprec=recipe,
    fast_compile=fast_compile,
  )


def _trainer(s: _Setup) -> Trainer:
  """The stage's optimizer and jitted steps (an equal setup reuses the compiled steps)."""
  return stage_trainer(
    s.model,
    s.config,
    s.spec.name,
    s.num_steps,
    s.steps_per_epoch,
    s.policies.max_policy,
    s.config.fast_compile,
  )


def _fresh_state(s: _Setup, tx: Any, extra: dict[str, Any]) -> TrainState:
  """The stage's first state: its source's variables (or ``config.pretrained``, or a random
  init), calibrated.

  Records the post-training-quantisation accuracy in ``extra`` when the stage asks for it.
  """
  if s.source is None and s.config.get("pretrained", ""):
    v = load_torchvision(s.model, s.config.pretrained, key=s.key)  # docs/pretrained.md
  elif s.source is None:
    v = init_variables(s.model, s.key)
  else:
    src = stage_dir(s.workdir, s.source)
    try:
      v = load_variables(src, s.model)
    except VariablesError as e:
      raise StageError(
        f"stage {s.spec.name} starts from the finished {s.source} stage, but {e}; delete "
        f"{src} to run the {s.source} stage again"
      ) from None
  params, batch_stats = v["params"], v.get("batch_stats", {})
  rows = s.spec.calibrate(s.config, s.source)
  if rows:
    params = calibrate_clips(
      variables_dict(params, batch_stats),
      s.model,
      calib_images(s.splits, s.config),
      bits=CALIB_ROWS[rows],
    )
  if s.spec.ptq_key:
    v = variables_dict(params, batch_stats)
    ptq = evaluate_splits(v, s.model, s.splits, s.config, s.train_policy, ("val",))
    extra[s.spec.ptq_key] = ptq.get("val")
    logging.info(
      "%s post-training (calibrated, no QAT) val accuracy: %s", s.spec.name, ptq.get("val")
    )
  if s.spec.recal_bn and batch_stats:
    v2 = recalibrate_bn(
      variables_dict(params, batch_stats),
      s.model,
      s.train_policy,
      recal_batches(s.splits, s.config),
      fast_compile=s.config.fast_compile,
    )
    batch_stats = v2["batch_stats"]
  return create_state(params, batch_stats, tx, s.key)


def _restored_state(
  s: _Setup, tx: Any, ckpt: ckpt_lib.Checkpointer
) -> tuple[TrainState, dict[str, Any], dict[str, Any] | None] | None:
  """The newest intact checkpoint (checked against this run's config): its state, its extra
  results and its data iterator state (None for in-memory data or an older checkpoint).

  A corrupt checkpoint is reported in one warning line and skipped for the next older one
  (:meth:`cimjax.checkpoint.Checkpointer.restore_intact`); with none intact left, one warning
  line says the stage restarts from its beginning and None is returned.
  """
  if not ckpt.all_steps():
    return None
  av = abstract_variables(s.model)
  target = jax.eval_shape(
    lambda p, b: create_state(p, b, tx, s.key), av["params"], av.get("batch_stats", {})
  )
  restored = ckpt.restore_intact(target)
  if restored is None:
    logging.warning(
      "stage %s: no intact checkpoint in %s; the stage restarts from its beginning",
      s.spec.name,
      ckpt.directory,
    )
    return None
  step, state, saved = restored
  check_resume(saved, s.meta(), s.sdir, set(STAGES) - {s.spec.name})
  logging.info("stage %s: resuming from step %d in %s", s.spec.name, step, s.sdir)
  return state, saved.get("extra", {}), _host_data_state(saved.get(ckpt_lib.DATA_STATE_KEY))


def _host_data_state(data: dict[str, Any] | None) -> dict[str, Any] | None:
  """This process's stream state of a checkpoint's ``data`` item.

  A multi-process run saves every host's iterator state (``{"hosts": [state_0, ...]}``,
  :func:`cimjax.multihost.gather_json`); a single-process run its one state. A checkpoint of
  another process count yields None here (the stream then restarts at the checkpoint's step,
  the same batches; the stream's own check names a changed host count).
  """
  if data is None or "hosts" not in data:
    return data if jax.process_count() == 1 else None
  hosts = data["hosts"]
  return hosts[jax.process_index()] if len(hosts) == jax.process_count() else None


def _val_eval_fn(s: _Setup) -> Any:
  """``eval_fn(state)`` of :func:`fit`: validation accuracy (percent) of the training policy."""
  label = policy_label(s.train_policy)

  def eval_fn(state: TrainState) -> dict[str, float]:
    if len(s.splits.val) == 0:
      return {}
    if s.mesh is not None:
      r = evaluate_sharded(
        state.variables,
        s.model,
        s.splits.val,
        s.train_policy,
        s.mesh,
        batch_size=s.config.eval_batch_size,
      )
      return {f"val_accuracy_{label}": r["accuracy"], f"val_loss_{label}": r["loss"]}
    r = evaluate(
      state.variables,
      s.model,
      s.splits.val,
      s.train_policy,
      batch_size=s.config.eval_batch_size,
      fast_compile=s.config.fast_compile,
    )
    return {f"val_accuracy_{label}": r["accuracy"], f"val_loss_{label}": r["loss"]}

  return eval_fn


def _train(s: _Setup, trainer: Trainer, ckpt: ckpt_lib.Checkpointer) -> dict[str, Any]:
  """Resumes or starts the stage and trains it to the end; returns the result's fields."""
  extra: dict[str, Any] = {}
  data_state = None
  restored = _restored_state(s, trainer.tx, ckpt)
  if restored is not None:
    state, extra, data_state = restored
  else:
    state = _fresh_state(s, trainer.tx, extra)
  resume_step = None if restored is None else int(state.step)
  meta = s.meta()

  def save(state: TrainState, done: bool, data: dict[str, Any] | None = None) -> None:
    step = int(state.step)
    if data is not None and jax.process_count() > 1:
      data = {"hosts": multihost.gather_json(data)}  # each host's stream position
    ckpt.save(step, state, {**meta, "step": step, "done": done, "extra": extra}, data=data)

  writer = MetricsWriter(
    s.sdir / "metrics.jsonl", resume_step=resume_step, enabled=multihost.is_leader()
  )
  c = s.config
  t0 = time.time()
  state, stats = fit(
    s.spec.steps(trainer, c, s.policies, s.train_policy),
    state,
    s.stream if s.stream is not None else s.splits.train,
    num_steps=s.num_steps,
    batch_size=c.batch_size,
    data_seed=[c.seed, stage_index(s.spec.name)],
    writer=writer,
    save_fn=save,
    checkpoint_every=c.checkpoint_every,
    log_every=c.log_every,
    eval_fn=_val_eval_fn(s),
    eval_every=c.eval_every if c.eval_every != 0 else s.steps_per_epoch,
    progress=c.progress,
    description=s.spec.name,
    throttle_s=c.throttle_s,
    data_state=data_state,
    mesh=s.mesh,
  )
  train_time = time.time() - t0
  if ckpt.latest_step() != s.num_steps:
    save(state, True)
  save_variables(s.sdir / "variables", state.variables)  # every process (orbax is collective)
  if jax.process_count() > 1:  # host copies: the final evaluations run on each process alone
    state = jax.tree.map(np.asarray, state)
  evals = {
    name: evaluate_splits(state.variables, s.model, s.splits, c, p)
    for name, p in s.spec.final_evals(c, s.policies.num_layers, s.train_policy).items()
  }
  writer.write({"step": s.num_steps, "final": True, "eval": evals})
  writer.close()
  return {"train_time": train_time, "stats": stats, "evals": evals, "extra": extra}


def _result(s: _Setup, out: dict[str, Any], t_start: float) -> dict[str, Any]:
  splits, stats = s.splits, out["stats"]
  return {
    "stage": s.spec.name,
    "model": s.model.name,
    "dataset": splits.name,
    "source": s.source,
    "steps": s.num_steps,
    "epochs": s.num_steps / s.steps_per_epoch,
    "batch_size": s.config.batch_size,
    "train_images": s.train_images,
    "val_images": len(splits.val),
    "test_images": len(splits.test),
    "train_time_s": round(out["train_time"], 2),
    "stage_time_s": round(time.time() - t_start, 2),
    "images_per_s": stats.get("images_per_s"),
    "final_train_loss": stats.get("loss"),
    "eval": out["evals"],
    **out["extra"],
    "policy": s.meta()["policy"],
  }


def run_stage(
  config: ConfigDict,
  stage: str,
  workdir: str | os.PathLike[str],
  *,
  policy: Any = None,
  policy_name: str | None = None,
  splits: data_lib.Splits | None = None,
) -> dict[str, Any]:
  """Runs (or resumes, or skips if finished) one training stage.

  Args:
    config: see :func:`cimjax.train.default_config`.
    stage: one of :data:`cimjax.train.STAGES`.
    workdir: the experiment directory (layout: see the module docstring).
    policy: int ``[L, 2]`` policy to fine-tune (``finetune`` only).
    policy_name: name of the fine-tuning directory (default ``"policy"``).
    splits: preloaded data (else loaded from the config; with ``data.stream`` the in-memory
      val/test/sample splits of :func:`load_stream`, the train split streaming from
      ``splits.stream``).

  Returns:
    The stage's result dict (also in ``result.json``); accuracies are in percent.

  Raises:
    ConfigError: a bad config field.
    StageError: missing prerequisite stage, missing/bad policy, or a workdir written by
      another stage setup.
    cimjax.data.DataError: missing data files.
  """
  spec = get_stage(stage)
  workdir = Path(workdir)
  if spec.needs_policy:
    policy_name = policy_name or "policy"
  sdir = stage_dir(workdir, stage, policy_name)
  discard_unreadable_result(sdir)
  sdir = check_stage(config, stage, workdir, policy=policy, policy_name=policy_name)
  done = read_result(sdir)
  if done is not None:
    logging.info("stage %s already finished in %s; not redone", stage, sdir)
    return done
  source = spec.source(config, workdir)
  t_start = time.time()
  stream = None
  if config.data.get("stream", False):
    if splits is None or splits.stream is None:
      splits = load_stream(config).splits
    stream = splits.stream
  if splits is None:
    splits = load_splits(config)
  s = _setup(spec, config, workdir, sdir, source, policy, splits, stream)
  ckpt = ckpt_lib.Checkpointer(sdir / "checkpoints", max_to_keep=config.max_to_keep)
  out = _train(s, _trainer(s), ckpt)
  ckpt.close()
  result = _result(s, out, t_start)
  if multihost.is_leader():
    ckpt_lib.write_json_atomic(sdir / "result.json", result)
  multihost.barrier(f"cimjax stage {stage} written")
  logging.info("stage %s done: %s", stage, json.dumps(out["evals"]))
  return result


def read_result(sdir: str | os.PathLike[str]) -> dict[str, Any] | None:
  """A stage's ``result.json``: None when the stage has not finished or the file does not
  read back as a JSON object (a corrupt file: see :func:`discard_unreadable_result`)."""
  path = Path(sdir) / "result.json"
  if not is_done(sdir):
    return None
  try:
    result = json.loads(path.read_bytes())
  except (ValueError, OSError):  # bad JSON or UTF-8, or unreadable
    return None
  return result if isinstance(result, dict) else None


def discard_unreadable_result(sdir: str | os.PathLike[str]) -> bool:
  """Moves a ``result.json`` that does not read back aside (``result.json.corrupt``), with one
  warning line, so that its stage counts as unfinished and runs again (from its checkpoints).

  Returns:
    True when a file was moved.
  """
  path = Path(sdir) / "result.json"
  if not path.is_file() or read_result(sdir) is not None:
    return False
  logging.warning("%s does not read back (corrupt); the stage runs again", path)
  with contextlib.suppress(FileNotFoundError):  # another process moved it first
    os.replace(path, path.with_name("result.json.corrupt"))
  return True


def check_stage(
  config: ConfigDict,
  stage: str,
  workdir: str | os.PathLike[str],
  *,
  policy: Any = None,
  policy_name: str | None = None,
) -> Path:
  """Checks what :func:`run_stage` needs before anything runs or is written: the config's
  fields, a policy that fits the model (for a stage that trains one) and, unless the stage has
  finished, the finished stage it starts from. Reads the workdir, writes nothing.

  Returns:
    The stage's directory.

  Raises:
    ConfigError: a bad config field (naming it).
    StageError: unknown stage, missing or bad policy, missing prerequisite stage.
  """
  spec = get_stage(stage)
  validate_config(config)
  workdir = Path(workdir)
  if spec.needs_policy:
    if policy is None:
      raise StageError(f"stage {stage} needs a policy (--policy=FILE.npy)")
    specs = static_specs(config)
    try:
      policy_lib.validate_policy(
        policy, len(specs), min_bits=1, max_bits=8, layer_names=[x.name for x in specs]
      )
    except policy_lib.PolicyError as e:
      raise StageError(f"bad policy for {config.model}: {e}") from None
    policy_name = policy_name or "policy"
  sdir = stage_dir(workdir, stage, policy_name)
  if read_result(sdir) is not None:
    return sdir
  source = spec.source(config, workdir)
  if source is not None and read_result(stage_dir(workdir, source)) is None:
    raise StageError(
      f"stage {stage} needs the finished {source} stage in "
      f"{stage_dir(workdir, source)}; run --stage={source} first"
    )
  return sdir


__all__ = ["check_stage", "discard_unreadable_result", "read_result", "run_stage", "stage_trainer"]
