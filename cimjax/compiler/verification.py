"""Verification and accuracy of a program: bit-exactness, ADC calibration, test accuracy.

:func:`verify` compares every layer's integer accumulator (and the stored integer weights) and
the logits of the simulated program with the fake-quantised model; :func:`calibrate_adc`
measures per-layer ADC ranges; :func:`evaluate_accuracy` gives top-1 accuracy with or without the
crossbar simulator; :func:`check_cost` compares the walked schedule with :mod:`cimjax.cost`;
:func:`compile_and_verify` runs all of it (the entry point of the CLI and of the pipeline).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import crossbar as xb
from cimjax import hw as hw_lib
from cimjax import io
from cimjax.compiler.executor import execute, make_executor, stored_levels
from cimjax.compiler.lower import compile_model, get_path, unwrap, weight_matrices
from cimjax.compiler.plan import LayerPlan, layer_layout
from cimjax.compiler.program import CimProgram, program_model, save_program
from cimjax.compiler.schedule import ScheduleCost, build_schedule, walk_schedule
from cimjax.errors import ProgramError
from cimjax.noise import NoiseConfig

Array = jax.Array
# ``progress(phase, done, total)`` of :func:`compile_and_verify`: phase ``"lower"`` and
# ``"verify"`` count layers, ``"accuracy"`` evaluation batches (both passes).
CompileProgressFn = Callable[[str, int, int], None]

# ScheduleCost fields that cimjax.cost.cost_tables also computes (same names).
_COST_FIELDS = (
  "latency_us",
  "latency_write_us",
  "energy_pj",
  "e_dac_pj",
  "e_read_pj",
  "e_adc_pj",
  "e_shift_add_pj",
  "e_write_pj",
)


class LayerCheck(NamedTuple):
  """Comparison of one layer's integer accumulator (simulated vs fake-quantised model).

  Attributes:
    index, name, kind: the layer.
    exact: every accumulator value equal.
    mismatches: number of differing values.
    numel: number of values compared.
    max_abs_err: largest absolute difference.
    mean_abs_err: mean absolute difference.
    weights_match: the program's stored integer weights equal the model's (True for dynamic
      layers, which store none).
  """

  index: int
  name: str
  kind: str
  exact: bool
  mismatches: int
  numel: int
  max_abs_err: float
  mean_abs_err: float
  weights_match: bool


class VerifyReport(NamedTuple):
  """Result of :func:`verify`.

  Attributes:
    layers: one :class:`LayerCheck` per layer.
    logits_equal: simulated logits equal the model's bit for bit.
    logits_max_abs_err: largest logit difference.
    top1_agreement: fraction of inputs with the same arg-max.
    ok: every layer exact, weights match, logits equal.
  """

  layers: list[LayerCheck]
  logits_equal: bool
  logits_max_abs_err: float
  top1_agreement: float
  ok: bool

  def mismatched(self) -> list[LayerCheck]:
    """Layers that are not exact."""
    return [c for c in self.layers if not (c.exact and c.weights_match)]

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (one dict per layer)."""
    return {
      "ok": self.ok,
      "logits_equal": self.logits_equal,
      "logits_max_abs_err": self.logits_max_abs_err,
      "top1_agreement": self.top1_agreement,
      "layers": [c._asdict() for c in self.layers],
    }


def _model_and_variables(program: CimProgram, model: Any, variables: Any) -> tuple[Any, Any]:
  """The ModelDef and variables a run of ``program`` uses (defaults: the program's own)."""
  md = program_model(program, model)
  return md, (program.variables() if variables is None else variables)


def _weights_match(program: CimProgram, p: LayerPlan, captured: dict[str, Any]) -> bool:
  """Whether the program's stored integer weights of layer ``p`` equal the model's."""
  if p.dynamic:
    return True
  wm = weight_matrices(p.kind, p.repeat, np.asarray(unwrap(captured["w_int"])))
  stored = program.layer_array(p.index, "w_int").astype(np.int64)
  return bool(np.array_equal(np.rint(wm).astype(np.int64), stored))


