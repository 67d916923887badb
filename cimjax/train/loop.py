"""The training loop: :func:`fit`, its metrics file (and TensorBoard scalars), its progress
display (:mod:`cimjax.progress`), data parallelism and the resume check.

Determinism: the data order is a pure function of (seed, stage, epoch) and a step's randomness
a pure function of (key, step), so a run resumed from a checkpoint reaches bit-identical
parameters. The data is in memory (a :class:`cimjax.data.Dataset`) or streamed
(a :class:`cimjax.data.TrainStream`, whose iterator state is checkpointed with the train
state).

Data parallelism (:func:`data_mesh`): given a mesh with a ``data`` axis, the train state is
replicated (``NamedSharding(mesh, P())``) and every batch is split over the axis
(``NamedSharding(mesh, P("data"))``, built from each host's rows with
``jax.make_array_from_process_local_data``); the jitted steps follow their inputs' shardings
(GSPMD), so the step is unchanged. The result equals the one-device run up to float32
summation order (the batch mean is reduced across devices).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
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
    enabled: False: write nothing (the processes of a multi-process run other than 0).
  """

  def __init__(
    self,
    path: str | os.PathLike[str],
    resume_step: int | None = None,
    *,
    tensorboard: bool = True,
    enabled: bool = True,
  ):
    self.path = Path(path)
    self.enabled = enabled
    self.scalars = None
    if not enabled:  # another process of a multi-process run writes the file
      return
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
    if tensorboard and jax.process_index() == 0:
      purge = None if resume_step is None else resume_step + 1
      self.scalars = progress_lib.ScalarLog(self.path.parent / "tb", purge_step=purge)

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (flushed)."""
    if not self.enabled:
      return
    self._f.write(json.dumps(dict(record), default=to_py) + "\n")
    self._f.flush()
    if self.scalars is not None and "step" in record:
      rest = {k: v for k, v in record.items() if k not in ("kind", "step", "final", "epoch")}
      if record.get("final"):
        self.scalars.add(record["step"], {"final": rest.get("eval", {})})
      else:
        self.scalars.add(record["step"], {str(record.get("kind", "train")): rest})

  def close(self) -> None:
    if not self.enabled:
      return
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


DATA_AXIS = "data"


def data_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process)."""
  devs = np.asarray(jax.devices() if devices is None else list(devices))
  return jax.sharding.Mesh(devs.reshape(-1), (DATA_AXIS,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``tree`` replicated on every device of ``mesh``.

  In a multi-process run every process must hold the same values (the same seed, the same
  checkpoint); they are placed from host copies.
  """
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if jax.process_count() > 1:
    tree = jax.tree.map(np.asarray, tree)
  return jax.device_put(tree, rep)


def spans_processes(mesh: jax.sharding.Mesh) -> bool:
  """Whether ``mesh`` holds devices of more than one process."""
  return len({d.process_index for d in mesh.devices.flat}) > 1


def host_rows(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
  """This process's contiguous block of a global batch that every process holds whole.

  Process ``p`` of ``P`` takes rows ``[p * B / P, (p + 1) * B / P)`` (``B`` divisible by ``P``,
  as :func:`check_mesh_batch` ensures), so :func:`shard_batch` of the blocks rebuilds the
  global batch in its original row order. Single-process: the batch itself.
  """
  procs, me = jax.process_count(), jax.process_index()
  if procs == 1:
    return batch
  per = batch[0].shape[0] // procs
  return tuple(a[me * per : (me + 1) * per] for a in batch)


def shard_batch(batch: tuple[np.ndarray, ...], mesh: jax.sharding.Mesh) -> tuple[Array, ...]:
  """This host's rows of a batch as global arrays split over the ``data`` axis.

  Args:
    batch: arrays ``[B_host, ...]`` (``B_host`` a multiple of the local devices).
    mesh: the data mesh.

  Returns:
    Global arrays ``[B_host * processes, ...]`` sharded along their first axis.
  """
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  return tuple(jax.make_array_from_process_local_data(sh, np.asarray(a)) for a in batch)


def check_mesh_batch(batch_size: int, mesh: jax.sharding.Mesh | None) -> None:
  """Raises DataError unless the global batch splits evenly over the mesh's devices."""
  if mesh is not None and batch_size % mesh.size:
    raise data_lib.DataError(
      f"train.batch_size={batch_size}; allowed: a multiple of the {mesh.size} devices of the "
      "data mesh (global batch = per-device batch x local devices x processes)"
    )


def fit(
  step_fn: StepFn,
  state: TrainState,
  train: data_lib.Dataset | data_lib.TrainStream,
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
  data_state: Mapping[str, Any] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  stop_after: int | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """The training loop: a Python loop of jitted steps from ``state.step`` to ``num_steps``.

  Batch ``s`` is a pure function of ``(data_seed, s)`` (see :func:`cimjax.data.train_batches`
  and :mod:`cimjax.data.stream`), so resuming from a checkpoint replays the same data; a
  stream also resumes from its saved iterator state (``data_state``).

  Args:
    step_fn: ``(state, (images, labels)) -> (state, metrics)``.
    state: the state to continue from.
    train: the training split, in memory or streamed (``batch_size`` is then the stream's
      global batch; each host gets its rows).
    num_steps: the stage's total steps.
    batch_size: images a step.
    data_seed: int or sequence of ints seeding the epoch permutations.
    writer: JSON-lines metrics sink.
    save_fn: ``save_fn(state, done)`` checkpoints (called every ``checkpoint_every`` steps);
      with a stream ``save_fn(state, done, data_state)`` (the iterator's JSON state).
    checkpoint_every: steps between checkpoints (0: none here).
    log_every: steps between logged training metrics.
    eval_fn: ``eval_fn(state) -> metrics`` run every ``eval_every`` steps (<= 0: never).
    eval_every: steps between evaluations.
    progress: the run's :class:`cimjax.progress.Progress`, or a flag: True shows a live bar
      on a terminal and periodic plain lines elsewhere, False nothing.
    description: progress label (the stage).
    throttle_s: sleep after each step (tests use it to kill a run mid-way).
    data_state: a stream's saved iterator state (from the checkpoint being resumed); None:
      the stream starts at ``state.step``.
    mesh: a data mesh (:func:`data_mesh`): the state is replicated and each batch split over
      its ``data`` axis; None: one device, as placed.
    stop_after: stop (as a kill would) after this many steps of this call (tests).

  Returns:
    ``(state, {"loss", "accuracy", "images_per_s", "step", "epoch"})`` of the last logging
    window.
  """
  start = int(state.step)
  seed = np.asarray(data_seed, np.uint32).reshape(-1)
  check_mesh_batch(batch_size, mesh)
  stream = isinstance(train, data_lib.TrainStream)
  if stream:
    if train.global_batch != batch_size:
      raise data_lib.DataError(
        f"batch_size={batch_size} but the stream's global batch is {train.global_batch}"
      )
    if data_state is not None and int(data_state.get("next_step", -1)) != start:
      logging.warning(
        "%s: the saved data state is of step %s, the train state of step %d; the stream "
        "restarts at step %d (the same batches: they are a pure function of the step)",
        description,
        data_state.get("next_step"),
        start,
        start,
      )
      data_state = None
    batches = train.iterator(seed, start, data_state, num_steps)
  else:
    batches = data_lib.train_batches(train, batch_size, seed, start)
  across = mesh is not None and spans_processes(mesh)
  if mesh is not None:
    state = replicate(state, mesh)
  bar = progress_lib.Progress.of(progress).training(description, num_steps, start)
  clock = _Throughput(start, batch_size)
  window: list[dict[str, Array]] = []
  last: dict[str, float] = {}
  try:
    for step in range(start, num_steps):
      if stop_after is not None and step - start >= stop_after:
        break
      x, y = next(batches)
      if mesh is not None:
        # A stream yields this host's rows already; an in-memory split the whole global batch.
        x, y = shard_batch((x, y) if stream or not across else host_rows((x, y)), mesh)
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
        if stream:
          save_fn(state, done == num_steps, batches.get_state())
        else:
          save_fn(state, done == num_steps)
        clock.pause(time.time() - t0)
  finally:
    bar.close()
    if stream:
      batches.close()
  return state, last


def _eval_counts(module: Any, variables: Any, x: Array, y: Array, m: Array, policy: Any):
  from cimjax.evaluate import cross_entropy  # pylint: disable=g-import-not-at-top
  from cimjax.models import forward  # pylint: disable=g-import-not-at-top

  logits, _ = forward(module, variables, x, policy, train=False)
  w = m.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32) * w)
  return correct, jnp.sum(cross_entropy(logits, y) * w)


_EVAL = jax.jit(_eval_counts, static_argnames="module")


def evaluate_sharded(
  variables: Mapping[str, Any],
  model: Any,
  split: data_lib.Dataset,
  policy: Any,
  mesh: jax.sharding.Mesh,
  *,
  batch_size: int = 1000,
) -> dict[str, float]:
  """Accuracy (percent) and mean loss of one policy over a split, batches split over ``mesh``.

  Every image is seen once (:func:`cimjax.data.eval_batches`, the last batch padded and
  masked); the batch is rounded up to a multiple of the mesh's devices. In a multi-process run
  every process holds the whole split and passes its block of each batch (:func:`host_rows`);
  the counts are reduced over the mesh, so every process returns the same figures.

  Returns:
    ``{"accuracy", "loss", "count"}`` (NaNs for an empty split).
  """
  n = len(split)
  if n == 0:
    return {"accuracy": float("nan"), "loss": float("nan"), "count": 0}
  bs = -(-batch_size // mesh.size) * mesh.size
  across = spans_processes(mesh)  # a mesh of this process's devices: the whole batch here
  module = getattr(model, "module", model)
  v = replicate(dict(variables), mesh)
  pol = None if policy is None else replicate(jnp.asarray(policy, jnp.int32), mesh)
  outs = []
  for xb, yb, mb in data_lib.eval_batches(split, bs):
    x, y, m = shard_batch(host_rows((xb, yb, mb)) if across else (xb, yb, mb), mesh)
    outs.append(_EVAL(module, v, x, y, m, pol))
  correct = sum(float(c) for c, _ in jax.device_get(outs))
  loss = sum(float(l) for _, l in jax.device_get(outs))
  return {"accuracy": 100.0 * correct / n, "loss": loss / n, "count": n}


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

  Logging fields (:data:`RESUME_IGNORED`), the stream's speed fields
  (:data:`cimjax.train.config.DATA_RESUME_IGNORED`) and the other stages' settings may differ;
  a checkpoint from before the streaming loader's fields reads as having their defaults.

  Args:
    saved: the checkpoint's metadata (``config``, ``policy``, ``num_steps``).
    meta: the metadata of the run being started.
    sdir: the stage directory (for the message).
    other_stages: config sections of the other stages.

  Raises:
    StageError: a differing field, policy or number of steps.
  """
  from cimjax.train.config import (  # pylint: disable=g-import-not-at-top
    DATA_RESUME_IGNORED,
    STREAM_DEFAULTS,
  )

  old = dict(saved.get("config", {}))
  new = json.loads(json.dumps(meta["config"], default=to_py))
  # data fields added with the streaming loader: an older checkpoint had their defaults
  for cfg, fill in ((old, True), (new, False)):
    if isinstance(cfg.get("data"), dict):
      d = {**STREAM_DEFAULTS, **cfg["data"]} if fill else dict(cfg["data"])
      cfg["data"] = {k: v for k, v in d.items() if k not in DATA_RESUME_IGNORED}
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


__all__ = [
  "DATA_AXIS",
  "RESUME_IGNORED",
  "MetricsWriter",
  "check_mesh_batch",
  "check_resume",
  "data_mesh",
  "evaluate_sharded",
  "fit",
  "host_rows",
  "replicate",
  "shard_batch",
  "spans_processes",
  "to_py",
]
