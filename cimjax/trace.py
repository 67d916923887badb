"""Automatic CIM layer geometry: trace a model once and read its quantizable layers.

The quantized layers record a :class:`~cimjax.spec.LayerSpec` in call order while the model is
traced abstractly (``jax.eval_shape``: no weights are allocated, so ViT-B/32 at 224x224 traces
in about a second). The call order is the policy order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimjax.layers import QuantContext
from cimjax.spec import LayerSpec


def trace_specs(model: Any, input_shape: tuple[int, ...] | None = None) -> list[LayerSpec]:
  """Ordered geometry of a model's quantizable layers (docs/architecture.md, section 3).

  Args:
    model: a :class:`cimjax.models.ModelDef`, or a Flax module whose ``__call__(x, ctx)``
      threads a :class:`~cimjax.layers.QuantContext`.
    input_shape: one input without the batch axis, e.g. ``(28, 28, 1)``; defaults to the
      ModelDef's.

  Returns:
    One :class:`LayerSpec` per quantizable layer, in call (policy) order, for a batch of one
    inference (the batch axis never counts as invocations).
  """
  module: nn.Module = getattr(model, "module", model)
  if input_shape is None:
    input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
      raise ValueError("input_shape is required when tracing a bare module")
  ctx = QuantContext()
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  jax.eval_shape(lambda v: module.init_with_output(jax.random.key(0), v, ctx), x)
  return list(ctx.specs)


def layer_names(specs: list[LayerSpec]) -> list[str]:
  """The names of ``specs`` in order (for policy validation messages)."""
  return [s.name for s in specs]
