"""The training loop: :func:`fit`, its metrics file (and TensorBoard scalars), its progress
display (:mod:`cimjax.progress`) and the resume check.

Determinism: the data order is a pure function of (seed, stage, epoch) and a step's randomness
a pure function of (key, step), so a run resumed from a checkpoint reaches bit-identical
parameters.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from cimjax import data as data_lib
from cimjax import progress as progress_lib
from cimjax.errors import StageError
from cimjax.train.state import TrainState

Array = jax.Array
StepFn = Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, dict]]

# Config fields a resumed stage may change: logging, checkpointing and evaluation cadence.
RESUME_IGNORED = (
  "progress",
  "log_every",
  "throttle_s",
  "fast_compile",
  "checkpoint_every",
  "max_to_keep",
  "eval_every",
  "eval_batch_size",
)


def to_py(o: Any) -> Any:
  """JSON fallback: arrays as lists, anything else as its string."""
  if hasattr(o, "tolist"):
    return o.tolist()
  return str(o)


class MetricsWriter:
  """Appends JSON lines to ``metrics.jsonl``; on resume drops records past the restart step.

  The records' numbers also go to TensorBoard event files in ``tb/`` next to the file
  (:class:`cimjax.progress.ScalarLog`: only with ``tensorboardX`` installed, only on process
  0): ``train/<metric>`` and ``eval/<metric>`` at their step, the final evaluations as
  ``final/<policy>/<split>``.

  Args:
    path: the ``metrics.jsonl`` file.
    resume_step: the step a resumed stage restarts from (None: a fresh stage).
    tensorboard: also write the event files (when possible).
  """

  def __init__(
    self,
    path: str | os.PathLike[str],
    resume_step: int | None = None,
    *,
    tensorboard: bool = True,
  ):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.is_file():
      keep = []
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= resume_step:
            keep.append(line)
        except json.JSONDecodeError:
          pass  # a line cut by a kill
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(k + "\n" for k in keep))
      os.replace(tmp, self.path)
    elif resume_step is None and self.path.is_file():
      self.path.unlink()
    self._f = open(self.path, "a")
    self.scalars = None
    if tensorboard and jax.process_index() == 0:
      purge = None if resume_step is None else resume_step + 1
      self.scalars = progress_lib.ScalarLog(self.path.parent / "tb", purge_step=purge)

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (flushed)."""
    self._f.write(json.dumps(dict(record), default=to_py) + "\n")
    self._f.flush()
    if self.scalars is not None and "step" in record:
      rest = {k: v for k, v in record.items() if k not in ("kind", "step", "final", "epoch")}
      if record.get("final"):
        self.scalars.add(record["step"], {"final": rest.get("eval", {})})
      else:
        self.scalars.add(record["step"], {str(record.get("kind", "train")): rest})

  def close(self) -> None:
    self._f.close()
    if self.scalars is not None:
      self.scalars.close()


class _Throughput:
  """Images a second over the logging windows after the first (compiling) one."""

  def __init__(self, start: int, batch_size: int):
    self.start, self.batch_size = start, batch_size
    self.t_win, self.n_win = time.time(), 0
    self.rate_t, self.rate_n = 0.0, 0

  def close_window(self, done: int) -> float:
    dt = time.time() - self.t_win
    ips = self.n_win * self.batch_size / max(dt, 1e-9)
    if done - self.n_win > self.start:  # not the first (compiling) window
      self.rate_t, self.rate_n = self.rate_t + dt, self.rate_n + self.n_win * self.batch_size
    self.t_win, self.n_win = time.time(), 0
    return self.rate_n / self.rate_t if self.rate_t else ips

  def pause(self, seconds: float) -> None:
    """Time spent outside training (evaluation, checkpoints) does not count."""
    self.t_win += seconds


def _window_record(window: list[dict[str, Array]], images_per_s: float) -> dict[str, float]:
  host = jax.device_get(window)
  rec = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  rec["images_per_s"] = images_per_s
  return rec


