"""Accuracy under crossbar non-idealities, with and without noise-aware fine-tuning.

Usage (from the repository root; needs Fashion-MNIST and a trained small CNN)::

  python -m launch.bench_noise --variables=W/anyprec --workdir=/tmp/noise \\
      --out=/tmp/noise/results.json

``--variables`` is a training stage directory of ``python -m launch.train`` (its final
``variables/``), e.g. the any-precision stage of ``train/small_cnn_fashion.py``. For every ADC
resolution (``--adc_bits``, default 8,6,4) and device-to-device conductance variation
(``--variations``, default 0,2%,5%,10%) the script

1. compiles the model with the uniform policy (``--policy``, default 4/4) onto the target
   (``--hw``, default rram_256_c4: 256x256, 4-bit cells, 1-bit DAC, dc mapping),
   calibrates per-layer ADC ranges on training images (``--adc_mode=calibrated``; ``max`` uses
   the full-scale range), and measures the Fashion-MNIST test accuracy on the crossbar
   simulator, averaged over ``--chips`` chips (PRNG keys of the programming noise);
2. fine-tunes the variables noise-aware with :func:`cimjax.train.finetune_noisy`
   (``--ft_steps`` Adam steps, forward pass = the noisy crossbar with a fresh chip every step,
   backward = the ideal integer matmul via the straight-through hook), recompiles,
   recalibrates and measures again on held-out chips.

Prints a table and writes JSON (``--out``). Exit status 2 with one line on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import app, flags, logging

from cimjax import cli as cli_lib
from cimjax import io
from cimjax.errors import CimjaxError, UsageError

PROG = "launch.bench_noise"
FLAGS = flags.FlagValues()  # this tool's own registry (see cimjax.cli)
_VARIABLES = flags.DEFINE_string(
  "variables",
  None,
  "Trained variables (stage dir or variables/ dir).",
  flag_values=FLAGS,
)
_MODEL_KWARGS = flags.DEFINE_string(
  "model_kwargs",
  '{"channels": [16, 32, 32], "hidden": 64}',
  "JSON options of the small CNN (as in the train config).",
  flag_values=FLAGS,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where programs are written (optional).", flag_values=FLAGS
)
_HW = flags.DEFINE_string("hw", "rram_256_c4", "Hardware target.", flag_values=FLAGS)
_POLICY = flags.DEFINE_string("policy", "4,4", "Uniform W,A bits.", flag_values=FLAGS)
_ADC_BITS = flags.DEFINE_string(
  "adc_bits", "8,6,4", "Comma-separated ADC resolutions.", flag_values=FLAGS
)
_VARIATIONS = flags.DEFINE_string(
  "variations",
  "0,0.02,0.05,0.1",
  "Comma-separated relative conductance std.",
  flag_values=FLAGS,
)
_ADC_MODE = flags.DEFINE_enum(
  "adc_mode",
  "calibrated",
  ["calibrated", "max"],
  "ADC range: calibrated per layer or full scale.",
  flag_values=FLAGS,
)
_CHIPS = flags.DEFINE_integer(
  "chips", 2, "Chips (programming-noise keys) per evaluation.", flag_values=FLAGS
)
_FT_STEPS = flags.DEFINE_integer(
  "ft_steps", 300, "Noise-aware fine-tuning steps (0: skip).", flag_values=FLAGS
)
_FT_LR = flags.DEFINE_float("ft_lr", 1e-4, "Fine-tuning learning rate (Adam).", flag_values=FLAGS)
_FT_BATCH = flags.DEFINE_integer("ft_batch", 64, "Fine-tuning batch size.", flag_values=FLAGS)
_TEST_IMAGES = flags.DEFINE_integer(
  "test_images", 10000, "Test images (-1: all).", flag_values=FLAGS
)
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 500, "Evaluation batch size.", flag_values=FLAGS)
_CALIB_IMAGES = flags.DEFINE_integer(
  "calib_images", 256, "Training images for ADC calibration.", flag_values=FLAGS
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write results as JSON.", flag_values=FLAGS)


def _floats(text: str, name: str) -> list[float]:
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise UsageError(f"--{name}={text!r}: expected comma-separated numbers") from None


def crossbar_accuracy(
  program: Any,
  model: Any,
  images: Any,
  labels: Any,
  *,
  adc_bits: int,
  adc_frac: Any,
  noise: Any,
  chips: list[int],
  eval_batch: int,
) -> list[float]:
  """Test accuracy on each chip (one programming-noise key per chip)."""
  import jax

  from cimjax import compile as cc

  out = []
  for c in chips:
    key = None if noise is None else jax.random.key(10_000 + c)
    out.append(
      cc.evaluate_accuracy(
        program,
        images,
        labels,
        model=model,
        adc_bits=adc_bits,
        adc_frac=adc_frac,
        noise=noise,
        key=key,
        batch_size=eval_batch,
        read_seed=20_000 + c,
      )
    )
    if noise is None:  # deterministic: one chip is enough
      break
  return out


@dataclasses.dataclass(frozen=True)
class _Setup:
  """The flags' model, target, policy, trained variables and data."""

  model: Any
  kwargs: dict[str, Any]
  hw: Any
  bits: tuple[int, int]
  policy: Any
  variables: dict[str, Any]
  train: Any
  xte: Any
  yte: Any
  chips: list[int]
  adc_bits: list[int]
  variations: list[float]


