"""cimjax: mixed-precision training, bit-width search and crossbar compilation for RRAM CIM."""

from cimjax import quant
from cimjax.layers import QuantContext, QuantConv, QuantDense, QuantMatMul, PolicyLengthError
from cimjax.models import MODEL_NAMES, ModelDef, forward, get_model, init
from cimjax.spec import LayerSpec
from cimjax.trace import trace_specs

__version__ = "0.1.0"
