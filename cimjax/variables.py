"""A model's variables: initialise, describe, save, load and restore with shape checks.

A model's variables are the Flax dict ``{"params": ..., ["batch_stats": ...]}``. Training
stages write them with :func:`save_variables` into ``<stage>/variables/`` (an orbax
``StandardCheckpointer`` directory); the compiler, the CLIs and the benchmarks read them back
with :func:`load_variables` (any saved tree) or :func:`restore_variables` (a training stage's
final variables, or the newest step of a :class:`cimjax.checkpoint.Checkpointer` directory,
checked leaf by leaf against the model's shapes). This is the only module that initialises or
restores variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cimjax.errors import CheckpointError, ProgramError, StageError

PyTree = Any
Array = jax.Array

# XLA options for functions that run once (init): without the expensive passes the init of a
# zoo model compiles in 0.6 s instead of 3-5 s on the 2-core CPU.
FAST_COMPILE: dict[str, Any] = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


class VariablesError(CheckpointError, ProgramError):
  """Saved variables cannot be restored for a model (missing, unreadable, wrong shapes).

  A :class:`CheckpointError`; also a :class:`ProgramError`, which the compiler raised for the
  same cases before restoring moved here.
  """


def _init(model: Any) -> Any:
  from cimjax.layers import QuantContext  # local: layers imports models' helpers

  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  return lambda key: model.module.init(key, x, QuantContext())


def _as_key(key: Array | int) -> Array:
  if isinstance(key, int | np.integer):
    return jax.random.PRNGKey(int(key))
  if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


def init_variables(model: Any, key: Array | int) -> dict[str, PyTree]:
  """Random initial variables of ``model`` for its ``input_shape`` (one compiled init).

  Args:
    model: a :class:`cimjax.models.ModelDef` (``module``, ``input_shape``).
    key: a PRNG key (raw ``uint32[2]`` or typed) or an integer seed.

  Returns:
    ``{"params": ..., ["batch_stats": ...]}`` of NumPy-backed jax arrays.
  """
  fn = jax.jit(_init(model))
  compiled = fn.lower(jax.random.PRNGKey(0)).compile(compiler_options=FAST_COMPILE)
  return flax.core.unfreeze(compiled(_as_key(key)))


def abstract_variables(model: Any) -> dict[str, PyTree]:
  """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the model's variables; nothing computed."""
  return flax.core.unfreeze(jax.eval_shape(_init(model), jax.random.PRNGKey(0)))


def save_variables(path: str | os.PathLike[str], variables: Mapping[str, PyTree]) -> None:
  """Writes final model variables with orbax (overwrites; orbax commits atomically)."""
  import orbax.checkpoint as ocp  # local: orbax is slow to import

  from cimjax import checkpoint as ckpt_lib

  try:
    with ocp.StandardCheckpointer() as c:
      c.save(Path(path).absolute(), dict(variables), force=True)
      c.wait_until_finished()
  except Exception as e:  # a full disk: one OSError naming the folder
    full = ckpt_lib.disk_full_error(e, path)
    if full is None:
      raise
    raise full from None


def _reader() -> Any:
  """An orbax checkpointer that reads on this process alone.

  Every process of a multi-process run may read saved variables at its own time (process 0
  alone evaluates and compiles), so a read must not wait for the others at orbax's barriers.
  """
  import orbax.checkpoint as ocp  # local: orbax is slow to import

  me = jax.process_index()
  only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.StandardCheckpointer(multiprocessing_options=only_me)


def _saved_tree(c: Any, p: Path) -> PyTree:
  meta = c.metadata(p)
  tree = getattr(meta, "item_metadata", meta)
  return tree.tree if hasattr(tree, "tree") else tree