def _layer_check(program: CimProgram, p: LayerPlan, ref_cim: Any, sim_cim: Any) -> LayerCheck:
  """Compares layer ``p``'s captured accumulators (and weights) of the two passes."""
  a = get_path(ref_cim, p.name)
  b = get_path(sim_cim, p.name)
  if a is None or b is None:
    raise ProgramError(f"layer {p.index} ({p.name}): no captured accumulator")
  acc_r = np.asarray(unwrap(a["acc"]), np.float64)
  acc_s = np.asarray(unwrap(b["acc"]), np.float64)
  diff = np.abs(acc_r - acc_s)
  return LayerCheck(
    index=p.index,
    name=p.name,
    kind=p.kind,
    exact=bool(np.all(diff == 0)),
    mismatches=int(np.count_nonzero(diff)),
    numel=int(diff.size),
    max_abs_err=float(diff.max()) if diff.size else 0.0,
    mean_abs_err=float(diff.mean()) if diff.size else 0.0,
    weights_match=_weights_match(program, p, a),
  )


def _report(checks: list[LayerCheck], ref: Array, sim: Array) -> VerifyReport:
  """The report of the layer checks and of the two passes' logits."""
  ref_np, sim_np = np.asarray(ref), np.asarray(sim)
  logits_equal = bool(np.array_equal(ref_np, sim_np))
  err = float(np.max(np.abs(ref_np - sim_np))) if ref_np.size else 0.0
  top1 = float(np.mean(ref_np.argmax(-1) == sim_np.argmax(-1))) if ref_np.size else 1.0
  ok = logits_equal and all(c.exact and c.weights_match for c in checks)
  return VerifyReport(
    layers=checks, logits_equal=logits_equal, logits_max_abs_err=err, top1_agreement=top1, ok=ok
  )


def verify(
  program: CimProgram,
  x: Array,
  *,
  model: Any = None,
  variables: Any = None,
  jit: bool = False,
  on_layer: Callable[[int, int], None] | None = None,
  **hook_kwargs: Any,
) -> VerifyReport:
  """Checks a program against the fake-quantised model on inputs ``x``.

  By default the simulator runs with an ideal ADC and no noise (``adc_bits=None``), where every
  layer's integer accumulator and the logits must be equal. Passing ``adc_bits``/``noise``
  measures the error they cause instead.

  Args:
    program: the program.
    x: ``[B, H, W, C]`` inputs.
    model, variables: as in :func:`execute`.
    jit: run both forward passes as compiled functions (one compile each). By default both run
      eagerly (op by op; the crossbar kernels are still compiled per layer), which makes the
      digital operations after each accumulator identical in both passes, so the logits can be
      compared bit for bit. Under ``jit`` XLA fuses the two graphs differently (the
      accumulators still match exactly; logits differ in the last float32 bits), and the
      quantizers may round ties differently from the eager capture the compiler used.
    on_layer: ``on_layer(done, total)`` as the simulated pass finishes each layer (progress;
      under ``jit`` the calls come while tracing).
    **hook_kwargs: options of :func:`program_hook`.

  Returns:
    A :class:`VerifyReport` with one entry per layer.
  """
  from cimjax import models as models_lib

  md, v = _model_and_variables(program, model, variables)
  hook_kwargs.setdefault("adc_bits", None)
  pol = jnp.asarray(program.policy)
  x = jnp.asarray(x, jnp.float32)
  ref_fn = lambda v_, x_, p_: models_lib.forward(md.module, v_, x_, p_, capture=True)
  if jit:
    ref_fn = jax.jit(ref_fn)
  ref, ref_state = ref_fn(v, x, pol)
  if on_layer is not None:
    hook_kwargs["on_layer"] = _layer_counter(on_layer, len(program.layers))
  sim, sim_state = execute(program, x, model=md, variables=v, capture=True, jit=jit, **hook_kwargs)
  ref_cim, sim_cim = ref_state.get("cim", {}), sim_state.get("cim", {})
  checks = [_layer_check(program, p, ref_cim, sim_cim) for p in program.layers]
  return _report(checks, ref, sim)


def _layer_counter(on_layer: Callable[[int, int], None], total: int) -> Callable[[int], None]:
  """The executor's ``on_layer(index)`` as ``on_layer(layers done, total)`` (call order)."""
  done = [0]

  def count(index: int) -> None:
    done[0] = max(done[0], int(index) + 1)
    on_layer(done[0], total)

  return count


