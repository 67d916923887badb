"""cimjax: mixed-precision training, bit-width search and crossbar compilation for RRAM CIM.

The public API, by concept (each lives in its own module):

- quantizer and layers: :mod:`cimjax.quant`, :class:`QuantDense`, :class:`QuantConv`,
  :class:`QuantMatMul`, :class:`QuantContext`;
- models and geometry: :func:`resolve_model` (zoo names, registered names, import paths,
  files), :func:`register_model`, :func:`quantize_model` (plain Flax models), :func:`init`,
  :func:`forward`, :func:`trace_specs` (docs/own_models.md);
- hardware and cost: :func:`load_hw`, :class:`HardwareTarget`, :func:`cost_tables`,
  :func:`policy_cost`, :func:`expected_cost`, :func:`layer_report`;
- policies: :func:`validate_policy`, :func:`action_mask`, :func:`random_policies`,
  :func:`load_policy`, :func:`save_policy`;
- data, training, evaluation: :mod:`cimjax.data`, :mod:`cimjax.train`, :func:`make_evaluator`;
- search: :mod:`cimjax.search` (:func:`cimjax.search.run_search`);
- compiler and simulator: :mod:`cimjax.crossbar`, :mod:`cimjax.compile`;
- the whole flow: :mod:`cimjax.pipeline`;
- the XLA process environment (CPU convolution kernels): :mod:`cimjax.xla_env`.
"""

from typing import Any

from cimjax import cost, hw, policy, quant, xla_env
from cimjax.cost import (
  CostTables,
  cost_ratio,
  cost_tables,
  cost_tables_from_arrays,
  expected_cost,
  expected_cost_factored,
  layer_report,
  per_layer_cost,
  policy_cost,
  speedup,
)
from cimjax.evaluate import EvalResult, evaluate_policy, make_evaluator
from cimjax.hw import HardwareTarget, HwError, list_hw, load_hw
from cimjax.layers import PolicyLengthError, QuantContext, QuantConv, QuantDense, QuantMatMul
from cimjax.models import (
  ModelDef,
  Rule,
  forward,
  get_model,
  init,
  model_names,
  quantize_model,
  register_model,
  resolve_model,
)
from cimjax.policy import (
  CONSTRAINTS,
  PolicyError,
  action_mask,
  load_policy,
  random_policies,
  save_policy,
  uniform_policy,
  validate_policy,
)
from cimjax.spec import LayerSpec
from cimjax.trace import trace_specs

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  if name == "MODEL_NAMES":  # the current names (zoo + registered), not an import-time copy
    return model_names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
  "CONSTRAINTS",
  "CostTables",
  "EvalResult",
  "HardwareTarget",
  "HwError",
  "LayerSpec",
  "MODEL_NAMES",
  "ModelDef",
  "PolicyError",
  "PolicyLengthError",
  "QuantContext",
  "QuantConv",
  "QuantDense",
  "QuantMatMul",
  "Rule",
  "action_mask",
  "cost",
  "cost_ratio",
  "cost_tables",
  "cost_tables_from_arrays",
  "evaluate_policy",
  "expected_cost",
  "expected_cost_factored",
  "forward",
  "get_model",
  "hw",
  "init",
  "layer_report",
  "list_hw",
  "load_hw",
  "load_policy",
  "make_evaluator",
  "model_names",
  "per_layer_cost",
  "policy",
  "policy_cost",
  "quant",
  "quantize_model",
  "random_policies",
  "register_model",
  "resolve_model",
  "save_policy",
  "speedup",
  "trace_specs",
  "uniform_policy",
  "validate_policy",
  "xla_env",
]
