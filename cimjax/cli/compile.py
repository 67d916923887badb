"""Compile a model onto CIM crossbars, verify it bit-exactly and measure accuracy.

Usage (the ``cimjax-compile`` console script; ``python -m launch.compile`` from the
repository root is the same)::

  cimjax-compile --model=small_cnn --workdir=/tmp/c --hw=rram_256_c4 --uniform=4,4
  cimjax-compile --model=resnet20 --workdir=/tmp/r --policy=best.npy --hw=rram_128_c2 \\
      --adc_bits=6 --adc_calibrate --variation=0.05 --stuck_at=0.001 --read_noise=0.5
  cimjax-compile --program=/tmp/c/program --adc_bits=4     # re-run a saved program

Steps: build the model (random weights, or ``--checkpoint``), compile it with the policy onto
the target (:func:`cimjax.compile.compile_and_verify`), save the program to
``WORKDIR/program`` and a JSON report to ``WORKDIR/compile_report.json``, verify every layer's
integer accumulator and the logits against the fake-quantised model (ideal ADC, no noise), print
a per-layer table (tiles, crossbar cycles, latency, energy from the schedule) and, when a test
set fits the model (Fashion-MNIST for 28x28x1 inputs, padded to 32x32x3 for ResNet-20), the test
accuracy of the fake-quantised model and of the crossbar with the requested non-idealities.

Exit status: 0 on success, 1 if verification fails, 2 on bad input (any
:class:`cimjax.errors.CimjaxError`: one line ``cimjax-compile: error: ...`` on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from cimjax import cli as cli_lib
from cimjax import progress as progress_lib
from cimjax.cli import CimjaxError, UsageError, parse_uniform
from cimjax.errors import UnknownModelError

PROG = "cimjax-compile"

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
_MODEL = flags.DEFINE_string(
  "model",
  "small_cnn",
  "Model: a zoo or registered name, package.module:factory, path/file.py:factory or a .onnx "
  "file (docs/own_models.md).",
  flag_values=FLAGS,
)
_MODEL_KWARGS = flags.DEFINE_string(
  "model_kwargs", "{}", "JSON options of get_model, e.g. '{\"image_size\": 32}'.", flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Output directory (program + JSON report).", flag_values=FLAGS
)
_POLICY = flags.DEFINE_string(
  "policy", None, "Policy .npy file (int [L, 2], CIM-AQ format).", flag_values=FLAGS
)
_UNIFORM = flags.DEFINE_list(
  "uniform", "8,8", "Uniform policy W,A when --policy is absent.", flag_values=FLAGS
)
_HW = flags.DEFINE_string(
  "hw", "rram_256_c4", "Hardware target name (hw/) or .toml path.", flag_values=FLAGS
)
_INPUT_SCHEME = flags.DEFINE_enum(
  "input_scheme",
  "twos",
  ["twos", "offset"],
  "Signed-input scheme of the crossbar.",
  flag_values=FLAGS,
)
_ADC_BITS = flags.DEFINE_string(
  "adc_bits",
  "hw",
  'ADC bits of the non-ideal run: "hw" (the target\'s), "ideal" or 1..32.',
  flag_values=FLAGS,
)
_ADC_CALIBRATE = flags.DEFINE_bool(
  "adc_calibrate",
  False,
  "Calibrate per-layer ADC ranges on training images (else full scale).",
  flag_values=FLAGS,
)
_VARIATION = flags.DEFINE_float(
  "variation", 0.0, "Relative std of cell conductances (d2d).", flag_values=FLAGS
)
_STUCK_AT = flags.DEFINE_float(
  "stuck_at",
  0.0,
  "Stuck-at fault rate per cell, split equally between stuck-at-0 and -1.",
  flag_values=FLAGS,
)
_READ_NOISE = flags.DEFINE_float(
  "read_noise",
  0.0,
  "Std of the read noise per column sum (level step x input LSB units).",
  flag_values=FLAGS,
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Checkpoint directory of trained params.", flag_values=FLAGS
)
_PROGRAM = flags.DEFINE_string(
  "program", None, "Re-run a saved program directory.", flag_values=FLAGS
)
_SEED = flags.DEFINE_integer(
  "seed", 0, "Seed of random weights, verification inputs, noise.", flag_values=FLAGS
)
_NUM_VERIFY = flags.DEFINE_integer(
  "num_verify", 4, "Random inputs used for verification.", flag_values=FLAGS
)
_DATASET = flags.DEFINE_string(
  "dataset",
  "auto",
  'Test set for accuracy: "auto", "none", "fashion_mnist", "fashion_mnist_subset" or "digits".',
  flag_values=FLAGS,
)
_EVAL_IMAGES = flags.DEFINE_integer(
  "eval_images", 1000, "Test images (-1: all, 0: skip).", flag_values=FLAGS
)
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 250, "Evaluation batch size.", flag_values=FLAGS)
_JSON = flags.DEFINE_bool(
  "json", False, "Print the JSON report instead of a table.", flag_values=FLAGS
)


def parse_adc_bits(text: str) -> int | None | str:
  """``"hw"`` | ``"ideal"`` (None) | an int in 1..32."""
  if text in ("hw", "ideal"):
    return None if text == "ideal" else "hw"
  try:
    v = int(text)
  except ValueError:
    raise UsageError(f"--adc_bits={text!r}: expected hw, ideal or an integer 1..32") from None
  if not 1 <= v <= 32:
    raise UsageError(f"--adc_bits={text!r}: expected hw, ideal or an integer 1..32")
  return v


def make_noise(variation: float, stuck_at: float, read_noise: float) -> Any:
  """The :class:`cimjax.noise.NoiseConfig` of the flags, or None when all are zero."""
  from cimjax.noise import NoiseConfig

  for name, v, hi in (
    ("variation", variation, 10.0),
    ("stuck_at", stuck_at, 1.0),
    ("read_noise", read_noise, 1e6),
  ):
    if not np.isfinite(v) or not 0.0 <= v <= hi:
      raise UsageError(f"--{name}={v!r}: expected a number in [0, {hi:g}]")
  if variation == 0 and stuck_at == 0 and read_noise == 0:
    return None
  return NoiseConfig(
    variation=variation, stuck_at_0=stuck_at / 2, stuck_at_1=stuck_at / 2, read_noise=read_noise
  )


def load_model(name: str, kwargs_json: str) -> tuple[Any, dict[str, Any]]:
  """The ModelDef of ``name`` with JSON options."""
  from cimjax.train import config as train_config

  try:
    kwargs = json.loads(kwargs_json)
    if not isinstance(kwargs, dict):
      raise ValueError("not a JSON object")
  except ValueError as e:
    raise UsageError(f"--model_kwargs={kwargs_json!r}: invalid JSON object ({e})") from None
  try:
    return train_config.resolve_model(name, **kwargs), kwargs
  except UnknownModelError as e:
    raise UsageError(f"--model: {e}") from None
  except CimjaxError as e:
    raise UsageError(f"--model_kwargs: {e}") from None


def load_variables(model: Any, checkpoint: str | None, seed: int) -> dict[str, Any]:
  """Random-initialised variables, or the trained ones of ``checkpoint``."""
  from cimjax import compile as cc

  if checkpoint is None:
    return cc.init_variables(model, seed)
  try:
    return cc.restore_variables(checkpoint, model)
  except cc.ProgramError as e:
    raise UsageError(f"--checkpoint: {e}") from None


def load_eval_data(dataset: str, model: Any, n: int) -> tuple[Any, Any] | None:
  """A test split shaped for ``model``, or None (no dataset fits, or ``n == 0``)."""
  if n == 0 or dataset == "none":
    return None
  from cimjax import data

  h, w, c = model.input_shape
  fits = model.num_classes == 10 and h == w and h >= 28 and c in (1, 3)
  if dataset == "auto":
    if not fits or h not in (28, 32):
      return None
    names = ["fashion_mnist", "fashion_mnist_subset"]
  else:
    if dataset not in data.DATASET_NAMES:
      raise UsageError(
        f"--dataset={dataset!r}: expected auto, none or one of {', '.join(data.DATASET_NAMES)}"
      )
    if not fits and dataset != "digits":
      raise UsageError(
        f"--dataset={dataset}: model input {model.input_shape} with "
        f"{model.num_classes} classes does not fit 28x28 grey 10-class images"
      )
    names = [dataset]
  for name in names:
    try:
      splits = data.load_dataset(
        name, image_size=None if h == 28 or name == "digits" else h, channels=None if c == 1 else c
      )
    except data.DataError:
      continue
    test = splits["test"]
    if tuple(test.images.shape[1:]) != tuple(model.input_shape):
      continue
    m = len(test.labels) if n < 0 else min(n, len(test.labels))
    return test.images[:m], test.labels[:m]
  if dataset != "auto":
    raise UsageError(f"--dataset={dataset}: not available")
  return None


def format_table(summary: dict[str, Any]) -> str:
  """Per-layer table with totals, verification and accuracy lines."""
  head = (
    "#",
    "name",
    "kind",
    "w",
    "a",
    "slices",
    "cycles",
    "tiles",
    "xbar_cycles",
    "latency_us",
    "energy_pJ",
    "verify",
  )
  checks = {c["index"]: c for c in summary["verify"]["layers"]}
  rows = []
  for r in summary["layers"]:
    c = checks[r["index"]]
    ok = (
      "exact"
      if c["exact"] and c["weights_match"]
      else (f"{c['mismatches']}/{c['numel']} differ (max {c['max_abs_err']:g})")
    )
    rows.append(
      (
        str(r["index"]),
        r["name"],
        r["kind"],
        str(r["w_bits"]),
        str(r["a_bits"]),
        str(r["slices"]),
        str(r["cycles"]),
        str(r["tiles"]),
        str(r["exec_cycles"]),
        f"{r['latency_us']:.1f}",
        f"{r['energy_pj']:.4g}",
        ok,
      )
    )
  widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(head)]
  left = {1, 2, 11}

  def fmt(cells):
    return "  ".join(
      x.ljust(wd) if j in left else x.rjust(wd) for j, (x, wd) in enumerate(zip(cells, widths))
    ).rstrip()

  lines = [
    f"model {summary['model']} on {summary['hw']} (mapping {summary['mapping']}, "
    f"{summary['latency_mode']}, signed inputs: {summary['input_scheme']}): "
    f"{len(rows)} layers",
    fmt(head),
    "  ".join("-" * wd for wd in widths),
  ]
  lines += [fmt(row) for row in rows]
  v = summary["verify"]
  ok_text = "OK: every accumulator and the logits are bit-exact"
  lines += [
    "",
    f"total tiles     {summary['total_tiles']}",
    f"total latency   {summary['total_latency_us']:,.1f} us (schedule walk; cost model "
    f"{'agrees' if not summary['cost_model_mismatches'] else 'DISAGREES'})",
    f"total energy    {summary['total_energy_pj']:,.1f} pJ",
    f"verification    {ok_text if v['ok'] else 'FAILED'}"
    f" (logits max |diff| {v['logits_max_abs_err']:g})",
  ]
  acc = summary.get("accuracy")
  if acc:
    ni = summary["nonideal"]
    lines.append(
      f"accuracy        fake-quant {100 * acc['fake_quant']:.2f}%, crossbar "
      f"{100 * acc['crossbar']:.2f}% (adc_bits={ni['adc_bits'] or 'ideal'}, "
      f"calibrated={ni['adc_frac'] is not None}, noise={ni['noise']})"
    )
  return "\n".join(lines)


def _check_flags() -> tuple[int | None | str, Any]:
  """Validates the flags that need no model; returns ``(adc_bits, noise)``."""
  from cimjax import data

  adc_bits = parse_adc_bits(_ADC_BITS.value)
  noise = make_noise(_VARIATION.value, _STUCK_AT.value, _READ_NOISE.value)
  if _NUM_VERIFY.value < 1:
    raise UsageError(f"--num_verify={_NUM_VERIFY.value}: expected an integer >= 1")
  if _EVAL_BATCH.value < 1:
    raise UsageError(f"--eval_batch={_EVAL_BATCH.value}: expected an integer >= 1")
  if _DATASET.value not in ("auto", "none", *data.DATASET_NAMES):
    raise UsageError(
      f"--dataset={_DATASET.value!r}: expected auto, none or one of {', '.join(data.DATASET_NAMES)}"
    )
  if _CHECKPOINT.value is not None and not Path(_CHECKPOINT.value).is_dir():
    raise UsageError(f"--checkpoint: directory not found: {_CHECKPOINT.value!r}")
  return adc_bits, noise


def _saved_program() -> tuple[Any, Any]:
  """``(program, model)`` of ``--program``."""
  from cimjax import compile as cc

  for f in (_POLICY, _CHECKPOINT):
    if f.present:
      raise UsageError(f"--{f.name} cannot be combined with --program")
  try:
    program = cc.load_program(_PROGRAM.value)
    return program, cc.program_model(program)
  except cc.ProgramError as e:
    raise UsageError(f"--program: {e}") from None


def _model_inputs() -> tuple[Any, dict[str, Any], Any, Any, dict[str, Any]]:
  """``(model, variables, policy, hw, model_kwargs)`` of the flags (no ``--program``)."""
  from cimjax import hw as hw_lib
  from cimjax import policy as policy_lib
  from cimjax import trace

  if _WORKDIR.value is None:
    raise UsageError("--workdir is required (or --program to re-run a saved program)")
  if _POLICY.value is not None and _UNIFORM.present:
    raise UsageError("--policy and --uniform are mutually exclusive; give one of them")
  try:
    hw = hw_lib.load_hw(_HW.value)
  except hw_lib.HwError as e:
    raise UsageError(f"--hw: {e}") from None
  model, model_kwargs = load_model(_MODEL.value, _MODEL_KWARGS.value)
  specs = trace.trace_specs(model)
  names = [s.name for s in specs]
  try:
    if _POLICY.value is not None:
      flag = "--policy"
      pol = policy_lib.load_policy(_POLICY.value, len(specs), layer_names=names)
    else:
      flag = "--uniform"
      w, a = parse_uniform(_UNIFORM.value)
      pol = policy_lib.validate_policy(
        policy_lib.uniform_policy(len(specs), w, a), len(specs), layer_names=names
      )
  except policy_lib.PolicyError as e:
    raise UsageError(f"{flag}: {e}") from None
  variables = load_variables(model, _CHECKPOINT.value, _SEED.value)
  return model, variables, pol, hw, model_kwargs


def run_compile(argv_rest: list[str]) -> tuple[dict[str, Any], bool]:
  """Does the work of :func:`main` from the parsed flags; returns ``(summary, ok)``."""
  if argv_rest:
    raise UsageError(f"unexpected arguments: {' '.join(argv_rest)}")
  from cimjax import compile as cc

  adc_bits, noise = _check_flags()
  if _PROGRAM.value is not None:
    program, model = _saved_program()
    variables = None
  else:
    model, variables, pol, hw, model_kwargs = _model_inputs()
    program = None
  eval_data = load_eval_data(_DATASET.value, model, _EVAL_IMAGES.value)
  if _WORKDIR.value is not None:  # checked (an OSError) before the work, created after the checks
    Path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
  adc_frac = None
  if program is None:
    program = cc.compile_model(
      model, variables, pol, hw, input_scheme=_INPUT_SCHEME.value, model_kwargs=model_kwargs
    )
  if _ADC_CALIBRATE.value:
    import jax

    calib = (
      eval_data[0][:64]
      if eval_data is not None
      else np.asarray(jax.random.normal(jax.random.key(_SEED.value + 7), (16, *model.input_shape)))
    )
    adc_frac = cc.calibrate_adc(program, calib, model=model)
  with progress_lib.Progress().phases(PROG) as progress:  # a bar on a terminal, else lines
    res = cc.compile_and_verify(
      model,
      variables,
      None,
      None,
      workdir=_WORKDIR.value,
      num_verify=_NUM_VERIFY.value,
      seed=_SEED.value,
      adc_bits=adc_bits,
      adc_frac=adc_frac,
      noise=noise,
      eval_data=eval_data,
      eval_batch=_EVAL_BATCH.value,
      program=program,
      progress=progress,
    )
  return res.summary, res.report.ok


def main(argv: list[str]) -> int:
  """absl main (the flags are parsed into :data:`FLAGS`).

  Returns:
    The exit status (:func:`cimjax.cli.run_main`): 0, 1 when verification fails (or on a bug),
    2 after one line on stderr for bad input.
  """
  progress_lib.default_verbosity()  # WARNING unless --verbosity/-v is given (-v 0: INFO)

  def body() -> int:
    summary, ok = run_compile(list(argv[1:]))
    if _JSON.value:
      print(json.dumps(summary))
    else:
      print(format_table(summary))
    if not ok:
      print(
        f"{PROG}: verification failed: "
        f"{[c['name'] for c in summary['verify']['layers'] if not c['exact']]}",
        file=sys.stderr,
      )
      return 1
    return 0

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Console-script entry point."""
  cli_lib.run_console(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
