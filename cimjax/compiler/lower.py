"""Lowering a model with its variables and a bit policy onto a hardware target.

:func:`compile_model` plans every layer (:mod:`cimjax.compiler.plan`), builds the schedule
(:mod:`cimjax.compiler.schedule`), captures every layer's integer weights exactly as the model's
own quantizers compute them, and stores per static layer the cell levels of its tiles, the column
sums of the weights and the dequantisation scales (:class:`cimjax.compiler.program.CimProgram`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cimjax import crossbar as xb
from cimjax import hw as hw_lib
from cimjax import layers as layers_lib
from cimjax import policy as policy_lib
from cimjax import quant
from cimjax.compiler.plan import LayerPlan, layer_layout, plan_layers
from cimjax.compiler.program import CimProgram, array_key
from cimjax.compiler.schedule import build_schedule
from cimjax.errors import ProgramError
from cimjax.spec import LayerSpec


def get_path(tree: Any, path: str) -> Any:
  """The node of nested dicts at ``"a/b/c"``, or None when a part is missing."""
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def unwrap(v: Any) -> Any:
  """A captured value (Flax ``sow`` stores a one-element tuple) without its tuple."""
  return v[0] if isinstance(v, tuple) else v


def weight_matrices(kind: str, groups: int, w_int: np.ndarray) -> np.ndarray:
  """A layer's integer kernel as its crossbar matrices ``[rep, n, m]``.

  Args:
    kind: ``"Conv2D"`` (a kernel ``[kh, kw, cin / groups, cout]``, one matrix per group) or
      ``"Dense"`` (a kernel ``[n, m]``, one matrix).
    groups: convolution groups.
    w_int: the integer kernel.
  """
  if kind == "Conv2D":
    return np.asarray(layers_lib.conv_kernel_matrices(jnp.asarray(w_int), groups))
  return np.asarray(w_int)[None]


def _step(clip: Any, bits: int, *, signed: bool, narrow: bool) -> Any:
  """The quantizer step of a layer's clip table at ``bits``."""
  return quant.step_size(quant.gather_clip(clip, bits), bits, signed=signed, narrow=narrow)


def _static_arrays(
  plan: LayerPlan, wm: np.ndarray, w_step: Any, a_step: np.ndarray, cfg: xb.XbarConfig
) -> dict[str, np.ndarray]:
  """The stored arrays of a layer with static weights (see :class:`CimProgram`).

  Args:
    plan: the layer's plan.
    wm: ``[rep, n, m]`` integer-valued weight matrices.
    w_step: the weight quantizer's step (scalar or per output channel).
    a_step: float32 ``[]`` activation step.
    cfg: the simulator configuration of the target.

  Returns:
    ``{name: array}`` without the ``layerNNN/`` prefix.
  """
  w_int = np.rint(wm).astype(np.int64)
  levels = xb.slice_levels(w_int, plan.w_bits, layer_layout(plan, cfg), xp=np)  # uint8
  tiles = xb.tile_matrix(levels, cfg.rows, cfg.cols)
  w_step = np.broadcast_to(
    np.asarray(w_step, np.float32).reshape(-1), (plan.repeat * plan.m,)
  ).reshape(plan.repeat, plan.m)
  out_scale = (w_step * a_step).astype(np.float32)
  mult, shift = xb.fixed_point_multiplier(out_scale)
  return {
    "w_int": w_int.astype(np.int8 if plan.w_bits <= 8 else np.int16),
    "levels": tiles,
    "w_colsum": w_int.sum(axis=1).astype(np.int32),
    "w_step": w_step.astype(np.float32),
    "out_scale": out_scale,
    "out_mult": mult,
    "out_shift": shift,
  }


def _layer_arrays(
  spec: LayerSpec, plan: LayerPlan, params: Any, cim: Any, cfg: xb.XbarConfig
) -> dict[str, np.ndarray]:
  """Every stored array of one layer, keyed ``"layerNNN/<name>"``.

  Args:
    spec: the layer's geometry.
    plan: its plan.
    params: the model's ``params`` collection.
    cim: the captured ``"cim"`` state of a forward pass (integer weights of static layers).
    cfg: the simulator configuration of the target.

  Raises:
    ProgramError: the layer's parameters or captured weights are missing or do not fit.
  """
  i = plan.index
  p = get_path(params, spec.name)
  if p is None or "a_clip" not in p:
    raise ProgramError(f"layer {i} ({spec.name}): parameters not found in variables")
  a_step = _step(p["a_clip"], plan.a_bits, signed=plan.signed_input, narrow=False)
  a_step = np.asarray(a_step, np.float32).reshape(())
  if plan.dynamic:
    w_step = _step(p["w_clip"], plan.w_bits, signed=True, narrow=True)
    out = {"a_step": a_step, "w_step": np.asarray(w_step, np.float32).reshape(())}
  else:
    captured = get_path(cim, spec.name)
    if captured is None or "w_int" not in captured:
      raise ProgramError(f"layer {i} ({spec.name}): no captured integer weights")
    wm = weight_matrices(spec.kind, spec.groups, np.asarray(unwrap(captured["w_int"])))
    if wm.shape != (plan.repeat, plan.n, plan.m):
      raise ProgramError(
        f"layer {i} ({spec.name}): weight matrices {wm.shape} do not match "
        f"the geometry {(plan.repeat, plan.n, plan.m)}"
      )
    w_step = _step(p["w_clip"], plan.w_bits, signed=True, narrow=True)
    out = {"a_step": a_step, **_static_arrays(plan, wm, w_step, a_step, cfg)}
  return {array_key(i, k): v for k, v in out.items()}