def fit(
  step_fn: StepFn,
  state: TrainState,
  train: data_lib.Dataset,
  *,
  num_steps: int,
  batch_size: int,
  data_seed: Any,
  writer: MetricsWriter | None = None,
  save_fn: Callable[[TrainState, bool], None] | None = None,
  checkpoint_every: int = 0,
  log_every: int = 50,
  eval_fn: Callable[[TrainState], dict] | None = None,
  eval_every: int = 0,
  progress: bool | progress_lib.Progress = True,
  description: str = "train",
  throttle_s: float = 0.0,
) -> tuple[TrainState, dict[str, float]]:
  """The training loop: a Python loop of jitted steps from ``state.step`` to ``num_steps``.

  Batch ``s`` is a pure function of ``(data_seed, s)`` (see :func:`cimjax.data.train_batches`),
  so resuming from a checkpoint replays the same data.

  Args:
    step_fn: ``(state, (images, labels)) -> (state, metrics)``.
    state: the state to continue from.
    train: the training split.
    num_steps: the stage's total steps.
    batch_size: images a step.
    data_seed: int or sequence of ints seeding the epoch permutations.
    writer: JSON-lines metrics sink.
    save_fn: ``save_fn(state, done)`` checkpoints (called every ``checkpoint_every`` steps).
    checkpoint_every: steps between checkpoints (0: none here).
    log_every: steps between logged training metrics.
    eval_fn: ``eval_fn(state) -> metrics`` run every ``eval_every`` steps (<= 0: never).
    eval_every: steps between evaluations.
    progress: the run's :class:`cimjax.progress.Progress`, or a flag: True shows a live bar
      on a terminal and periodic plain lines elsewhere, False nothing.
    description: progress label (the stage).
    throttle_s: sleep after each step (tests use it to kill a run mid-way).

  Returns:
    ``(state, {"loss", "accuracy", "images_per_s", "step", "epoch"})`` of the last logging
    window.
  """
  start = int(state.step)
  seed = np.asarray(data_seed, np.uint32).reshape(-1)
  batches = data_lib.train_batches(train, batch_size, seed, start)
  bar = progress_lib.Progress.of(progress).training(description, num_steps, start)
  clock = _Throughput(start, batch_size)
  window: list[dict[str, Array]] = []
  last: dict[str, float] = {}
  try:
    for step in range(start, num_steps):
      x, y = next(batches)
      state, metrics = step_fn(state, (x, y))
      window.append(metrics)
      clock.n_win += 1
      done = step + 1
      if throttle_s:
        time.sleep(throttle_s)
      if done % max(log_every, 1) == 0 or done == num_steps:
        last = _window_record(window, clock.close_window(done))
        last.update(step=done, epoch=done * batch_size / len(train))
        _log_train(last, writer, bar, description, num_steps)
        window = []
      else:
        bar.update(done)  # the count moves every step, the figures every logging window
      if eval_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == num_steps):
        t0 = time.time()
        ev = eval_fn(state)
        if ev:
          if writer:
            writer.write({"kind": "eval", "step": done, **ev})
          logging.info("%s step %d eval %s", description, done, json.dumps(ev))
        clock.pause(time.time() - t0)
      if save_fn is not None and checkpoint_every > 0 and done % checkpoint_every == 0:
        t0 = time.time()
        save_fn(state, done == num_steps)
        clock.pause(time.time() - t0)
  finally:
    bar.close()
  return state, last


def _log_train(
  rec: dict[str, float],
  writer: MetricsWriter | None,
  bar: progress_lib.Task,
  description: str,
  num_steps: int,
) -> None:
  if writer:
    writer.write({"kind": "train", **rec})
  done = int(rec["step"])
  ips = rec["images_per_s"]
  acc = rec.get("accuracy", float("nan")) * 100.0  # shown in percent
  bar.update(done, loss=rec["loss"], accuracy=acc, images_per_s=ips)
  logging.log(
    logging.DEBUG if bar.shown else logging.INFO,  # one report of progress, never two
    "%s step %d/%d loss %.4f acc %.4f %.0f img/s",
    description,
    done,
    num_steps,
    rec["loss"],
    rec.get("accuracy", float("nan")),
    ips,
  )


def check_resume(
  saved: Mapping[str, Any], meta: Mapping[str, Any], sdir: Path, other_stages: Collection[str]
) -> None:
  """A resumed stage must use the config it started with.

  Logging fields (:data:`RESUME_IGNORED`) and the other stages' settings may differ.

  Args:
    saved: the checkpoint's metadata (``config``, ``policy``, ``num_steps``).
    meta: the metadata of the run being started.
    sdir: the stage directory (for the message).
    other_stages: config sections of the other stages.

  Raises:
    StageError: a differing field, policy or number of steps.
  """
  old = dict(saved.get("config", {}))
  new = json.loads(json.dumps(meta["config"], default=to_py))
  diff = sorted(
    k
    for k in set(old) | set(new)
    if k not in RESUME_IGNORED and k not in other_stages and old.get(k) != new.get(k)
  )
  if diff or saved.get("policy") != meta["policy"] or saved.get("num_steps") != meta["num_steps"]:
    what = ", ".join(diff) or "policy/num_steps"
    raise StageError(
      f"{sdir} holds checkpoints of a run with a different config ({what}); "
      f"use another --workdir or the same config"
    )


__all__ = ["RESUME_IGNORED", "MetricsWriter", "check_resume", "fit", "to_py"]
