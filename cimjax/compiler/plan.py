"""Per-layer plans: how one quantizable layer is laid out on the crossbars (no weights needed).

:func:`plan_layer` turns a layer's geometry (:class:`cimjax.spec.LayerSpec`), its bits and the
hardware target into a :class:`LayerPlan`: weight slices (shifts, widths), input cycles
(shifts), the physical matrix of the mapping and its tile grid. :func:`layer_layout` gives the
simulator's :class:`cimjax.crossbar.Layout` of a planned layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from cimjax import crossbar as xb
from cimjax import hw as hw_lib
from cimjax.spec import LayerSpec

# LayerPlan fields stored as tuples (JSON lists in a program manifest).
_TUPLE_FIELDS = ("slice_shifts", "slice_bits", "cycle_shifts")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """How one quantizable layer is laid out on the crossbars.

  Attributes:
    index: policy row.
    name: module path.
    kind: ``"Conv2D"``, ``"Dense"`` or ``"MatMul"``.
    m, n, invocations, repeat: geometry (:class:`cimjax.spec.LayerSpec`).
    signed_input: whether the streamed input is signed.
    dynamic: the matrix is an activation (attention), programmed at run time.
    w_bits, a_bits: the layer's bits.
    mapping: ``"of"``, ``"dc"`` or ``"dr"``.
    slices: weight slices ``S = ceil(w_bits / cell_bits)``.
    slice_shifts: left shift of each slice (LSB first).
    slice_bits: bits held by each slice (the top one may hold fewer).
    cycles: input cycles ``ceil(a_bits / dac_bits)``.
    cycle_shifts: left shift of each cycle's digit.
    rows_p, cols_p: physical rows and columns of one matrix.
    row_tiles, col_tiles: tile grid of one matrix.
  """

  index: int
  name: str
  kind: str
  m: int
  n: int
  invocations: int
  repeat: int
  signed_input: bool
  dynamic: bool
  w_bits: int
  a_bits: int
  mapping: str
  slices: int
  slice_shifts: tuple[int, ...]
  slice_bits: tuple[int, ...]
  cycles: int
  cycle_shifts: tuple[int, ...]
  rows_p: int
  cols_p: int
  row_tiles: int
  col_tiles: int

  @property
  def tiles(self) -> int:
    """Tiles of one matrix."""
    return self.row_tiles * self.col_tiles

  @property
  def total_tiles(self) -> int:
    """Tiles programmed for the layer (all repeats)."""
    return self.tiles * self.repeat

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (tuples as lists)."""
    d = dataclasses.asdict(self)
    for k in _TUPLE_FIELDS:
      d[k] = list(d[k])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
    """The plan of :meth:`to_dict`'s fields (other keys are ignored)."""
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls)}
    for k in _TUPLE_FIELDS:
      kw[k] = tuple(int(v) for v in kw[k])
    return cls(**kw)


def plan_layer(
  spec: LayerSpec, w_bits: int, a_bits: int, hw: hw_lib.HardwareTarget, index: int = 0
) -> LayerPlan:
  """Lays out one layer (no weights needed).

  Args:
    spec: the layer's geometry.
    w_bits, a_bits: its bits (Python ints, >= 1).
    hw: target.
    index: policy row.

  Returns:
    The :class:`LayerPlan`.
  """
  w_bits, a_bits = int(w_bits), int(a_bits)
  c, d = hw.cell_bits, hw.dac_bits
  s = -(-w_bits // c)
  cyc = -(-a_bits // d)
  rows_p = 2 * spec.n if hw.mapping == "dr" else spec.n
  cols_p = spec.m * s
  if hw.mapping == "of":
    cols_p += 1
  elif hw.mapping == "dc":
    cols_p *= 2
  return LayerPlan(
    index=index,
    name=spec.name,
    kind=spec.kind,
    m=int(spec.m),
    n=int(spec.n),
    invocations=int(spec.invocations),
    repeat=int(spec.repeat),
    signed_input=bool(spec.signed_input),
    dynamic=spec.kind == "MatMul",
    w_bits=w_bits,
    a_bits=a_bits,
    mapping=hw.mapping,
    slices=s,
    slice_shifts=tuple(c * i for i in range(s)),
    slice_bits=tuple(min(c, w_bits - c * i) for i in range(s)),
    cycles=cyc,
    cycle_shifts=tuple(d * k for k in range(cyc)),
    rows_p=rows_p,
    cols_p=cols_p,
    row_tiles=-(-rows_p // hw.rows),
    col_tiles=-(-cols_p // hw.cols),
  )


def plan_layers(
  specs: Sequence[LayerSpec], policy: Any, hw: hw_lib.HardwareTarget
) -> list[LayerPlan]:
  """Plans every layer of a model for ``policy`` ``[L, 2]``."""
  pol = np.asarray(policy)
  return [plan_layer(s, int(pol[i, 0]), int(pol[i, 1]), hw, i) for i, s in enumerate(specs)]


def layer_layout(plan: LayerPlan, cfg: xb.XbarConfig) -> xb.Layout:
  """The simulator layout of a planned layer (exact slice and cycle allocation)."""
  return xb.make_layout(
    cfg,
    plan.n,
    plan.m,
    signed_input=plan.signed_input,
    max_w_bits=plan.w_bits,
    max_a_bits=plan.a_bits,
  )


__all__ = ["LayerPlan", "layer_layout", "plan_layer", "plan_layers"]
