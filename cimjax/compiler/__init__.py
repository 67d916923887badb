"""The compiler onto CIM crossbars: lowering, schedule, program format, executor, verification.

See docs/architecture.md. ``compile_model(model, variables, policy, hw)`` lowers a zoo model
with a bit policy onto a hardware target and returns a :class:`CimProgram`; the modules, in the
order of the flow:

- :mod:`~cimjax.compiler.plan`: :class:`LayerPlan`, how one layer is laid out (bits, weight
  slices, input cycles, physical rows/columns, tile grid), from its geometry alone;
- :mod:`~cimjax.compiler.schedule`: the ordered :class:`Schedule` of ``PROGRAM``/``EXECUTE``/
  ``SHIFT_ADD``/``DIGITAL`` operations and its walked latency/energy (:class:`ScheduleCost`);
- :mod:`~cimjax.compiler.lower`: :func:`compile_model`, the integer weights, cell levels of
  every tile and dequantisation scales of every layer;
- :mod:`~cimjax.compiler.program`: :class:`CimProgram` and its file format
  (:func:`save_program`, :func:`load_program`, with SHA-256 integrity checks);
- :mod:`~cimjax.compiler.executor`: the executor (:func:`program_hook`, :func:`make_executor`,
  :func:`execute`) running the *stored tiles* through the simulator (:mod:`cimjax.crossbar`);
- :mod:`~cimjax.compiler.verification`: :func:`verify` (every layer's integer accumulator and the
  logits against the fake-quantised model), :func:`calibrate_adc`, :func:`evaluate_accuracy`,
  :func:`check_cost` and :func:`compile_and_verify`.

A model's variables are initialised and restored by :mod:`cimjax.variables`
(:func:`init_variables`, :func:`restore_variables`, re-exported here).
"""

from cimjax.compiler.executor import execute, make_executor, program_hook, stored_levels
from cimjax.compiler.lower import compile_model
from cimjax.compiler.plan import LayerPlan, layer_layout, plan_layer, plan_layers
from cimjax.compiler.program import (
  ARRAYS,
  FORMAT,
  FORMAT_VERSION,
  MANIFEST,
  CimProgram,
  array_sha256,
  file_sha256,
  load_program,
  program_model,
  save_program,
)
from cimjax.compiler.schedule import (
  OP_DIGITAL,
  OP_EXECUTE,
  OP_NAMES,
  OP_PROGRAM,
  OP_SHIFT_ADD,
  Schedule,
  ScheduleCost,
  build_schedule,
  compile_geometry,
  schedule_params,
  walk_schedule,
)
from cimjax.compiler.verification import (
  CompileResult,
  LayerCheck,
  VerifyReport,
  calibrate_adc,
  check_cost,
  compile_and_verify,
  evaluate_accuracy,
  verify,
)
from cimjax.errors import ProgramError
from cimjax.variables import init_variables, restore_variables

__all__ = [
  "ARRAYS",
  "CimProgram",
  "CompileResult",
  "FORMAT",
  "FORMAT_VERSION",
  "LayerCheck",
  "LayerPlan",
  "MANIFEST",
  "OP_DIGITAL",
  "OP_EXECUTE",
  "OP_NAMES",
  "OP_PROGRAM",
  "OP_SHIFT_ADD",
  "ProgramError",
  "Schedule",
  "ScheduleCost",
  "VerifyReport",
  "array_sha256",
  "build_schedule",
  "calibrate_adc",
  "check_cost",
  "compile_and_verify",
  "compile_geometry",
  "compile_model",
  "evaluate_accuracy",
  "execute",
  "file_sha256",
  "init_variables",
  "layer_layout",
  "load_program",
  "make_executor",
  "plan_layer",
  "plan_layers",
  "program_hook",
  "program_model",
  "restore_variables",
  "save_program",
  "schedule_params",
  "stored_levels",
  "verify",
  "walk_schedule",
]
