"""Accuracy (percent) of one policy over a split, and over named splits after BN recalibration.

Both use the single-policy evaluator :func:`cimjax.evaluate.evaluate_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from cimjax import data as data_lib
from cimjax import evaluate as eval_lib
from cimjax.models import ModelDef
from cimjax.train.calibrate import recal_batches, recalibrate_bn
from cimjax.train.loop import data_mesh, evaluate_sharded
from cimjax.train.state import TrainState, as_variables

PyTree = Any


def evaluate(
  state_or_variables: TrainState | Mapping[str, PyTree],
  model: Any,
  split: data_lib.Dataset,
  policy: Any = None,
  *,
  batch_size: int = 1000,
  fast_compile: bool = False,
) -> dict[str, float]:
  """Accuracy and mean loss of one policy over a whole split (batched over data, jitted).

  Batch-norm models use the running statistics in ``state_or_variables`` as they are; call
  :func:`cimjax.train.recalibrate_bn` first for a policy other than the one they were trained
  with.

  Args:
    state_or_variables: a :class:`TrainState` or ``{"params", ["batch_stats"]}``.
    model: the zoo model (or its module).
    split: the data.
    policy: int ``[L, 2]`` or None (float).
    batch_size: images a batch (the last batch is padded and masked).
    fast_compile: compile without expensive optimisations (small splits, tests).

  Returns:
    ``{"accuracy": percent, "loss": mean cross-entropy, "count": images}`` (NaNs for an empty
    split).
  """
  if len(split) == 0:
    return {"accuracy": float("nan"), "loss": float("nan"), "count": 0}
  acc, loss = eval_lib.evaluate_policy(
    model,
    as_variables(state_or_variables),
    split.images,
    split.labels,
    policy,
    batch_size=batch_size,
    fast_compile=fast_compile,
  )
  return {"accuracy": acc, "loss": loss, "count": len(split)}


def evaluate_splits(
  variables: Mapping[str, PyTree],
  model: ModelDef,
  splits: data_lib.Splits,
  config: ml_collections.ConfigDict,
  policy: Any,
  split_names: Sequence[str] = ("val", "test"),
  recal: bool = True,
) -> dict[str, float]:
  """Accuracy of ``policy`` on named splits, batch norm re-estimated first (if any).

  Args:
    variables: ``{"params", ["batch_stats"]}``.
    model: the zoo model.
    splits: the data.
    config: the training config (``eval_batch_size``, ``fast_compile``, BN-recalibration
      batches).
    policy: int ``[L, 2]`` or None (float).
    split_names: the splits to evaluate (empty ones are skipped).
    recal: re-estimate batch-norm statistics for ``policy`` first.

  Data parallel (``config.data.data_parallel`` or ``config.data.stream``) with several local
  devices: every batch is split over this process's devices (:func:`evaluate_sharded`; the
  same accuracy, the loss summed in another order).

  Returns:
    ``{name: accuracy in percent, f"{name}_loss": mean loss}`` per non-empty split.
  """
  v = dict(variables)
  parallel = config.data.get("data_parallel", False) or config.data.get("stream", False)
  mesh = data_mesh(jax.local_devices()) if parallel and jax.local_device_count() > 1 else None
  if recal and v.get("batch_stats"):
    v = recalibrate_bn(
      v, model, policy, recal_batches(splits, config), fast_compile=config.fast_compile
    )
  out = {}
  for s in split_names:
    if not len(splits[s]):
      continue
    if mesh is not None:
      r = evaluate_sharded(v, model, splits[s], policy, mesh, batch_size=config.eval_batch_size)
    else:
      r = evaluate(
        v,
        model,
        splits[s],
        policy,
        batch_size=config.eval_batch_size,
        fast_compile=config.fast_compile,
      )
    out[s] = r["accuracy"]
    out[f"{s}_loss"] = r["loss"]
  return out


__all__ = ["evaluate", "evaluate_splits"]
