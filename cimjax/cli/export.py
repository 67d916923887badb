"""Export a model with its bit policy as a QCDQ ONNX file (onnxruntime runs it; docs/onnx.md).

Usage (the ``cimjax-export`` console script)::

  cimjax-export --workdir=RUN --out=model_qcdq.onnx       # a run's fine-tuned model + chosen policy
  cimjax-export --model=resnet20 --variables=RUN/finetune/chosen/variables \\
      --policy=RUN/search/chosen_policy.npy --out=resnet20_qcdq.onnx
  cimjax-export --model=my_model.onnx --uniform=4,4 --out=my_model_w4a4.onnx
  cimjax-export --workdir=RUN --float --out=model_fp32.onnx  # the float model, no Q/DQ

``--workdir`` reads the run's ``config.json`` (its model), the fine-tuned variables
(``RUN/finetune/chosen/variables``) and the policy the search chose (``RUN/search``); the other
form takes a model reference (a zoo name, ``pkg.module:factory`` or an ``.onnx`` file), its
variables (a ``variables/`` directory; default: the model's initial ones, e.g. an imported
file's initializers) and a policy ``.npy`` (or ``--uniform``). The file takes NCHW images with a
symbolic batch axis and returns the logits; its weights are int8 codes, its activations go
through QuantizeLinear -> Clip -> DequantizeLinear with cimjax's steps.

Bad input (a missing workdir or file, a policy that does not fit, an op without an ONNX
translation; any :class:`cimjax.errors.CimjaxError`) prints one line
``cimjax-export: error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import flags

from cimjax import cli as cli_lib
from cimjax.cli import CimjaxError, UsageError, parse_uniform

PROG = "cimjax-export"

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "A run's workdir: its model, fine-tuned variables and chosen policy.",
  flag_values=FLAGS,
)
_MODEL = flags.DEFINE_string(
  "model",
  None,
  "Model reference (zoo name, pkg.module:factory, path/file.py:factory or .onnx file).",
  flag_values=FLAGS,
)
_MODEL_KWARGS = flags.DEFINE_string(
  "model_kwargs",
  "{}",
  "JSON options of the model, e.g. '{\"num_classes\": 10}'.",
  flag_values=FLAGS,
)
_VARIABLES = flags.DEFINE_string(
  "variables",
  None,
  "Saved variables directory (a stage's variables/); default the model's initial ones.",
  flag_values=FLAGS,
)
_POLICY = flags.DEFINE_string(
  "policy", None, "Policy .npy file (int [L, 2], CIM-AQ format).", flag_values=FLAGS
)
_UNIFORM = flags.DEFINE_list(
  "uniform", None, "Uniform policy W,A when --policy is absent.", flag_values=FLAGS
)
_OUT = flags.DEFINE_string("out", "model_qcdq.onnx", "The ONNX file to write.", flag_values=FLAGS)
_FLOAT = flags.DEFINE_bool(
  "float", False, "Write the float model (no QuantizeLinear/DequantizeLinear).", flag_values=FLAGS
)
_INTEGER = flags.DEFINE_bool(
  "integer",
  False,
  "Integer products (ConvInteger/MatMulInteger, int32 sums, then cimjax's scales) instead of "
  "QCDQ; such a file does not import back with its policy.",
  flag_values=FLAGS,
)
_STATIC_BATCH = flags.DEFINE_bool(
  "static_batch", False, "A fixed batch of 1 instead of a symbolic batch axis.", flag_values=FLAGS
)


def _build(reference: str, kwargs_json: str) -> Any:
  from cimjax import models

  try:
    kwargs = json.loads(kwargs_json)
  except json.JSONDecodeError as e:
    raise UsageError(f"--model_kwargs: not JSON: {e}") from None
  if not isinstance(kwargs, dict):
    raise UsageError("--model_kwargs: expected a JSON object")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  resolve = getattr(models, "resolve_model", None)
  try:
    return resolve(reference, **kwargs) if resolve else models.get_model(reference, **kwargs)
  except CimjaxError as e:
    raise UsageError(f"--model: {cli_lib.one_line(e)}") from None
  except (TypeError, ValueError, KeyError) as e:
    raise UsageError(f"--model: {cli_lib.one_line(e)}") from None


def _from_workdir(workdir: str) -> tuple[Any, Any, Any]:
  """``(model, variables, policy)`` of a finished run."""
  import ml_collections

  from cimjax import pipeline

  wd = Path(workdir)
  cfg_path = wd / "config.json"
  if not cfg_path.is_file():
    raise UsageError(f"--workdir: no run in {str(wd)!r} (config.json not found)")
  try:
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
  except (OSError, ValueError) as e:
    raise UsageError(f"--workdir: cannot read {cfg_path}: {e}") from None
  p = pipeline.Pipeline(config, wd, log=lambda _: None)
  policy = p.chosen_policy()
  variables = p.variables("finetune", "export")
  return p.model, variables, policy


def _from_flags() -> tuple[Any, Any, Any]:
  import numpy as np

  from cimjax import models, trace
  from cimjax import policy as policy_lib
  from cimjax import variables as variables_lib

  if _MODEL.value is None:
    raise UsageError("give --workdir, or --model with --policy (or --uniform)")
  model = _build(_MODEL.value, _MODEL_KWARGS.value)
  specs = trace.trace_specs(model)
  if _FLOAT.value:
    policy = None
  elif _POLICY.value is not None:
    try:
      policy = policy_lib.load_policy(
        _POLICY.value, len(specs), min_bits=2, max_bits=8, layer_names=[s.name for s in specs]
      )
    except policy_lib.PolicyError as e:
      raise UsageError(f"--policy: {e}") from None
  elif _UNIFORM.value is not None:
    w, a = parse_uniform(_UNIFORM.value)
    policy = policy_lib.uniform_policy(len(specs), w, a)
  else:
    raise UsageError("--policy or --uniform is required (or --float)")
  if _VARIABLES.value is None:
    from cimjax import onnx as onnx_lib

    if isinstance(model.module, onnx_lib.OnnxModule):
      variables = onnx_lib.import_variables(model)  # the file's initializers
    else:
      import jax

      variables = jax.jit(lambda k: models.init(model, k))(jax.random.key(0))
  else:
    try:
      variables = variables_lib.restore_variables(_VARIABLES.value, model)
    except CimjaxError as e:
      raise UsageError(f"--variables: {cli_lib.one_line(e)}") from None
  return model, variables, None if policy is None else np.asarray(policy)


def export(argv: list[str]) -> Path:
  """Exports what the flags name; returns the written path."""
  cli_lib.no_positional(argv)
  if _WORKDIR.value is not None and (_MODEL.value or _VARIABLES.value):
    raise UsageError("--workdir takes the run's model and variables; drop --model/--variables")
  if _POLICY.value is not None and _UNIFORM.value is not None:
    raise UsageError("--policy and --uniform are mutually exclusive; give one of them")
  try:
    from cimjax import onnx as onnx_lib
  except ImportError as e:
    raise UsageError(
      f"ONNX export needs the onnx extra: pip install 'cimjax[onnx]' ({e})"
    ) from None
  if _WORKDIR.value is not None:
    model, variables, policy = _from_workdir(_WORKDIR.value)
  else:
    model, variables, policy = _from_flags()
  out = Path(_OUT.value)
  onnx_lib.export_qcdq(
    model,
    variables,
    policy,
    out,
    dynamic_batch=not _STATIC_BATCH.value,
    float_model=_FLOAT.value,
    integer=_INTEGER.value,
  )
  return out


def main(argv: list[str]) -> int:
  """absl main: writes the file and prints its path and policy; returns the exit status
  (:func:`cimjax.cli.run_main`: 2 after one line on stderr for bad input, 1 on a bug)."""

  def body() -> None:
    print(f"wrote {export(argv)}")

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Console-script entry point (``cimjax-export``)."""
  cli_lib.run_console(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
