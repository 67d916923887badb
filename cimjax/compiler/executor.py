"""The executor: a program's stored tiles run through the crossbar simulator.

:func:`program_hook` is the ``mvm`` hook of :func:`cimjax.models.forward` that feeds every
static layer the program's *stored* cell levels (not the model's weights) through
:mod:`cimjax.crossbar`; dynamic layers (attention ``Q.K^T``, ``A.V``) program their runtime
operand. :func:`make_executor` compiles the simulated forward pass once; :func:`execute` runs it
for one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import crossbar as xb
from cimjax.compiler.plan import layer_layout
from cimjax.compiler.program import CimProgram, program_model
from cimjax.errors import ProgramError
from cimjax.noise import NoiseConfig

Array = jax.Array


def stored_levels(program: CimProgram) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """The programmed matrices of the static layers, untiled for the simulator.

  Returns:
    ``{layer: (levels float32 [rep, rows_p, cols_p], w_colsum int32 [rep, m])}``.
  """
  out = {}
  for p in program.layers:
    if p.dynamic:
      continue
    lv = xb.untile_matrix(program.layer_array(p.index, "levels"), p.rows_p, p.cols_p)
    out[p.index] = (
      lv.astype(np.float32),
      program.layer_array(p.index, "w_colsum").astype(np.int32),
    )
  return out


def _checked_noise(noise: NoiseConfig | None, key: Array | None, who: str) -> NoiseConfig | None:
  """:func:`cimjax.crossbar.static_noise` of ``noise``; ProgramError if it needs a missing key."""
  noise = xb.static_noise(noise)
  if noise is not None and key is None:
    raise ProgramError(f"{who}: noise needs a PRNG key")
  return noise


def program_hook(
  program: CimProgram,
  *,
  stored: dict[int, tuple[Array, Array]] | None = None,
  adc_bits: int | None | str = "hw",
  adc_frac: Any = None,
  noise: NoiseConfig | None = None,
  key: Array | None = None,
  read_key: Array | None = None,
  straight_through_grad: bool = True,
  block_elems: int = xb.DEFAULT_BLOCK_ELEMS,
  on_layer: Callable[[int], None] | None = None,
) -> xb.MvmHook:
  """An ``mvm`` hook that runs the program's stored tiles on the crossbar simulator.

  Static layers ignore the ``w`` the forward pass hands over and use the program's cell levels
  (so the program itself is what runs); dynamic layers (attention) slice their runtime operand.

  Args:
    program: the compiled program.
    stored: the untiled levels (:func:`stored_levels`, possibly as traced arrays); computed
      from the program when None.
    adc_bits: ``"hw"`` (the target's), None (ideal) or an int.
    adc_frac: optional ``[L]`` ADC ranges as fractions of full scale.
    noise, key, read_key: non-idealities, the chip key and the read key (see
      :func:`cimjax.crossbar.make_mvm_hook`).
    straight_through_grad: backward pass of the ideal integer matmul.
    block_elems: simulator token-block size.
    on_layer: called with a layer's index once its product has been issued (eagerly:
      computed; under jit: traced), e.g. the per-layer progress of :func:`cimjax.compiler.verify`.
  """
  cfg = program.xbar_config(**({} if adc_bits == "hw" else {"adc_bits": adc_bits}))
  noise = _checked_noise(noise, key, "program_hook")
  if stored is None:
    stored = stored_levels(program)
  dyn_hook = xb.make_mvm_hook(
    cfg,
    policy=program.policy,
    noise=noise,
    key=key,
    read_key=read_key,
    adc_frac=adc_frac,
    straight_through_grad=straight_through_grad,
    block_elems=block_elems,
  )

  def hook(index, spec, x, w, w_bits, a_bits):
    y = _hook(index, spec, x, w, w_bits, a_bits)
    if on_layer is not None:
      on_layer(index)
    return y

  def _hook(index, spec, x, w, w_bits, a_bits):
    plan = program.layers[index]
    if plan.dynamic:
      return dyn_hook(index, spec, x, w, w_bits, a_bits)
    if x.shape[0] != plan.repeat or x.shape[-1] != plan.n or w.shape[-1] != plan.m:
      raise ProgramError(
        f"layer {index} ({plan.name}): operands x {x.shape}, w {w.shape} do "
        f"not match the program ({plan.repeat} x {plan.n} x {plan.m})"
      )
    levels, colsum = stored[index]
    pk, rk = xb.layer_read_keys(key, read_key, index)
    y = xb.simulate_levels(
      x,
      jnp.asarray(levels),
      plan.w_bits,
      plan.a_bits,
      layer_layout(plan, cfg),
      w_colsum=jnp.asarray(colsum),
      adc_frac=xb.layer_adc_frac(adc_frac, index),
      noise=noise,
      prog_key=pk,
      read_key=rk,
      block_elems=block_elems,
    )
    return xb.with_ideal_grad(x, w, y, straight_through_grad)

  return hook


def make_executor(
  program: CimProgram,
  *,
  model: Any = None,
  capture: bool = False,
  jit: bool = True,
  adc_bits: int | None | str = "hw",
  adc_frac: Any = None,
  noise: NoiseConfig | None = None,
  key: Array | None = None,
  block_elems: int = xb.DEFAULT_BLOCK_ELEMS,
  on_layer: Callable[[int], None] | None = None,
):
  """A reusable (jitted) function running the program on batches.

  Args:
    program: the program.
    model: the ModelDef (default: rebuilt from the program).
    capture: also return each layer's integer operands and accumulator (``"cim"``).
    jit: compile the whole simulated forward pass once (the stored tiles, variables, inputs,
      keys and ADC ranges are arguments, so later calls do not recompile; the noise
      magnitudes are compile-time constants).
    adc_bits, adc_frac, noise, key, block_elems, on_layer: see :func:`program_hook`.

  Returns:
    ``run(x, variables=None, read_key=None, adc_frac=None) -> (logits, state)``;
    ``variables`` defaults to the program's, ``read_key`` (one per batch) to one derived from
    ``key``, ``adc_frac`` to the one given here (changing it does not recompile).
  """
  from cimjax import models as models_lib

  md = program_model(program, model)
  default_vars = program.variables()
  stored0 = stored_levels(program)
  pol = jnp.asarray(program.policy)
  noise = _checked_noise(noise, key, "make_executor")
  num = len(program.layers)
  frac0 = jnp.ones((num,), jnp.float32) if adc_frac is None else jnp.asarray(adc_frac, jnp.float32)

  # The noise magnitudes are closed over (Python floats): zero ones are skipped at trace time.
  def fn(stored, variables, x, read_key, key_arg, frac):
    hook = program_hook(
      program,
      stored=stored,
      adc_bits=adc_bits,
      adc_frac=frac,
      noise=noise,
      key=key_arg,
      read_key=read_key,
      block_elems=block_elems,
      on_layer=on_layer,
    )
    return models_lib.forward(md.module, variables, x, pol, mvm=hook, capture=capture)

  if jit:
    fn = jax.jit(fn)

  def run(x, variables=None, read_key=None, adc_frac=None):
    v = default_vars if variables is None else variables
    frac = frac0 if adc_frac is None else jnp.asarray(adc_frac, jnp.float32).reshape(num)
    return fn(stored0, v, jnp.asarray(x, jnp.float32), read_key, key, frac)

  return run


def execute(
  program: CimProgram,
  x: Array,
  *,
  model: Any = None,
  variables: Any = None,
  capture: bool = False,
  jit: bool = True,
  read_key: Array | None = None,
  **hook_kwargs: Any,
) -> tuple[Array, dict[str, Any]]:
  """Runs a compiled program on inputs through the crossbar simulator (one call).

  For many batches build the function once with :func:`make_executor`.

  Args:
    program: the program.
    x: ``[B, H, W, C]`` inputs.
    model: the ModelDef (default: rebuilt from the program).
    variables: the model's variables (default: the program's).
    capture: also return each layer's integer operands and accumulator (``"cim"``).
    jit: compile the simulated forward pass as one function.
    read_key: key of the read noise.
    **hook_kwargs: ``adc_bits``, ``adc_frac``, ``noise``, ``key``, ``block_elems``,
      ``on_layer``.

  Returns:
    ``(logits, state)`` as :func:`cimjax.models.forward`.
  """
  run = make_executor(program, model=model, capture=capture, jit=jit, **hook_kwargs)
  return run(x, variables, read_key)


__all__ = ["execute", "make_executor", "program_hook", "stored_levels"]