def _setup(argv: list[str]) -> _Setup:
  from cimjax import data, models, trace
  from cimjax import hw as hw_lib
  from cimjax import policy as policy_lib
  from cimjax.variables import VariablesError, restore_variables

  cli_lib.no_positional(argv)
  if _VARIABLES.value is None:
    raise UsageError("--variables is required (a trained small-CNN stage directory)")
  adc_list = [int(b) for b in _floats(_ADC_BITS.value, "adc_bits")]
  variations = _floats(_VARIATIONS.value, "variations")
  try:
    hw = hw_lib.load_hw(_HW.value)
    kwargs = json.loads(_MODEL_KWARGS.value)
    model = models.get_model("small_cnn", **kwargs)
    w, a = (int(t) for t in _POLICY.value.split(","))
    num = len(trace.trace_specs(model))
    pol = policy_lib.validate_policy(policy_lib.uniform_policy(num, w, a), num)
    variables = restore_variables(_VARIABLES.value, model)
    splits = data.load_dataset("fashion_mnist", val_size=5000)
  except (
    hw_lib.HwError,
    VariablesError,
    policy_lib.PolicyError,
    data.DataError,
    ValueError,
    TypeError,
  ) as e:
    raise UsageError(f"{type(e).__name__}: {e}") from None
  test = splits["test"]
  n = len(test.labels) if _TEST_IMAGES.value < 0 else min(_TEST_IMAGES.value, len(test.labels))
  return _Setup(
    model=model,
    kwargs=kwargs,
    hw=hw,
    bits=(w, a),
    policy=pol,
    variables=variables,
    train=splits["train"],
    xte=test.images[:n],
    yte=test.labels[:n],
    chips=list(range(_CHIPS.value)),
    adc_bits=adc_list,
    variations=variations,
  )


def _compile_calibrated(s: _Setup, variables: dict[str, Any], tag: str) -> tuple[Any, Any]:
  """The program of ``variables`` (saved under ``--workdir``) and its ADC range fractions."""
  from cimjax import compile as cc

  prog = cc.compile_model(s.model, variables, s.policy, s.hw, model_kwargs=s.kwargs)
  if _WORKDIR.value:
    cc.save_program(prog, os.path.join(_WORKDIR.value, f"program_{tag}"))
  calib = s.train.images[: _CALIB_IMAGES.value]
  if _ADC_MODE.value != "calibrated":
    return prog, None
  return prog, cc.calibrate_adc(prog, calib, model=s.model)


def _row(s: _Setup, adc: int, var: float, base_prog: Any, base_frac: Any) -> dict[str, Any]:
  """Accuracies at one ADC resolution and variation: before and after noise-aware FT."""
  import numpy as np

  from cimjax import crossbar as xb
  from cimjax.noise import NoiseConfig
  from cimjax.train import finetune_noisy

  noise = NoiseConfig(variation=var) if var > 0 else None
  kw = dict(adc_bits=adc, noise=noise, eval_batch=_EVAL_BATCH.value)
  accs = crossbar_accuracy(
    base_prog, s.model, s.xte, s.yte, adc_frac=base_frac, chips=s.chips, **kw
  )
  row = {"adc_bits": adc, "variation": var, "acc": float(np.mean(accs)), "acc_chips": accs}
  if _FT_STEPS.value > 0:
    ft = finetune_noisy(
      s.model,
      s.variables,
      s.policy,
      xb.XbarConfig.from_hw(s.hw, adc_bits=adc),
      noise,
      base_frac,
      s.train.images,
      s.train.labels,
      steps=_FT_STEPS.value,
      lr=_FT_LR.value,
      batch=_FT_BATCH.value,
      seed=_SEED.value + 17 * adc,
    )
    prog, frac = _compile_calibrated(s, ft, f"ft_adc{adc}_var{var:g}")
    held_out = [c + 100 for c in s.chips]
    accs_ft = crossbar_accuracy(prog, s.model, s.xte, s.yte, adc_frac=frac, chips=held_out, **kw)
    row.update({"acc_ft": float(np.mean(accs_ft)), "acc_ft_chips": accs_ft})
  return row


