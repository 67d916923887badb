"""ONNX in and out (docs/onnx.md): import a model, read and write QCDQ bit-widths.

- :func:`import_model` turns an ONNX file into a :class:`cimjax.models.ModelDef` whose module
  interprets the graph in JAX, with Conv/Gemm/MatMul as cimjax's quantized layers;
  :func:`import_variables` gives its variables (the file's initializers).
- :func:`import_qcdq` also reads a QCDQ/QDQ file's bit-widths as a cimjax policy ``[L, 2]``.
- :func:`export_qcdq` writes any cimjax model (zoo or imported) with a policy and its variables
  as a QCDQ ONNX file that onnxruntime runs.

Needs the optional packages ``onnx``, ``onnx-ir`` (and ``onnxruntime`` to run files):
``pip install 'cimjax[onnx]'``. Nothing here is imported by ``import cimjax``.
"""

from __future__ import annotations

from cimjax.errors import OnnxError
from cimjax.onnx.export import export_qcdq
from cimjax.onnx.importer import (
  SUPPORTED_OPS,
  QcdqImport,
  build_graph,
  graph_of,
  import_model,
  import_qcdq,
  import_variables,
  qcdq_policy,
)
from cimjax.onnx.module import OnnxModule

__all__ = [
  "OnnxError",
  "OnnxModule",
  "QcdqImport",
  "SUPPORTED_OPS",
  "build_graph",
  "export_qcdq",
  "graph_of",
  "import_model",
  "import_qcdq",
  "import_variables",
  "qcdq_policy",
]
