"""Latency and energy of a model on a CIM hardware target, per layer.

Usage (the ``cimjax-cost`` console script; ``python -m launch.cost`` from the repository
root is the same)::

  cimjax-cost --model=vgg16 --hw=rram_256_c4               # uniform 8/8
  cimjax-cost --model=small_cnn --hw=rram_64_c2 --uniform=4,4
  cimjax-cost --model=resnet18 --hw=hw/rram_256_c2.toml --policy=best.npy --json

Prints a per-layer table (name, type, m, n, invocations, repeat, w/a bits, tiles, latency in
microseconds, energy in picojoules) with totals and the speedup over uniform 8/8, or with
``--json`` exactly one JSON object::

  {"model", "hw", "layers": [{"name", "type", "m", "n", "invocations", "repeat", "w_bits",
   "a_bits", "tiles", "latency_us", "energy_pj"}, ...], "total_latency_us",
   "baseline_latency_us", "speedup", "total_energy_pj"}

Errors in the inputs (unknown model or target, missing file, a policy that does not fit the
model; any :class:`cimjax.errors.CimjaxError`) print one line ``cimjax-cost: error: ...`` on
stderr and exit with status 2.
"""

from __future__ import annotations

import json
from typing import Any

from absl import flags

from cimjax import cli as cli_lib
from cimjax import cost, trace
from cimjax import hw as hw_lib
from cimjax import policy as policy_lib
from cimjax import progress as progress_lib
from cimjax.cli import CimjaxError, UsageError, parse_uniform
from cimjax.train import config as train_config

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
_MODEL = flags.DEFINE_string(
  "model",
  "small_cnn",
  "Model: a zoo or registered name, package.module:factory, path/file.py:factory or a .onnx "
  "file (docs/own_models.md).",
  flag_values=FLAGS,
)
_HW = flags.DEFINE_string(
  "hw",
  "rram_128_c2",
  "Hardware target: a name from hw/ (or $CIMJAX_HW_DIR) or a .toml path.",
  flag_values=FLAGS,
)
_POLICY = flags.DEFINE_string(
  "policy",
  None,
  "Policy .npy file (int [L, 2] of weight/activation bits, CIM-AQ format).",
  flag_values=FLAGS,
)
_UNIFORM = flags.DEFINE_list(
  "uniform",
  "8,8",
  "Uniform policy W,A for every layer (used when --policy is not given).",
  flag_values=FLAGS,
)
_JSON = flags.DEFINE_bool(
  "json", False, "Print one JSON object instead of a table.", flag_values=FLAGS
)

PROG = "cimjax-cost"
MAX_BITS = 8
JSON_KEYS = (
  "model",
  "hw",
  "layers",
  "total_latency_us",
  "baseline_latency_us",
  "speedup",
  "total_energy_pj",
)
LAYER_KEYS = (
  "name",
  "type",
  "m",
  "n",
  "invocations",
  "repeat",
  "w_bits",
  "a_bits",
  "tiles",
  "latency_us",
  "energy_pj",
)


def build_report(
  model: str, hw: str, policy_path: str | None = None, uniform: tuple[int, int] | None = (8, 8)
) -> dict[str, Any]:
  """Traces ``model``, loads ``hw`` and the policy, and returns the JSON report.

  Args:
    model: a model reference (:func:`cimjax.models.resolve_model`).
    hw: target name or path.
    policy_path: ``.npy`` policy, or None to use ``uniform``.
    uniform: (w, a) bits for every layer when ``policy_path`` is None.

  Returns:
    The report dict with the keys of :data:`JSON_KEYS`, layers with :data:`LAYER_KEYS`.

  Raises:
    UsageError: any problem with the inputs; the message names the flag.
  """
  try:
    target = hw_lib.load_hw(hw)
  except hw_lib.HwError as e:
    raise UsageError(f"--hw: {e}") from None
  try:
    model_def = train_config.resolve_model(model)
  except CimjaxError as e:
    raise UsageError(f"--model: {e}") from None
  specs = trace.trace_specs(model_def.module, model_def.input_shape)
  names = [s.name for s in specs]
  if policy_path is not None:
    flag = "--policy"
    try:
      pol = policy_lib.load_policy(
        policy_path, len(specs), min_bits=1, max_bits=MAX_BITS, layer_names=names
      )
    except policy_lib.PolicyError as e:
      raise UsageError(f"--policy: {e}") from None
  else:
    flag = "--uniform"
    w, a = uniform if uniform is not None else (8, 8)
    pol = policy_lib.uniform_policy(len(specs), w, a)
  try:
    rep = cost.layer_report(specs, target, pol, max_bits=MAX_BITS)
  except policy_lib.PolicyError as e:
    raise UsageError(f"{flag}: {e}") from None
  out = {"model": model, "hw": target.name}
  out["layers"] = [{k: r[k] for k in LAYER_KEYS} for r in rep["layers"]]
  for k in JSON_KEYS[3:]:
    out[k] = rep[k]
  return out


def format_table(report: dict[str, Any]) -> str:
  """Formats a report as an aligned plain-text table with totals."""
  head = ("#", "name", "type", "m", "n", "inv", "rep", "w", "a", "tiles", "latency_us", "energy_pJ")
  rows = []
  for i, r in enumerate(report["layers"]):
    rows.append(
      (
        str(i),
        r["name"],
        r["type"],
        str(r["m"]),
        str(r["n"]),
        str(r["invocations"]),
        str(r["repeat"]),
        str(r["w_bits"]),
        str(r["a_bits"]),
        str(r["tiles"]),
        f"{r['latency_us']:.1f}",
        f"{r['energy_pj']:.4g}",
      )
    )
  widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(head)]
  left = {1, 2}

  def fmt(cells):
    return "  ".join(
      c.ljust(wd) if j in left else c.rjust(wd) for j, (c, wd) in enumerate(zip(cells, widths))
    ).rstrip()

  lines = [
    f"model {report['model']} on {report['hw']}: {len(rows)} layers",
    fmt(head),
    "  ".join("-" * wd for wd in widths),
  ]
  lines += [fmt(row) for row in rows]
  total, base = report["total_latency_us"], report["baseline_latency_us"]
  lines += [
    "",
    f"total latency   {total:,.1f} us ({total / 1e3:,.3f} ms)",
    f"uniform 8/8     {base:,.1f} us ({base / 1e3:,.3f} ms)",
    f"speedup         {report['speedup']:.4f}x over uniform 8/8",
    f"total energy    {report['total_energy_pj']:,.1f} pJ "
    f"({report['total_energy_pj'] / 1e6:,.3f} uJ)",
  ]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """absl main: prints the report of the flags' model, target and policy.

  Returns:
    The exit status (:func:`cimjax.cli.run_main`): 0, 2 after one line on stderr, 1 on a bug.
  """

  def body() -> None:
    cli_lib.no_positional(argv)
    if _POLICY.value is not None and _UNIFORM.present:
      raise UsageError("--policy and --uniform are mutually exclusive; give one of them")
    uniform = None if _POLICY.value is not None else parse_uniform(_UNIFORM.value)
    report = build_report(_MODEL.value, _HW.value, _POLICY.value, uniform)
    if _JSON.value:
      print(json.dumps(report))
    else:
      print(format_table(report))

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Console-script entry point (``cimjax-cost``)."""
  cli_lib.run_console(progress_lib.quiet_main(main), flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