def calibrate_adc(
  program: CimProgram,
  x: Array,
  *,
  percentile: float = 99.99,
  min_frac: float = 1.0 / 64,
  model: Any = None,
  variables: Any = None,
) -> np.ndarray:
  """Per-layer calibrated ADC ranges from sample inputs (analog-cim-sim ``CALIB`` mode).

  Runs the program ideally on ``x`` (eagerly), collects every layer's analog partial sums and
  returns the ``percentile`` of their share of the full-scale range: the ADC then spends its
  levels on the range the data uses and clips the rare larger sums.

  Args:
    program: the program.
    x: ``[B, H, W, C]`` calibration inputs.
    percentile: in ``(0, 100]``; 100 gives the largest observed sum.
    min_frac: lower bound of the returned fractions.
    model, variables: as in :func:`execute`.

  Returns:
    float32 ``[L]`` fractions of full scale in ``[min_frac, 1]`` (pass as ``adc_frac``).
  """
  from cimjax import models as models_lib

  md, v = _model_and_variables(program, model, variables)
  cfg = program.xbar_config(adc_bits=None)
  stored = stored_levels(program)
  out = np.ones(len(program.layers), np.float32)

  def hook(index, spec, xi, w, w_bits, a_bits):
    p = program.layers[index]
    layout = layer_layout(p, cfg)
    if p.dynamic:
      levels = xb.slice_levels(w, p.w_bits, layout)
    else:
      levels = jnp.asarray(stored[index][0])
    u = np.asarray(xb.adc_utilisation(xi, levels, p.w_bits, p.a_bits, layout))
    u = u[u > 0]
    if u.size:
      out[index] = float(np.clip(np.percentile(u, percentile), min_frac, 1.0))
    # The ideal integer product continues the forward pass (equal to the ideal simulator).
    return xb.int_matmul(xi, w)

  models_lib.forward(
    md.module, v, jnp.asarray(x, jnp.float32), jnp.asarray(program.policy), mvm=hook
  )
  return out