def load_variables(path: str | os.PathLike[str], model: Any | None = None) -> dict[str, PyTree]:
  """Loads variables written by :func:`save_variables` (a stage's ``variables/``).

  Args:
    path: the ``variables`` directory, or a stage directory holding one.
    model: optional; gives the restore target (shapes, dtypes) so nothing is guessed.

  Raises:
    StageError: no saved variables at ``path``.
    VariablesError: saved variables that cannot be read back (a corrupt file) or do not fit.
  """

  from cimjax import checkpoint as ckpt_lib

  p = Path(path).absolute()
  if (p / "variables").is_dir():
    p = p / "variables"
  if not p.is_dir():
    raise StageError(f"no saved variables at {p}")
  target = None if model is None else abstract_variables(model)
  try:
    with _reader() as c:
      if target is None:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), _saved_tree(c, p))
      return dict(c.restore(p, ckpt_lib.abstract_like(target)))
  except Exception as e:  # orbax raises many types (a corrupt file, a tree that does not fit)
    raise VariablesError(f"cannot read the saved variables in {p} ({ckpt_lib.cause(e)})") from None


def restore_variables(path: str | os.PathLike[str], model: Any) -> dict[str, PyTree]:
  """Trained variables (``params``, ``batch_stats``) of ``model`` from a checkpoint directory.

  Accepts a training stage's final ``variables/`` directory (or the stage directory holding
  it), written by :func:`save_variables`, or a ``CheckpointManager`` directory of
  :class:`cimjax.checkpoint.Checkpointer` (the latest step's ``state``). The model's abstract
  variables are the restore target, and every stored shape is checked against it first.

  Raises:
    VariablesError: missing directory, nothing restorable, or parameters that do not fit the
      model (the message names the first variable that differs).
  """
  import orbax.checkpoint as ocp  # local: orbax is slow to import

  from cimjax import checkpoint as ckpt_lib

  p = Path(path).absolute()
  if not p.is_dir():
    raise VariablesError(f"directory not found: {str(path)!r}")
  target = abstract_variables(model)
  target = {k: v for k, v in target.items() if k in ("params", "batch_stats")}
  if (p / "variables").is_dir():
    p = p / "variables"
  try:
    if (p / "_CHECKPOINT_METADATA").is_file() or (p / "_METADATA").is_file():
      with _reader() as c:
        _check_shapes(path, model, dict(_saved_tree(c, p)), target)  # before: clear errors
        out = dict(c.restore(p, ckpt_lib.abstract_like(target)))
    else:
      mngr = ocp.CheckpointManager(p)
      step = mngr.latest_step()
      if step is None:
        raise VariablesError(f"no checkpoint in {str(path)!r}")
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      state = restored.state
      get = (
        (lambda k: state.get(k)) if isinstance(state, dict) else (lambda k: getattr(state, k, None))
      )
      out = {k: get(k) for k in target if get(k) is not None}
  except VariablesError:
    raise
  except Exception as e:  # orbax raises many types; report them as one line
    msg = str(e).strip().splitlines()
    raise VariablesError(
      f"cannot restore {str(path)!r} for model {model.name!r}: "
      f"{type(e).__name__}: {msg[0] if msg else ''}"
    ) from None
  if "params" not in out or not _same_structure(out["params"], target["params"]):
    raise VariablesError(f"{str(path)!r} holds no parameters of model {model.name!r}")
  _check_shapes(path, model, out, target)
  return out


def _same_structure(a: PyTree, b: PyTree) -> bool:
  same = jax.tree.structure(a) == jax.tree.structure(b)  # type: ignore[operator]
  return bool(same)


def _check_shapes(path: Any, model: Any, got_tree: dict[str, Any], target: dict[str, Any]) -> None:
  """Raises VariablesError naming the first variable whose stored shape differs."""
  for k in target:
    if k not in got_tree:
      continue
    got = traverse_util.flatten_dict(dict(got_tree[k]), sep="/")
    want = traverse_util.flatten_dict(dict(target[k]), sep="/")
    for name, leaf in want.items():
      shape = tuple(getattr(got.get(name), "shape", np.shape(got.get(name))))
      if shape != tuple(leaf.shape):
        raise VariablesError(
          f"cannot restore {str(path)!r} for model {model.name!r}: {k}/{name} "
          f"has shape {shape}, the model needs {tuple(leaf.shape)}"
        )


__all__ = [
  "FAST_COMPILE",
  "VariablesError",
  "abstract_variables",
  "init_variables",
  "load_variables",
  "restore_variables",
  "save_variables",
]