def _validated_policy(policy: Any, specs: list[LayerSpec], max_bits: int) -> np.ndarray:
  """The policy as int32 ``[L, 2]`` with bits in ``2..max_bits``, or ProgramError."""
  try:
    return policy_lib.validate_policy(
      policy, len(specs), min_bits=2, max_bits=max_bits, layer_names=[s.name for s in specs]
    )
  except policy_lib.PolicyError as e:
    raise ProgramError(f"policy: {e}") from None


def _capture(model: Any, variables: Any, pol: np.ndarray) -> Any:
  """The ``"cim"`` state of one forward pass (batch of zeros): every layer's integer weights.

  It runs eagerly (op by op): under jit XLA may reassociate the quantizer's
  ``x / (clip / denom)`` and flip ties at .5, so eager arithmetic is the reference (see
  :func:`cimjax.compiler.verify`).
  """
  from cimjax import models as models_lib  # local: models imports layers only

  x0 = jnp.zeros((1, *model.input_shape), jnp.float32)
  _, state = models_lib.forward(model.module, variables, x0, jnp.asarray(pol), capture=True)
  return state.get("cim", {})


def _variable_arrays(variables: Any) -> dict[str, np.ndarray]:
  """The model's variables keyed ``"variables/<collection>/<path>"``."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
  return {f"variables/{k}": np.asarray(v) for k, v in flat.items()}


def compile_model(
  model: Any,
  variables: Any,
  policy: Any,
  hw: hw_lib.HardwareTarget | str,
  *,
  input_scheme: str = "twos",
  model_kwargs: dict[str, Any] | None = None,
  max_bits: int = 8,
) -> CimProgram:
  """Lowers a model with a bit policy onto a hardware target.

  Args:
    model: a :class:`cimjax.models.ModelDef`.
    variables: its variables (``{"params": ..., ["batch_stats": ...]}``).
    policy: int ``[L, 2]`` (weight bits, activation bits), bits in ``2..max_bits``.
    hw: target (or its name/path).
    input_scheme: signed-input scheme (``"twos"`` or ``"offset"``).
    model_kwargs: the :func:`cimjax.models.get_model` options that rebuild ``model`` (stored so
      a saved program can be executed on its own).
    max_bits: largest allowed bit-width.

  Returns:
    The :class:`CimProgram`.

  Raises:
    ProgramError: the policy does not fit, or a layer's parameters are missing.
  """
  from cimjax import trace

  target = hw_lib.load_hw(hw)
  if input_scheme not in xb.INPUT_SCHEMES:
    raise ProgramError(f"input_scheme = {input_scheme!r}; allowed: {', '.join(xb.INPUT_SCHEMES)}")
  specs = trace.trace_specs(model)
  pol = _validated_policy(policy, specs, max_bits)
  plans = plan_layers(specs, pol, target)
  sched = build_schedule(plans, target)
  cfg = xb.XbarConfig.from_hw(target, input_scheme=input_scheme)
  cim = _capture(model, variables, pol)
  arrays: dict[str, np.ndarray] = {}
  for spec, plan in zip(specs, plans):
    arrays.update(_layer_arrays(spec, plan, variables["params"], cim, cfg))
  arrays.update(_variable_arrays(variables))
  return CimProgram(
    hw=target,
    policy=pol,
    layers=plans,
    schedule=sched,
    arrays=arrays,
    input_scheme=input_scheme,
    model=getattr(model, "name", None),
    model_kwargs=dict(model_kwargs or {}),
    input_shape=tuple(getattr(model, "input_shape", ()) or ()) or None,
    num_classes=getattr(model, "num_classes", None),
  )


__all__ = ["compile_model", "get_path", "unwrap", "weight_matrices"]