def evaluate_accuracy(
  program: CimProgram,
  images: Any,
  labels: Any,
  *,
  batch_size: int = 250,
  simulate: bool = True,
  model: Any = None,
  variables: Any = None,
  read_seed: int = 0,
  on_batch: Callable[[int, int], None] | None = None,
  **exec_kwargs: Any,
) -> float:
  """Top-1 accuracy of a program on a labelled set.

  Args:
    program: the program.
    images: ``[N, H, W, C]`` float inputs.
    labels: ``[N]`` int labels.
    batch_size: fixed batch size (the last batch is padded and masked; one compilation).
    simulate: run the crossbar simulator (True) or the plain fake-quantised model (False).
    model, variables: as in :func:`execute`.
    read_seed: seed of the per-batch read-noise keys.
    on_batch: ``on_batch(batches done, batches)`` after each batch (progress).
    **exec_kwargs: options of :func:`make_executor` (``adc_bits``, ``adc_frac``, ``noise``,
      ``key``, ``block_elems``).

  Returns:
    Accuracy in ``[0, 1]``.
  """
  from cimjax import models as models_lib

  md, v = _model_and_variables(program, model, variables)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  n = len(labels)
  if n == 0:
    raise ProgramError("evaluate_accuracy: no images")
  pol = jnp.asarray(program.policy)
  if simulate:
    run = make_executor(program, model=md, **exec_kwargs)
    fn = lambda xb_, i: run(xb_, v, jax.random.fold_in(jax.random.key(read_seed), i))[0]
  else:
    ref = jax.jit(lambda v_, x_: models_lib.forward(md.module, v_, x_, pol)[0])
    fn = lambda xb_, i: ref(v, xb_)
  correct = 0
  num_batches = -(-n // batch_size)
  for bi, lo in enumerate(range(0, n, batch_size)):
    hi = min(lo + batch_size, n)
    xb_ = images[lo:hi]
    if hi - lo < batch_size:
      xb_ = np.concatenate([xb_, np.repeat(xb_[:1], batch_size - (hi - lo), axis=0)])
    pred = np.asarray(jnp.argmax(fn(jnp.asarray(xb_), bi), axis=-1))[: hi - lo]
    correct += int(np.sum(pred == labels[lo:hi]))
    if on_batch is not None:
      on_batch(bi + 1, num_batches)
  return correct / n


def check_cost(
  program_or_plans: CimProgram | Sequence[LayerPlan],
  hw: hw_lib.HardwareTarget | None = None,
  *,
  cost: ScheduleCost | None = None,
  rtol: float = 1e-12,
) -> list[str]:
  """Compares the walked cost with :func:`cimjax.cost.cost_tables` (xp=np) layer by layer.

  Returns:
    Human-readable mismatch descriptions (empty when everything agrees within ``rtol``).
  """
  from cimjax import cost as cost_lib

  if isinstance(program_or_plans, CimProgram):
    plans, hw, cost = program_or_plans.layers, program_or_plans.hw, program_or_plans.cost
  else:
    plans = list(program_or_plans)
    if hw is None:
      raise ValueError("check_cost: hw is required with plans")
    if cost is None:
      cost = walk_schedule(build_schedule(plans, hw), hw, len(plans))
  geom = {
    "m": np.array([p.m for p in plans]),
    "n": np.array([p.n for p in plans]),
    "inv": np.array([p.invocations for p in plans]),
    "rep": np.array([p.repeat for p in plans]),
  }
  maxb = max(8, max(max(p.w_bits, p.a_bits) for p in plans))
  t = cost_lib.cost_tables(geom, hw, max_bits=maxb, xp=np)
  bad = []
  for p in plans:
    i, w, a = p.index, p.w_bits - 1, p.a_bits - 1
    if int(t.tiles[i, w, a]) != p.tiles:
      bad.append(f"layer {i} ({p.name}): tiles {p.tiles} != cost model {int(t.tiles[i, w, a])}")
    for field in _COST_FIELDS:
      x, y = float(getattr(cost, field)[i]), float(getattr(t, field)[i, w, a])
      if not np.isclose(x, y, rtol=rtol, atol=0.0):
        bad.append(
          f"layer {i} ({p.name}) w{p.w_bits}/a{p.a_bits}: {field} {x!r} != cost model {y!r}"
        )
  return bad


class CompileResult(NamedTuple):
  """What :func:`compile_and_verify` produced.

  Attributes:
    program: the compiled program.
    report: the verification report (ideal ADC, no noise).
    path: the saved program directory, or None.
    accuracy: ``{"fake_quant", "crossbar"}`` test accuracies when data was given, else None.
    summary: JSON-ready summary (per-layer table, totals, verification, accuracy).
  """

  program: CimProgram
  report: VerifyReport
  path: Path | None
  accuracy: dict[str, float] | None
  summary: dict[str, Any]


def _accuracy(
  program: CimProgram,
  md: Any,
  eval_data: tuple[Any, Any],
  *,
  eval_batch: int,
  seed: int,
  adc_bits: int | None | str,
  adc_frac: Any,
  noise: NoiseConfig | None,
  progress: CompileProgressFn | None = None,
) -> dict[str, float]:
  """``{"fake_quant", "crossbar"}`` test accuracies (the crossbar with the non-idealities)."""
  images, labels = eval_data
  nb = -(-len(labels) // eval_batch)
  first = second = None
  if progress is not None:
    progress("accuracy", 0, 2 * nb)
    first = lambda d, _: progress("accuracy", d, 2 * nb)
    second = lambda d, _: progress("accuracy", nb + d, 2 * nb)
  accuracy = {
    "fake_quant": evaluate_accuracy(
      program, images, labels, simulate=False, model=md, batch_size=eval_batch, on_batch=first
    )
  }
  key = jax.random.key(seed + 1) if noise is not None else None
  accuracy["crossbar"] = evaluate_accuracy(
    program,
    images,
    labels,
    model=md,
    batch_size=eval_batch,
    adc_bits=adc_bits,
    adc_frac=adc_frac,
    noise=noise,
    key=key,
    read_seed=seed + 2,
    on_batch=second,
  )
  return accuracy


def _summary(
  program: CimProgram,
  report: VerifyReport,
  accuracy: dict[str, float] | None,
  nonideal: dict[str, Any],
) -> dict[str, Any]:
  """The JSON-ready summary of :func:`compile_and_verify` (``compile_report.json``)."""
  return {
    "model": program.model,
    "model_kwargs": program.model_kwargs,
    "hw": program.hw.name,
    "mapping": program.hw.mapping,
    "latency_mode": program.hw.latency_mode,
    "input_scheme": program.input_scheme,
    "policy": np.asarray(program.policy).tolist(),
    "layers": program.summary(),
    "total_latency_us": program.total_latency_us,
    "total_energy_pj": program.total_energy_pj,
    "total_tiles": int(sum(p.total_tiles for p in program.layers)),
    "cost_model_mismatches": check_cost(program),
    "verify": report.to_dict(),
    "accuracy": accuracy,
    "nonideal": nonideal,
  }


def _save_results(workdir: str | os.PathLike[str], program: CimProgram, summary: Any) -> Path:
  """Saves the program to ``workdir/program`` and the summary to ``compile_report.json``."""
  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  path = save_program(program, wd / "program")
  io.write_json(wd / "compile_report.json", summary, indent=1)
  return path


def compile_and_verify(
  model: Any,
  variables: Any,
  policy: Any,
  hw: hw_lib.HardwareTarget | str,
  *,
  workdir: str | os.PathLike[str] | None = None,
  verify_inputs: Any = None,
  num_verify: int = 4,
  seed: int = 0,
  input_scheme: str = "twos",
  model_kwargs: dict[str, Any] | None = None,
  adc_bits: int | None | str = "hw",
  adc_frac: Any = None,
  noise: NoiseConfig | None = None,
  eval_data: tuple[Any, Any] | None = None,
  eval_batch: int = 250,
  program: CimProgram | None = None,
  progress: CompileProgressFn | None = None,
) -> CompileResult:
  """Compiles (or takes) a program, verifies it bit-exactly, saves it and measures accuracy.

  The entry point of ``python -m launch.compile`` and of pipeline code.

  Args:
    model: the ModelDef.
    variables: its variables (trained or random).
    policy: int ``[L, 2]``.
    hw: target (object, name or path).
    workdir: if given, the program is saved to ``workdir/program`` and the summary to
      ``workdir/compile_report.json`` (both atomically).
    verify_inputs: ``[B, H, W, C]`` inputs for verification; default ``num_verify`` standard
      normal images drawn with ``seed``.
    num_verify: see above.
    seed: seed of the verification inputs and of the noise (chip) key.
    input_scheme: signed-input scheme.
    model_kwargs: :func:`cimjax.models.get_model` options (stored in the program).
    adc_bits: ADC of the non-ideal accuracy run (``"hw"``: the target's).
    adc_frac: ``[L]`` calibrated ADC ranges or None (full scale).
    noise: non-idealities of the non-ideal accuracy run.
    eval_data: ``(images, labels)`` of a test split, or None to skip accuracy.
    eval_batch: evaluation batch size.
    program: an already compiled (e.g. loaded) program; then ``variables``/``policy``/``hw`` are
      ignored and nothing is recompiled.
    progress: ``progress(phase, done, total)`` (:data:`CompileProgressFn`), e.g.
      :meth:`cimjax.progress.Progress.phases`: ``lower`` (layers, reported before and after),
      ``verify`` (layers of the simulated pass), ``accuracy`` (batches).

  Returns:
    :class:`CompileResult`.
  """
  if program is None:
    if progress is not None:
      progress("lower", 0, len(policy) if hasattr(policy, "__len__") else 0)
    program = compile_model(
      model, variables, policy, hw, input_scheme=input_scheme, model_kwargs=model_kwargs
    )
  if progress is not None:
    progress("lower", len(program.layers), len(program.layers))
  md = program_model(program, model)
  if verify_inputs is None:
    verify_inputs = jax.random.normal(
      jax.random.key(seed), (num_verify, *md.input_shape), jnp.float32
    )
  on_layer = None
  if progress is not None:
    progress("verify", 0, len(program.layers))
    on_layer = lambda d, n: progress("verify", d, n)
  report = verify(program, verify_inputs, model=md, on_layer=on_layer)
  accuracy = None
  if eval_data is not None:
    accuracy = _accuracy(
      program,
      md,
      eval_data,
      eval_batch=eval_batch,
      seed=seed,
      adc_bits=adc_bits,
      adc_frac=adc_frac,
      noise=noise,
      progress=progress,
    )
  nonideal = {
    "adc_bits": (program.hw.adc_bits if adc_bits == "hw" else adc_bits),
    "adc_frac": None if adc_frac is None else np.asarray(adc_frac).tolist(),
    "noise": None if noise is None else noise.to_dict(),
  }
  summary = _summary(program, report, accuracy, nonideal)
  path = None if workdir is None else _save_results(workdir, program, summary)
  return CompileResult(
    program=program, report=report, path=path, accuracy=accuracy, summary=summary
  )


__all__ = [
  "CompileProgressFn",
  "CompileResult",
  "LayerCheck",
  "VerifyReport",
  "calibrate_adc",
  "check_cost",
  "compile_and_verify",
  "evaluate_accuracy",
  "verify",
]
