"""Plain Flax models as CIM models, unchanged: quantization by Flax method interception.

:func:`quantize_model` wraps a Flax linen module written with plain ``nn.Dense``, ``nn.Conv``,
``nn.DenseGeneral``, ``nn.Einsum``, ``nn.MultiHeadDotProductAttention`` and
``nn.dot_product_attention`` (no cimjax layers, no ``ctx`` argument) into a module with the
cimjax calling convention ``__call__(x, ctx)``. While it runs, ``flax.linen.intercept_methods``
replaces each of those layers' computation by the integer-operand computation of
:class:`~cimjax.layers.QuantDense` / :class:`~cimjax.layers.QuantConv` /
:class:`~cimjax.layers.QuantMatMul` (the same functions of :mod:`cimjax.layers`), reading the
layer's own ``kernel`` and ``bias``; each layer claims the next policy row in call order and
records its :class:`~cimjax.spec.LayerSpec`, exactly as the zoo's layers do.

Variables keep their plain Flax names (the wrapper shares its scope with the model); each
quantized layer gains its clip tables ``w_clip [B, C]`` and ``a_clip [B]`` next to its
``kernel``, and each attention product a child ``qk`` / ``av`` holding its own (the names of the
zoo ViT). Attention contributes, in call order, its projections, ``Q.K^T`` and ``A.V``
(docs/architecture.md, section 3); ``nn.MultiHeadDotProductAttention`` has three projections
(``query``, ``key``, ``value``) and ``out``, a fused ``nn.Dense(3 * d)`` one.

Activation signedness follows the zoo's convention (the first layer's input and inputs after
non-ReLU layers are signed, inputs after ReLU, pooling of ReLU outputs or softmax unsigned) and
is derived once by :func:`quantize_model` from a jaxpr of the model: each layer input is marked
and a small sign analysis walks the ops that produce it. :class:`Rule` (regular expressions on
module paths) skips layers, fixes their bits or overrides their signedness.

Limits: 2-D convolutions only (no dilation, no mask, no circular/reflect/causal padding), no
``DenseGeneral`` batch dims, ``Einsum`` without ellipsis or kernel batch indices; an
unsupported layer raises :class:`~cimjax.errors.ModelError` naming it (skip it with a rule).
``nn.dot_product_attention`` is intercepted when called through the ``flax.linen`` (or
``flax.linen.attention``) module attribute, as ``nn.dot_product_attention(...)``; a name bound
by ``from flax.linen import dot_product_attention`` before the call runs in float, and so does a
custom ``attention_fn`` that does not call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.linen.attention as flax_attention
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax.extend import core as jex_core
from jax.interpreters import batching

from cimjax import layers as layers_lib
from cimjax.errors import ModelError
from cimjax.layers import DEFAULT_MAX_BITS, QuantContext, QuantMatMul
from cimjax.models.base import ModelDef

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """What to do with the quantizable layers whose module path matches ``pattern``.

  The first rule whose pattern matches a layer's path (``re.fullmatch``, e.g. ``"conv1"``,
  ``"block1/attn/.*"``, ``".*/qk"``) applies to it; layers no rule matches are quantized with
  the policy. Paths are the module paths of the ``Dense``/``Conv``/``DenseGeneral``/``Einsum``
  layers, and ``<attention module path>/qk`` and ``.../av`` for the attention products.

  Attributes:
    pattern: regular expression on the layer path (``/``-separated).
    skip: the layer stays float: off the crossbar, no policy row, no geometry, no clip tables.
    bits: ``(w_bits, a_bits)``: the layer runs quantized at these fixed bits in the digital
      periphery: no policy row, so it is not searched, costed or compiled onto the crossbar
      (the search, the cost model and the compiler see only the policy's layers).
    signed_input: force the activation operand signed (True) or unsigned (False) instead of
      the derived signedness.
  """

  pattern: str
  skip: bool = False
  bits: tuple[int, int] | None = None
  signed_input: bool | None = None

  def matches(self, path: str) -> bool:
    """Whether the rule applies to the layer at ``path``."""
    return re.fullmatch(self.pattern, path) is not None


def _rule(r: Rule | Mapping[str, Any], max_bits: int) -> Rule:
  """A validated :class:`Rule` from a Rule or a mapping of its fields."""
  if isinstance(r, Mapping):
    unknown = set(r) - {f.name for f in dataclasses.fields(Rule)}
    if unknown:
      raise ModelError(
        f"rule {dict(r)!r}: unknown fields {sorted(unknown)}; allowed: pattern, skip, bits, "
        "signed_input"
      )
    if "pattern" not in r:
      raise ModelError(f"rule {dict(r)!r}: missing 'pattern'")
    kw = dict(r)
    if kw.get("bits") is not None:
      kw["bits"] = tuple(kw["bits"])
    r = Rule(**kw)
  if not isinstance(r, Rule):
    raise ModelError(f"rule {r!r}: expected a cimjax.models.Rule or a dict of its fields")
  try:
    re.compile(r.pattern)
  except (re.error, TypeError) as e:
    raise ModelError(f"rule pattern {r.pattern!r}: not a regular expression ({e})") from None
  if r.bits is not None:
    ok = (
      len(r.bits) == 2
      and all(isinstance(b, int) and not isinstance(b, bool) for b in r.bits)
      and all(1 <= b <= max_bits for b in r.bits)
    )
    if not ok:
      raise ModelError(
        f"rule {r.pattern!r}: bits = {r.bits!r}; allowed: (w_bits, a_bits) in 1..{max_bits}"
      )
    r = dataclasses.replace(r, bits=(int(r.bits[0]), int(r.bits[1])))
  if r.skip and r.bits is not None:
    raise ModelError(f"rule {r.pattern!r}: skip and bits exclude each other")
  if not r.skip and r.bits is None and r.signed_input is None:
    raise ModelError(f"rule {r.pattern!r}: sets nothing (give skip, bits or signed_input)")
  return r


# --------------------------------------------------------------------------------------------
# Sign analysis: which layer inputs are non-negative (after ReLU, pooling of ReLU, softmax)
# --------------------------------------------------------------------------------------------

_mark_p = jex_core.Primitive("cimjax_layer_input")
_mark_p.def_impl(lambda x, *, key: x)
_mark_p.def_abstract_eval(lambda aval, *, key: aval)
batching.primitive_batchers[_mark_p] = lambda args, dims, *, key: (
  _mark_p.bind(args[0], key=key),
  dims[0],
)

# Output is non-negative whatever the operands.
_ALWAYS = frozenset({"exp", "exp2", "abs", "sqrt", "rsqrt", "logistic", "square", "iota"})
# Output is non-negative when operand 0 is (shape ops, reductions, pooling, casts).
_FIRST = frozenset(
  {
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "dynamic_slice",
    "gather",
    "rev",
    "copy",
    "copy_p",
    "convert_element_type",
    "reduce_max",
    "reduce_min",
    "reduce_sum",
    "reduce_prod",
    "reduce_precision",
    "reduce_window_max",
    "reduce_window_min",
    "reduce_window_sum",
    "cumsum",
    "cummax",
    "cummin",
    "cumprod",
    "stop_gradient",
    "sharding_constraint",
    "floor",
    "ceil",
    "round",
    "sign",
    "rem",
    "device_put",
  }
)
# Output is non-negative when every operand is.
_ALL = frozenset(
  {
    "add",
    "add_any",
    "mul",
    "div",
    "min",
    "concatenate",
    "pad",
    "dot_general",
    "conv_general_dilated",
    "dynamic_update_slice",
    "sort",
    "optimization_barrier",
    "split",
  }
)
# Call-like primitives whose single inner jaxpr takes the operands one to one.
_CALLS = frozenset(
  {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "checkpoint",
    "remat",
    "custom_lin",
  }
)


def _nonneg_const(value: Any) -> bool:
  try:
    return bool(np.all(np.asarray(value) >= 0))
  except (TypeError, ValueError):
    return False


def _inner_jaxprs(eqn: Any) -> list[Any]:
  """The sub-jaxprs in an equation's params (closed or open)."""
  out = []
  for v in eqn.params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(item, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
        out.append(item)
  return out


def _walk(jaxpr: Any, inputs: Sequence[bool], marks: dict[str, bool]) -> list[bool]:
  """Forward sign analysis of one jaxpr; records each mark's input status into ``marks``.

  Args:
    jaxpr: a ``ClosedJaxpr`` or an open ``Jaxpr``.
    inputs: per invar, whether it is known non-negative.
    marks: ``key -> non-negative`` of every marked layer input (the first sighting wins).

  Returns:
    Per outvar, whether it is known non-negative.
  """
  env: dict[Any, bool] = {}
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    consts = jaxpr.consts
    jaxpr = jaxpr.jaxpr
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = _nonneg_const(c)
  for v, s in zip(jaxpr.invars, inputs):
    env[v] = s

  def status(v: Any) -> bool:
    if isinstance(v, jex_core.Literal):
      return _nonneg_const(v.val)
    return env.get(v, False)

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [status(v) for v in eqn.invars]
    if eqn.primitive is _mark_p:
      marks.setdefault(eqn.params["key"], ins[0])
      outs = [ins[0]]
    elif name in _CALLS:
      inner = _inner_jaxprs(eqn)
      outs = [False] * len(eqn.outvars)
      if inner:
        sub = inner[0]
        n_in = len((sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub).invars)
        res = _walk(sub, ins if n_in == len(ins) else [False] * n_in, marks)
        if len(res) == len(outs):
          outs = res
    else:
      for sub in _inner_jaxprs(eqn):  # scan, while, cond: marks inside, conservative outputs
        n_in = len((sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub).invars)
        _walk(sub, [False] * n_in, marks)
      if name in _ALWAYS:
        s = True
      elif name in _FIRST:
        s = bool(ins) and ins[0]
      elif name in _ALL:
        s = bool(ins) and all(ins)
        if name == "mul" and len(eqn.invars) == 2 and eqn.invars[0] is eqn.invars[1]:
          s = True  # x * x
      elif name == "max":
        s = any(ins)
      elif name == "integer_pow":
        s = eqn.params.get("y", 1) % 2 == 0 or (bool(ins) and ins[0])
      elif name == "pow":
        s = bool(ins) and ins[0]
      elif name == "select_n":
        s = all(ins[1:])
      elif name == "clamp":
        s = ins[0] or ins[1]
      else:
        s = False
      outs = [s] * len(eqn.outvars)
    for v, s in zip(eqn.outvars, outs):
      dt = v.aval.dtype if hasattr(v.aval, "dtype") else None
      unsigned = dt is not None and (dt == np.bool_ or jnp.issubdtype(dt, jnp.unsignedinteger))
      env[v] = bool(s) or unsigned
  return [status(v) for v in jaxpr.outvars]


def _mark(x: Array, key: str) -> Array:
  return _mark_p.bind(x, key=key)


# --------------------------------------------------------------------------------------------
# The interception
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
  """The state of one run of a wrapped model (a forward pass, or the analysis trace).

  Attributes:
    ctx: the cimjax context (None in the analysis trace, which marks layer inputs instead).
    rules: the validated rules.
    signed: layer path -> signed input (from the analysis).
    max_bits: size of the clip tables.
    seen: the layer paths met, in call order.
    sites: attention products per module path (names ``qk``/``av``, then ``qk_1``/``av_1``...).
  """

  ctx: QuantContext | None
  rules: tuple[Rule, ...] = ()
  signed: Mapping[str, bool] = dataclasses.field(default_factory=dict)
  max_bits: int = DEFAULT_MAX_BITS
  seen: list[str] = dataclasses.field(default_factory=list)
  sites: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def analysis(self) -> bool:
    return self.ctx is None

  def rule(self, path: str) -> Rule | None:
    for r in self.rules:
      if r.matches(path):
        return r
    return None

  def signed_input(self, path: str, rule: Rule | None) -> bool:
    if rule is not None and rule.signed_input is not None:
      return rule.signed_input
    return self.signed.get(path, True)


_LOCAL = threading.local()  # the _Call stack of the running thread (for nn.dot_product_attention)
_FLAX_DPA = flax_attention.dot_product_attention
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]


def _current_call() -> _Call | None:
  stack = getattr(_LOCAL, "calls", None)
  return stack[-1] if stack else None


def _path(module: nn.Module) -> str:
  path = "/".join(str(p) for p in module.path)
  if not path:
    raise ModelError(
      f"the model's root module is itself a {type(module).__name__} layer; wrap it in a module"
    )
  return path


def _raw(fn: Any) -> Any:
  return getattr(fn, "__wrapped__", fn)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
  return args[0] if args else kwargs[name]


def _with_arg(
  args: tuple[Any, ...], kwargs: dict[str, Any], name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
  if args:
    return (value, *args[1:]), kwargs
  return args, {**kwargs, name: value}


def _unsupported(module: nn.Module, what: str) -> ModelError:
  return ModelError(
    f"layer {'/'.join(map(str, module.path))} ({type(module).__name__}): {what} is not "
    "supported by cimjax.quantize_model; skip the layer with a rule "
    f"(Rule({'/'.join(map(str, module.path))!r}, skip=True))"
  )


def _params(module: nn.Module, next_fun: Any, args: Any, kwargs: Any) -> tuple[Array, Any]:
  """The layer's own ``kernel`` and ``bias`` (created by its own code on first use)."""
  if not module.has_variable("params", "kernel"):
    next_fun(*args, **kwargs)  # init: let the layer create its parameters the Flax way
  kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
  bias = None
  if getattr(module, "use_bias", False):
    bias = nn.meta.unbox(module.get_variable("params", "bias"))
  return jnp.asarray(kernel, jnp.float32), None if bias is None else jnp.asarray(bias, jnp.float32)


def _check_dot_general(module: nn.Module, *fields: str) -> None:
  for f in fields:
    if getattr(module, f, None) is not None:
      raise _unsupported(module, f"a custom {f}")


def _weight_layer(
  call: _Call,
  module: nn.Module,
  next_fun: Any,
  args: Any,
  kwargs: Any,
  check: Callable[[nn.Module, Array, Any, Any], Any],
  run: Callable[..., Array],
) -> Array:
  """The shared course of an intercepted weight layer.

  Skipped (a rule): the layer's own float code. Analysis trace: the layer's own code on its
  marked input (after ``check``, so unsupported layers fail in :func:`quantize_model`). Run:
  ``run(call, module, path, rule, x, kernel, bias, plan)`` on the layer's own parameters.

  Args:
    call, module, next_fun, args, kwargs: the run and the intercepted call.
    check: ``check(module, x, args, kwargs) -> plan``; raises for unsupported layers.
    run: the quantized computation.
  """
  path, x = _path(module), _arg(args, kwargs, "inputs")
  rule = call.rule(path)
  if call.analysis:
    call.seen.append(path)
  if rule is not None and rule.skip:
    return next_fun(*args, **kwargs)
  plan = check(module, x, args, kwargs)
  if call.analysis:
    args, kwargs = _with_arg(args, kwargs, "inputs", _mark(x, path))
    return next_fun(*args, **kwargs)
  kernel, bias = _params(module, next_fun, args, kwargs)
  return run(call, module, path, rule, jnp.asarray(x, jnp.float32), kernel, bias, plan)


def _fixed(rule: Rule | None) -> tuple[int, int] | None:
  return None if rule is None else rule.bits


def _dense_check(module: nn.Dense, x: Array, args: Any, kwargs: Any) -> None:
  _check_dot_general(module, "dot_general", "dot_general_cls")


def _dense_run(
  call: _Call,
  module: nn.Module,
  path: str,
  rule: Rule | None,
  x: Array,
  kernel: Array,
  bias: Array | None,
  plan: None,
) -> Array:
  return layers_lib.dense_op(
    module,
    x,
    kernel,
    bias,
    call.ctx,
    signed_input=call.signed_input(path, rule),
    max_bits=call.max_bits,
    fixed_bits=_fixed(rule),
  )


def _dense_general_check(
  module: nn.DenseGeneral, x: Array, args: Any, kwargs: Any
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(contracted axes, features)`` of a supported DenseGeneral."""
  _check_dot_general(module, "dot_general", "dot_general_cls")
  if tuple(np.atleast_1d(module.batch_dims)):
    raise _unsupported(module, f"batch_dims={module.batch_dims!r}")
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  axes = tuple(a % x.ndim for a in axes)
  if 0 in axes:
    raise _unsupported(module, "contracting the batch axis 0")
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  return axes, features


def _dense_general_run(
  call: _Call,
  module: nn.Module,
  path: str,
  rule: Rule | None,
  x: Array,
  kernel: Array,
  bias: Array | None,
  plan: tuple[tuple[int, ...], tuple[int, ...]],
) -> Array:
  axes, features = plan
  n = math.prod(x.shape[a] for a in axes)
  m = math.prod(features)
  free = [a for a in range(x.ndim) if a not in axes]
  xt = x if (*free, *axes) == tuple(range(x.ndim)) else jnp.transpose(x, (*free, *axes))
  w = kernel.reshape(n, m)
  y = layers_lib.dense_op(
    module,
    xt.reshape(*(x.shape[a] for a in free), n),
    w,
    None if bias is None else bias.reshape(m),
    call.ctx,
    signed_input=call.signed_input(path, rule),
    max_bits=call.max_bits,
    fixed_bits=_fixed(rule),
    calib_w=w if kernel.ndim != 2 else None,
  )
  return y.reshape(*(x.shape[a] for a in free), *features)


def _einsum_check(module: nn.Einsum, x: Array, args: Any, kwargs: Any) -> tuple[str, str, str]:
  """``(lhs, rhs, out)`` indices of a supported Einsum equation."""
  eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  eq = (eq if eq is not None else module.einsum_str or "").replace(" ", "")
  m = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]*)", eq)
  if m is None:
    raise _unsupported(module, f"einsum {eq!r} (only explicit two-operand form, no ellipsis)")
  lhs, rhs, out = m.groups()
  if len(lhs) != x.ndim or len(rhs) != len(module.shape):
    raise _unsupported(
      module, f"einsum {eq!r} for input rank {x.ndim}, kernel rank {len(module.shape)}"
    )
  for s in (lhs, rhs, out):
    if len(set(s)) != len(s):
      raise _unsupported(module, f"einsum {eq!r} with a repeated index")
  batch = [c for c in lhs if c in rhs and c in out]
  if batch:
    raise _unsupported(module, f"einsum {eq!r} with kernel batch indices {''.join(batch)}")
  kept = [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
  if sorted(out) != sorted(kept):
    raise _unsupported(module, f"einsum {eq!r} (each index must be contracted or kept)")
  if lhs[0] in rhs:
    raise _unsupported(module, f"einsum {eq!r} contracting the batch axis")
  return lhs, rhs, out


def _einsum_run(
  call: _Call,
  module: nn.Module,
  path: str,
  rule: Rule | None,
  x: Array,
  kernel: Array,
  bias: Array | None,
  plan: tuple[str, str, str],
) -> Array:
  lhs, rhs, out = plan
  contracted = [c for c in lhs if c in rhs]
  tokens = [c for c in lhs if c not in rhs]
  feats = [c for c in rhs if c not in lhs]
  n = math.prod(kernel.shape[rhs.index(c)] for c in contracted)
  f_shape = tuple(kernel.shape[rhs.index(c)] for c in feats)
  m = math.prod(f_shape)
  w = jnp.transpose(kernel, [rhs.index(c) for c in contracted + feats]).reshape(n, m)
  order = [lhs.index(c) for c in tokens + contracted]
  xt = x if order == list(range(x.ndim)) else jnp.transpose(x, order)
  t_shape = tuple(x.shape[lhs.index(c)] for c in tokens)
  y = layers_lib.dense_op(
    module,
    xt.reshape(*t_shape, n),
    w,
    None,
    call.ctx,
    signed_input=call.signed_input(path, rule),
    max_bits=call.max_bits,
    fixed_bits=_fixed(rule),
    calib_w=w,
  ).reshape(*t_shape, *f_shape)
  have = tokens + feats
  perm = [have.index(c) for c in out]
  if perm != list(range(len(perm))):
    y = jnp.transpose(y, perm)
  if bias is not None:  # Flax's broadcast of the bias over the output
    y = y + jnp.reshape(bias, [kernel.shape[rhs.index(c)] if c in rhs else 1 for c in out])
  return y


def _conv_check(module: nn.Conv, x: Array, args: Any, kwargs: Any) -> tuple[tuple[int, int], Any]:
  """``(strides, padding)`` of a supported 2-D convolution."""
  ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
  if len(ks) != 2:
    raise _unsupported(module, f"a {len(ks)}-D convolution")
  if x.ndim != 4:
    raise _unsupported(module, f"an input of rank {x.ndim} (need [batch, H, W, C])")
  for f in ("input_dilation", "kernel_dilation"):
    v = getattr(module, f)
    if v is not None and any(d != 1 for d in np.atleast_1d(v)):
      raise _unsupported(module, f"{f}={v!r}")
  if module.mask is not None:
    raise _unsupported(module, "a kernel mask")
  _check_dot_general(module, "conv_general_dilated", "conv_general_dilated_cls")
  padding = canonicalize_padding(module.padding, 2)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise _unsupported(module, f"padding={module.padding!r}")
  if not isinstance(padding, str):
    padding = tuple(tuple(int(v) for v in p) for p in padding)
  s = module.strides
  strides = (1, 1) if s is None else (s, s) if isinstance(s, int) else tuple(s)
  return (int(strides[0]), int(strides[1])), padding


def _conv_run(
  call: _Call,
  module: nn.Module,
  path: str,
  rule: Rule | None,
  x: Array,
  kernel: Array,
  bias: Array | None,
  plan: tuple[tuple[int, int], Any],
) -> Array:
  strides, padding = plan
  return layers_lib.conv_op(
    module,
    x,
    kernel,
    bias,
    call.ctx,
    strides=strides,
    padding=padding,
    groups=int(module.feature_group_count),
    signed_input=call.signed_input(path, rule),
    max_bits=call.max_bits,
    fixed_bits=_fixed(rule),
  )


def _dense(call: _Call, module: nn.Module, next_fun: Any, args: Any, kwargs: Any) -> Array:
  return _weight_layer(call, module, next_fun, args, kwargs, _dense_check, _dense_run)


def _dense_general(call: _Call, module: nn.Module, next_fun: Any, args: Any, kwargs: Any) -> Array:
  return _weight_layer(
    call, module, next_fun, args, kwargs, _dense_general_check, _dense_general_run
  )


def _einsum(call: _Call, module: nn.Module, next_fun: Any, args: Any, kwargs: Any) -> Array:
  return _weight_layer(call, module, next_fun, args, kwargs, _einsum_check, _einsum_run)


def _conv(call: _Call, module: nn.Module, next_fun: Any, args: Any, kwargs: Any) -> Array:
  return _weight_layer(call, module, next_fun, args, kwargs, _conv_check, _conv_run)


def _product_site(
  call: _Call,
  host: nn.Module,
  base: str,
  index: int,
  x: Array,
  w: Array,
  a_clip_init: float,
) -> Array:
  """One attention product ``x [B, R, T, n] @ w [B, R, n, m]`` as a QuantMatMul ``host/<name>``."""
  name = base if index == 0 else f"{base}_{index}"
  path = f"{_path(host)}/{name}" if host.path else name
  rule = call.rule(path)
  native = lambda p, q: jnp.einsum("brtn,brnm->brtm", p, q, precision=HIGHEST)  # noqa: E731
  if call.analysis:
    call.seen.append(path)
    return native(x if rule is not None and rule.skip else _mark(x, path), w)
  if rule is not None and rule.skip:
    return native(x, w)
  # A child of the calling module: adopted in a compact method, else in a child scope of its own
  # (a setup-style module calling nn.dot_product_attention from a plain method). Flax internals.
  compact = host._state.in_compact_method or host._state.in_setup
  parent: Any = host if compact else host.scope.push(name, reuse=True)
  return QuantMatMul(
    signed_input=call.signed_input(path, rule),
    max_bits=call.max_bits,
    a_clip_init=a_clip_init,
    fixed_bits=None if rule is None else rule.bits,
    parent=parent,
    name=name if compact else None,
  )(x, w, call.ctx)


def _attention(
  call: _Call,
  host: nn.Module | None,
  query: Array,
  key: Array,
  value: Array,
  bias: Array | None = None,
  mask: Array | None = None,
  broadcast_dropout: bool = True,
  dropout_rng: Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype: Any = None,
  precision: Any = None,
  module: nn.Module | None = None,
  force_fp32_for_softmax: bool = False,
  einsum_dot_general: Any = None,
  qk_attn_weights_einsum: Any = None,
  attn_weights_value_einsum: Any = None,
) -> Array:
  """``nn.dot_product_attention`` with Q.K^T and A.V as CIM products (the zoo ViT's math).

  Args:
    call: the run.
    host: the module owning the products (default: the module being called).
    query: ``[batch..., T_q, heads, d]``; key: ``[batch..., T_k, heads, d]``;
      value: ``[batch..., T_k, heads, d_v]``.
    bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, module: as in
      ``flax.linen.dot_product_attention``.
    dtype, precision, force_fp32_for_softmax: ignored (float32, exact integer products).
    einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: must be None.

  Returns:
    ``[batch..., T_q, heads, d_v]``.
  """
  del dtype, precision, force_fp32_for_softmax
  if host is None:
    host = nn.module._context.module_stack[-1]  # the module calling us (Flax internals)
    if host is None:
      raise ModelError("nn.dot_product_attention called outside a Flax module")
  if einsum_dot_general or qk_attn_weights_einsum or attn_weights_value_einsum:
    raise ModelError(
      f"{'/'.join(map(str, host.path)) or 'model'}: attention with a custom einsum is not "
      "supported by cimjax.quantize_model"
    )
  *batch, tq, h, d = query.shape
  tk, dv = key.shape[-3], value.shape[-1]
  b = math.prod(batch)
  q = query.reshape(b, tq, h, d).transpose(0, 2, 1, 3) * (d**-0.5)  # [B, H, Tq, d]
  kt = key.reshape(b, tk, h, d).transpose(0, 2, 3, 1)  # [B, H, d, Tk]
  v = value.reshape(b, tk, h, dv).transpose(0, 2, 1, 3)  # [B, H, Tk, dv]
  host_key = "/".join(map(str, host.path))
  index = call.sites.get(host_key, 0)
  call.sites[host_key] = index + 1
  logits = _product_site(call, host, "qk", index, q, kt, 4.0)
  full = (*batch, h, tq, tk)
  if bias is not None:
    logits = logits + jnp.broadcast_to(bias, full).reshape(b, h, tq, tk)
  if mask is not None:
    m = jnp.broadcast_to(mask, full).reshape(b, h, tq, tk)
    logits = jnp.where(m, logits, jnp.finfo(logits.dtype).min)
  attn = jax.nn.softmax(logits, axis=-1)
  if module is not None:
    module.sow("intermediates", "attention_weights", attn.reshape(full))
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    rng = dropout_rng if dropout_rng is not None else host.make_rng("dropout")
    shape = (1, 1, tq, tk) if broadcast_dropout else attn.shape
    keep = jax.random.bernoulli(rng, keep_prob, shape)
    attn = attn * (keep.astype(attn.dtype) / jnp.asarray(keep_prob, attn.dtype))
  out = _product_site(call, host, "av", index, attn, v, 1.0)  # [B, H, Tq, dv]
  return out.transpose(0, 2, 1, 3).reshape(*batch, tq, h, dv)


def _mha(
  call: _Call, module: nn.MultiHeadDotProductAttention, next_fun: Any, args: Any, kwargs: Any
) -> Array:
  """Runs the attention module with its products as CIM products (its projections intercepted)."""
  if module.attention_fn is not _FLAX_DPA:
    return next_fun(*args, **kwargs)  # a custom attention_fn (nn.dot_product_attention inside
    # it is intercepted through the module attribute)
  fn = functools.partial(_attention, call, module)
  original = module.attention_fn
  object.__setattr__(module, "attention_fn", fn)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, "attention_fn", original)


def _dpa(query: Array, key: Array, value: Array, *args: Any, **kwargs: Any) -> Array:
  """``nn.dot_product_attention`` while a wrapped model runs (the original elsewhere)."""
  call = _current_call()
  if call is None:
    return _FLAX_DPA(query, key, value, *args, **kwargs)
  return _attention(call, None, query, key, value, *args, **kwargs)


_HANDLERS: tuple[tuple[type, Callable[..., Array]], ...] = (
  (nn.MultiHeadDotProductAttention, _mha),
  (nn.Conv, _conv),
  (nn.Dense, _dense),
  (nn.DenseGeneral, _dense_general),
  (nn.Einsum, _einsum),
)
_RAW = {_raw(cls.__call__): fn for cls, fn in _HANDLERS}


def _interceptor(call: _Call) -> Callable[..., Any]:
  def intercept(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    # Only the Flax layer's own __call__ (also reached through super() of a subclass).
    fn = _RAW.get(getattr(context.orig_method, "func", None))
    if fn is None:
      return next_fun(*args, **kwargs)
    return fn(call, context.module, next_fun, args, kwargs)

  return intercept


@contextlib.contextmanager
def _running(call: _Call) -> Iterator[None]:
  """Intercepts the Flax layers and ``nn.dot_product_attention`` for the duration of a run."""
  stack = getattr(_LOCAL, "calls", None)
  if stack is None:
    stack = _LOCAL.calls = []
  with _PATCH_LOCK:
    if _PATCH_DEPTH[0] == 0:
      nn.dot_product_attention = _dpa
      flax_attention.dot_product_attention = _dpa
    _PATCH_DEPTH[0] += 1
  stack.append(call)
  try:
    with nn.intercept_methods(_interceptor(call)):
      yield
  finally:
    stack.pop()
    with _PATCH_LOCK:
      _PATCH_DEPTH[0] -= 1
      if _PATCH_DEPTH[0] == 0:
        nn.dot_product_attention = _FLAX_DPA
        flax_attention.dot_product_attention = _FLAX_DPA


# --------------------------------------------------------------------------------------------
# The wrapper and quantize_model
# --------------------------------------------------------------------------------------------


class QuantizedModel(nn.Module):
  """A plain Flax module run as a CIM model (build it with :func:`quantize_model`).

  Shares its scope with ``model``, so the variables are the model's own (plus clip tables).

  Attributes:
    model: the plain Flax module; ``model(x, **{train_arg: train})`` returns the logits.
    rules: the layer rules, first match wins.
    signed: ``(layer path, signed input)`` from the sign analysis.
    train_arg: the keyword of ``model.__call__`` that receives ``ctx.train`` (or None).
    max_bits: size B of the clip tables.
  """

  model: nn.Module
  rules: tuple[Rule, ...] = ()
  signed: tuple[tuple[str, bool], ...] = ()
  train_arg: str | None = None
  max_bits: int = DEFAULT_MAX_BITS

  def setup(self) -> None:
    """Shares this module's scope with the wrapped model (plain Flax variable names)."""
    nn.share_scope(self, self.model)

  def __call__(self, x: Array, ctx: QuantContext) -> Array:
    """Args: x ``[batch, *input_shape]``; ctx: the context. Returns the model's output."""
    call = _Call(ctx=ctx, rules=self.rules, signed=dict(self.signed), max_bits=self.max_bits)
    kwargs = {self.train_arg: ctx.train} if self.train_arg else {}
    with _running(call):
      return self.model(x, **kwargs)


def _train_arg(module: nn.Module, train_arg: str | None) -> str | None:
  params = inspect.signature(type(module).__call__).parameters
  if train_arg == "auto":
    return next((p for p in ("train", "training") if p in params), None)
  if train_arg is not None and train_arg not in params:
    raise ModelError(
      f"train_arg={train_arg!r}: {type(module).__name__}.__call__ has no such parameter "
      f"(it has {', '.join(list(params)[1:]) or 'none'})"
    )
  return train_arg


def _analyze(
  module: nn.Module,
  input_shape: tuple[int, ...],
  train_arg: str | None,
  rules: tuple[Rule, ...],
  max_bits: int,
) -> tuple[dict[str, bool], list[str], tuple[int, ...]]:
  """``(signed per layer path, layer paths in call order, output shape)`` of a plain model."""
  kw = {train_arg: False} if train_arg else {}
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  call = _Call(ctx=None, rules=rules, max_bits=max_bits)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  try:
    with _running(call):
      variables = jax.eval_shape(lambda v: module.init(rngs, v, **kw), x)
      call.seen.clear()
      call.sites.clear()
      closed = jax.make_jaxpr(lambda p, v: module.apply(p, v, **kw), return_shape=True)
      jaxpr, out = closed(variables, x)
  except ModelError:
    raise
  except Exception as e:  # the user's model failed: say which and why
    msg = str(e).strip().splitlines()
    raise ModelError(
      f"{type(module).__name__} fails on an input of shape {(1, *input_shape)}: "
      f"{type(e).__name__}: {msg[0] if msg else ''}"
    ) from e
  marks: dict[str, bool] = {}
  n_in = len(jaxpr.jaxpr.invars)
  _walk(jaxpr, [False] * n_in, marks)
  out_shape = tuple(getattr(out, "shape", ()))
  return {k: not v for k, v in marks.items()}, list(call.seen), out_shape


def quantize_model(
  module: nn.Module,
  *,
  input_shape: Sequence[int],
  rules: Sequence[Rule | Mapping[str, Any]] = (),
  num_classes: int | None = None,
  name: str | None = None,
  description: str = "",
  train_arg: str | None = "auto",
  max_bits: int = DEFAULT_MAX_BITS,
) -> ModelDef:
  """A plain Flax module as a cimjax model, without editing its source.

  Example::

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))

    model = cimjax.quantize_model(Net(), input_shape=(28, 28, 1),
                                  rules=[cimjax.models.Rule("Dense_0", bits=(8, 8))])
    variables = cimjax.init(model, jax.random.key(0))
    logits, _ = cimjax.forward(model.module, variables, x, policy)

  Args:
    module: an unbound Flax linen module; ``module(x)`` (plus its train flag) returns logits
      ``[batch, num_classes]``.
    input_shape: one input without the batch axis, e.g. ``(28, 28, 1)``.
    rules: :class:`Rule` objects (or dicts of their fields), first match wins.
    num_classes: number of logits (default: the last axis of the output).
    name: the :class:`ModelDef`'s name (default: the module's class name).
    description: one line for listings.
    train_arg: keyword of ``module.__call__`` that receives the training flag (``ctx.train``:
      batch norm statistics, dropout); ``"auto"``: ``train`` or ``training`` if present.
    max_bits: size B of the clip tables.

  Returns:
    The :class:`ModelDef`, its ``module`` a :class:`QuantizedModel` (``__call__(x, ctx)``)
    that works with :func:`cimjax.forward`, :func:`cimjax.trace_specs`, training, the
    evaluator and the compiler.

  Raises:
    ModelError: not a Flax module, a bad rule or one that matches no layer, no quantizable
      layer, an unsupported layer configuration, or the model failing on ``input_shape``.
  """
  if not isinstance(module, nn.Module):
    raise ModelError(f"quantize_model: expected a flax.linen.Module, got {type(module).__name__}")
  if isinstance(module, QuantizedModel):
    raise ModelError("quantize_model: the module is already quantized")
  if module.scope is not None:
    raise ModelError("quantize_model: pass an unbound module (not one inside apply/bind)")
  try:
    shape = tuple(int(d) for d in input_shape)
  except (TypeError, ValueError):
    raise ModelError(
      f"quantize_model: input_shape={input_shape!r} is not a tuple of ints"
    ) from None
  parsed = tuple(_rule(r, max_bits) for r in rules)
  arg = _train_arg(module, train_arg)
  signed, seen, out_shape = _analyze(module, shape, arg, parsed, max_bits)
  if not seen:
    raise ModelError(
      f"{type(module).__name__} has no nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum or "
      "attention layer for cimjax to quantize"
    )
  for r in parsed:
    if not any(r.matches(p) for p in seen):
      raise ModelError(
        f"rule {r.pattern!r} matches no layer of {type(module).__name__}; its layers: "
        f"{', '.join(seen)}"
      )
  if num_classes is None:
    if not out_shape:
      raise ModelError(f"{type(module).__name__}: output has no class axis; pass num_classes")
    num_classes = int(out_shape[-1])
  wrapped = QuantizedModel(
    model=module,
    rules=parsed,
    signed=tuple(sorted(signed.items())),
    train_arg=arg,
    max_bits=max_bits,
  )
  return ModelDef(
    name or type(module).__name__,
    wrapped,
    shape,
    int(num_classes),
    description or f"plain Flax {type(module).__name__} ({len(seen)} Flax layers intercepted)",
  )


__all__ = ["QuantizedModel", "Rule", "quantize_model"]
