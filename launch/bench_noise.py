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
2. fine-tunes the variables noise-aware (``--ft_steps`` Adam steps, forward pass = the noisy
   crossbar with a fresh chip every step, backward = the ideal integer matmul via the
   straight-through hook), recompiles, recalibrates and measures again on held-out chips.

Prints a table and writes JSON (``--out``). Exit status 2 with one line on bad input.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from absl import app, flags, logging

_VARIABLES = flags.DEFINE_string(
  "variables", None, "Trained variables (stage dir or variables/ dir)."
)
_MODEL_KWARGS = flags.DEFINE_string(
  "model_kwargs",
  '{"channels": [16, 32, 32], "hidden": 64}',
  "JSON options of the small CNN (as in the train config).",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where programs are written (optional).")
_HW = flags.DEFINE_string("hw", "rram_256_c4", "Hardware target.")
_POLICY = flags.DEFINE_string("policy", "4,4", "Uniform W,A bits.")
_ADC_BITS = flags.DEFINE_string("adc_bits", "8,6,4", "Comma-separated ADC resolutions.")
_VARIATIONS = flags.DEFINE_string(
  "variations", "0,0.02,0.05,0.1", "Comma-separated relative conductance std."
)
_ADC_MODE = flags.DEFINE_enum(
  "adc_mode", "calibrated", ["calibrated", "max"], "ADC range: calibrated per layer or full scale."
)
_CHIPS = flags.DEFINE_integer("chips", 2, "Chips (programming-noise keys) per evaluation.")
_FT_STEPS = flags.DEFINE_integer("ft_steps", 300, "Noise-aware fine-tuning steps (0: skip).")
_FT_LR = flags.DEFINE_float("ft_lr", 1e-4, "Fine-tuning learning rate (Adam).")
_FT_BATCH = flags.DEFINE_integer("ft_batch", 64, "Fine-tuning batch size.")
_TEST_IMAGES = flags.DEFINE_integer("test_images", 10000, "Test images (-1: all).")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 500, "Evaluation batch size.")
_CALIB_IMAGES = flags.DEFINE_integer("calib_images", 256, "Training images for ADC calibration.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUT = flags.DEFINE_string("out", None, "Write results as JSON.")


def _floats(text: str, name: str) -> list[float]:
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise app.UsageError(f"--{name}={text!r}: expected comma-separated numbers") from None


def finetune_noise_aware(
  model: Any,
  variables: dict[str, Any],
  policy: Any,
  cfg: Any,
  noise: Any,
  adc_frac: Any,
  images: Any,
  labels: Any,
  *,
  steps: int,
  lr: float,
  batch: int,
  seed: int,
) -> dict[str, Any]:
  """Fine-tunes ``variables`` with the crossbar (ADC + noise) in the forward pass.

  Each step draws a fresh chip (programming-noise key) and read key, so the model learns the
  noise distribution rather than one chip. Gradients are those of the ideal integer products
  (straight-through), so the update is well defined although the forward pass is not
  differentiable.

  Args:
    model: the ModelDef (no batch norm, or batch norm in inference mode).
    variables: starting variables.
    policy: int ``[L, 2]``.
    cfg: :class:`cimjax.crossbar.XbarConfig` (its ``adc_bits`` is used).
    noise: :class:`cimjax.noise.NoiseConfig` or None.
    adc_frac: ``[L]`` ADC range fractions or None.
    images, labels: training data (NumPy).
    steps, lr, batch, seed: optimisation settings.

  Returns:
    The fine-tuned variables.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from cimjax import crossbar as xb
  from cimjax import models

  pol = np.asarray(policy)
  tx = optax.adam(lr)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  with jax.numpy_dtype_promotion("standard"):
    opt_state = tx.init(params)
  frac = None if adc_frac is None else jnp.asarray(adc_frac, jnp.float32)

  @jax.jit
  def step(params, opt_state, x, y, key):
    hook = xb.make_mvm_hook(
      cfg, policy=pol, noise=noise, key=key, read_key=jax.random.fold_in(key, 1), adc_frac=frac
    )

    def loss_fn(p):
      logits, _ = models.forward(model.module, {"params": p, **rest}, x, jnp.asarray(pol), mvm=hook)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for s in range(steps):
    idx = rng.integers(0, len(labels), batch)
    params, opt_state, loss = step(
      params,
      opt_state,
      jnp.asarray(images[idx]),
      jnp.asarray(labels[idx]),
      jax.random.fold_in(key, s),
    )
    if s % 100 == 0:
      logging.info("finetune step %d loss %.4f", s, float(loss))
  return {"params": params, **rest}


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


def run(argv: list[str]) -> dict[str, Any]:
  import numpy as np

  from cimjax import compile as cc
  from cimjax import crossbar as xb
  from cimjax import data, models, trace
  from cimjax import hw as hw_lib
  from cimjax import policy as policy_lib
  from cimjax.noise import NoiseConfig

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _VARIABLES.value is None:
    raise app.UsageError("--variables is required (a trained small-CNN stage directory)")
  adc_list = [int(b) for b in _floats(_ADC_BITS.value, "adc_bits")]
  variations = _floats(_VARIATIONS.value, "variations")
  try:
    hw = hw_lib.load_hw(_HW.value)
    kwargs = json.loads(_MODEL_KWARGS.value)
    model = models.get_model("small_cnn", **kwargs)
    w, a = (int(t) for t in _POLICY.value.split(","))
    num = len(trace.trace_specs(model))
    pol = policy_lib.validate_policy(policy_lib.uniform_policy(num, w, a), num)
    variables = cc.restore_variables(_VARIABLES.value, model)
    splits = data.load_dataset("fashion_mnist", val_size=5000)
  except (
    hw_lib.HwError,
    cc.ProgramError,
    policy_lib.PolicyError,
    data.DataError,
    ValueError,
    TypeError,
  ) as e:
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
  test = splits["test"]
  n = len(test.labels) if _TEST_IMAGES.value < 0 else min(_TEST_IMAGES.value, len(test.labels))
  xte, yte = test.images[:n], test.labels[:n]
  train = splits["train"]
  calib = train.images[: _CALIB_IMAGES.value]
  chips = list(range(_CHIPS.value))
  t0 = time.time()

  def compile_calibrated(v, tag):
    prog = cc.compile_model(model, v, pol, hw, model_kwargs=kwargs)
    if _WORKDIR.value:
      cc.save_program(prog, os.path.join(_WORKDIR.value, f"program_{tag}"))
    frac = cc.calibrate_adc(prog, calib, model=model) if _ADC_MODE.value == "calibrated" else None
    return prog, frac

  base_prog, base_frac = compile_calibrated(variables, "base")
  rep = cc.verify(base_prog, xte[:4], model=model)
  fq = cc.evaluate_accuracy(
    base_prog, xte, yte, simulate=False, model=model, batch_size=_EVAL_BATCH.value
  )
  ideal = cc.evaluate_accuracy(
    base_prog, xte, yte, model=model, adc_bits=None, batch_size=_EVAL_BATCH.value
  )
  logging.warning("fake-quant %.4f, crossbar ideal %.4f, verify ok=%s", fq, ideal, rep.ok)
  rows = []
  for adc in adc_list:
    for var in variations:
      noise = NoiseConfig(variation=var) if var > 0 else None
      accs = crossbar_accuracy(
        base_prog,
        model,
        xte,
        yte,
        adc_bits=adc,
        adc_frac=base_frac,
        noise=noise,
        chips=chips,
        eval_batch=_EVAL_BATCH.value,
      )
      row = {"adc_bits": adc, "variation": var, "acc": float(np.mean(accs)), "acc_chips": accs}
      if _FT_STEPS.value > 0:
        cfg = xb.XbarConfig.from_hw(hw, adc_bits=adc)
        ft = finetune_noise_aware(
          model,
          variables,
          pol,
          cfg,
          noise,
          base_frac,
          train.images,
          train.labels,
          steps=_FT_STEPS.value,
          lr=_FT_LR.value,
          batch=_FT_BATCH.value,
          seed=_SEED.value + 17 * adc,
        )
        prog, frac = compile_calibrated(ft, f"ft_adc{adc}_var{var:g}")
        accs_ft = crossbar_accuracy(
          prog,
          model,
          xte,
          yte,
          adc_bits=adc,
          adc_frac=frac,
          noise=noise,
          chips=[c + 100 for c in chips],
          eval_batch=_EVAL_BATCH.value,
        )
        row.update({"acc_ft": float(np.mean(accs_ft)), "acc_ft_chips": accs_ft})
      rows.append(row)
      logging.warning("adc %d variation %.3f: %s (%.0f s)", adc, var, row, time.time() - t0)
  return {
    "model": "small_cnn",
    "model_kwargs": kwargs,
    "hw": hw.name,
    "mapping": hw.mapping,
    "policy": [w, a],
    "adc_mode": _ADC_MODE.value,
    "test_images": int(n),
    "chips": len(chips),
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
  logging.set_verbosity(logging.WARNING)
  try:
    res = run(argv)
  except app.UsageError as e:
    print(f"bench_noise: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_table(res))
  if _OUT.value:
    path = os.path.abspath(_OUT.value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench_noise.", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
      json.dump(res, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