def run(argv: list[str]) -> dict[str, Any]:
  """Measures every (ADC bits, variation) cell; returns the JSON-able results."""
  from cimjax import compile as cc

  s = _setup(argv)
  t0 = time.time()
  base_prog, base_frac = _compile_calibrated(s, s.variables, "base")
  rep = cc.verify(base_prog, s.xte[:4], model=s.model)
  eb = _EVAL_BATCH.value
  fq = cc.evaluate_accuracy(base_prog, s.xte, s.yte, simulate=False, model=s.model, batch_size=eb)
  ideal = cc.evaluate_accuracy(base_prog, s.xte, s.yte, model=s.model, adc_bits=None, batch_size=eb)
  logging.warning("fake-quant %.4f, crossbar ideal %.4f, verify ok=%s", fq, ideal, rep.ok)
  rows = []
  for adc in s.adc_bits:
    for var in s.variations:
      rows.append(_row(s, adc, var, base_prog, base_frac))
      logging.warning("adc %d variation %.3f: %s (%.0f s)", adc, var, rows[-1], time.time() - t0)
  return {
    "model": "small_cnn",
    "model_kwargs": s.kwargs,
    "hw": s.hw.name,
    "mapping": s.hw.mapping,
    "policy": list(s.bits),
    "adc_mode": _ADC_MODE.value,
    "test_images": int(len(s.yte)),
    "chips": len(s.chips),
    "ft_steps": _FT_STEPS.value,
    "ft_lr": _FT_LR.value,
    "ft_batch": _FT_BATCH.value,
    "fake_quant_acc": fq,
    "crossbar_ideal_acc": ideal,
    "verify_ok": rep.ok,
    "base_adc_frac": None if base_frac is None else [float(f) for f in base_frac],
    "rows": rows,
    "seconds": time.time() - t0,
  }


def format_table(res: dict[str, Any]) -> str:
  vars_ = sorted({r["variation"] for r in res["rows"]})
  adcs = sorted({r["adc_bits"] for r in res["rows"]}, reverse=True)
  by = {(r["adc_bits"], r["variation"]): r for r in res["rows"]}
  head = "| ADC bits | " + " | ".join(f"var {100 * v:g}%" for v in vars_) + " |"
  lines = [
    f"Fashion-MNIST test accuracy (%), small CNN {res['policy'][0]}/{res['policy'][1]} "
    f"on {res['hw']} ({res['mapping']}), ADC {res['adc_mode']}, "
    f"{res['test_images']} images, {res['chips']} chips; fake-quant "
    f"{100 * res['fake_quant_acc']:.2f}, crossbar ideal "
    f"{100 * res['crossbar_ideal_acc']:.2f}. Cells: before / after noise-aware FT.",
    head,
    "|" + "---|" * (len(vars_) + 1),
  ]
  for adc in adcs:
    cells = []
    for v in vars_:
      r = by[(adc, v)]
      c = f"{100 * r['acc']:.2f}"
      if "acc_ft" in r:
        c += f" / {100 * r['acc_ft']:.2f}"
      cells.append(c)
    lines.append(f"| {adc} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """absl entry point."""
  logging.set_verbosity(logging.WARNING)
  try:
    res = run(argv)
  except CimjaxError as e:
    cli_lib.fail(PROG, e)
  print(format_table(res))
  if _OUT.value:
    print(f"wrote {io.write_json(os.path.abspath(_OUT.value), res, indent=1)}")


def run_cli() -> None:
  """Entry point of ``python -m launch.bench_noise``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run_cli()
