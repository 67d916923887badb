"""Compiler, program format, executor and verification for CIM crossbars (DESIGN.md section 3).

``compile_model(model, variables, policy, hw)`` lowers a zoo model with a bit policy onto a
hardware target and returns a :class:`CimProgram`:

- per layer (:class:`LayerPlan`): the bits, weight slices (shifts and widths), input cycles
  (shifts), the physical geometry (rows, columns, tile grid) and, for layers with static weights,
  the integer weights, the cell levels of every ``N x M`` tile, the column sums of the weights
  (offset-input correction), the dequantisation scales and their fixed-point form;
- an ordered :class:`Schedule`, one row per operation (``PROGRAM`` a tile, ``EXECUTE`` its input
  cycles, ``SHIFT_ADD`` its partial sums, ``DIGITAL`` the layer's host-side operations);
- the model's other (digital) variables, so a saved program runs on its own.

Schedule semantics (what :func:`walk_schedule` measures). Tiles of a layer are numbered
matrix-major (repeat, row tile, column tile) and grouped into *rounds* of ``P`` tiles, where
``P = num_crossbars`` in the ``"parallel"`` latency mode and 1 otherwise. A round programs its
tiles at once (one ``t_write``, divided by ``batch`` when weights stay programmed for a batch:
``"stationary"`` and ``"parallel"`` modes), then executes them concurrently (the round takes the
longest ``EXECUTE``: ``count = invocations * cycles`` crossbar cycles of ``t_exec``), then
shift-adds their partial sums. Layers run one after another. Energy is counted per operation:
``PROGRAM`` writes ``rows * cols`` cells, each ``EXECUTE`` cycle drives ``rows`` DACs, reads
``rows * cols`` cells and converts ``cols`` columns, and each ``SHIFT_ADD`` accumulates
``cols * count`` partial sums (``rows``/``cols`` are the tile's used cells). ``DIGITAL``
operations cost nothing in this model (as in CIM-AQ). The walk is independent of
:mod:`cimjax.cost`; tests check both agree for every layer, mapping, latency mode and bit pair.

Files (:func:`save_program`, :func:`load_program`): a directory with ``manifest.json`` (format,
model, target, policy, layer plans, schedule settings, per-layer latency/energy from the walk,
SHA-256 of every array and of the ``.npz``) and ``arrays.npz`` (loaded with
``allow_pickle=False``). Writes go to a temporary directory that is renamed into place.

The executor (:func:`execute`) runs the model's forward pass with an ``mvm`` hook that feeds the
program's *stored tiles* (not the model's weights) through the crossbar simulator
(:mod:`cimjax.crossbar`); dynamic layers (attention ``Q.K^T``, ``A.V``) program their runtime
operand. :func:`verify` compares every layer's integer accumulator and the logits with the
fake-quantised model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cimjax import crossbar as xb
from cimjax import hw as hw_lib
from cimjax import io, quant
from cimjax import layers as layers_lib
from cimjax import policy as policy_lib
from cimjax.errors import ProgramError  # noqa: F401 (re-exported)
from cimjax.noise import NoiseConfig
from cimjax.spec import LayerSpec

Array = jax.Array

FORMAT = "cimjax-program"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"

OP_PROGRAM, OP_EXECUTE, OP_SHIFT_ADD, OP_DIGITAL = 0, 1, 2, 3
OP_NAMES = ("program", "execute", "shift_add", "digital")


# --------------------------------------------------------------------------------------------
# Lowering: geometry of one layer
# --------------------------------------------------------------------------------------------


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
    d = dataclasses.asdict(self)
    for k in ("slice_shifts", "slice_bits", "cycle_shifts"):
      d[k] = list(d[k])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls)}
    for k in ("slice_shifts", "slice_bits", "cycle_shifts"):
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


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


class Schedule(NamedTuple):
  """An ordered list of operations, one row per op (all fields int64 ``[K]``).

  Attributes:
    op: ``OP_PROGRAM``, ``OP_EXECUTE``, ``OP_SHIFT_ADD`` or ``OP_DIGITAL``.
    layer: policy row of the layer.
    matrix: repeat index (conv group, attention head x image); -1 for ``DIGITAL``.
    tile_row, tile_col: position of the tile in its matrix's grid; -1 for ``DIGITAL``.
    round: global round id (tiles of a round are programmed and run together); -1 for
      ``DIGITAL``.
    slot: crossbar used within the round.
    count: ``EXECUTE``/``SHIFT_ADD``: crossbar cycles (invocations x input cycles);
      ``PROGRAM``: 1; ``DIGITAL``: output values produced per image.
    rows, cols: used rows and columns of the tile (0 for ``DIGITAL``).
  """

  op: np.ndarray
  layer: np.ndarray
  matrix: np.ndarray
  tile_row: np.ndarray
  tile_col: np.ndarray
  round: np.ndarray
  slot: np.ndarray
  count: np.ndarray
  rows: np.ndarray
  cols: np.ndarray

  def __len__(self) -> int:  # type: ignore[override]
    return int(self.op.shape[0])

  def layer_ops(self, layer: int) -> "Schedule":
    """The rows of one layer."""
    sel = self.layer == layer
    return Schedule(*(f[sel] for f in self))

  def to_records(self, limit: int | None = None) -> list[dict[str, Any]]:
    """Human-readable rows (for printing), at most ``limit``."""
    n = len(self) if limit is None else min(limit, len(self))
    out = []
    for i in range(n):
      r = {k: int(getattr(self, k)[i]) for k in self._fields}
      r["op"] = OP_NAMES[r["op"]]
      out.append(r)
    return out


def schedule_params(hw: hw_lib.HardwareTarget) -> tuple[int, int]:
  """``(crossbars per round, programming amortisation)`` implied by the latency mode."""
  if hw.latency_mode == "serial":
    return 1, 1
  if hw.latency_mode == "stationary":
    return 1, hw.batch
  return hw.num_crossbars, hw.batch


def _layer_schedule(
  plan: LayerPlan, hw: hw_lib.HardwareTarget, round0: int, crossbars: int
) -> tuple[dict[str, np.ndarray], int]:
  tr, tc, rep = plan.row_tiles, plan.col_tiles, plan.repeat
  nt = rep * tr * tc
  t = np.arange(nt, dtype=np.int64)
  matrix = t // (tr * tc)
  rem = t % (tr * tc)
  ti, tj = rem // tc, rem % tc
  rows = np.minimum(hw.rows, plan.rows_p - ti * hw.rows)
  cols = np.minimum(hw.cols, plan.cols_p - tj * hw.cols)
  nr = -(-nt // crossbars)
  pad = nr * crossbars - nt
  count = plan.invocations * plan.cycles
  # Per round: all PROGRAMs, then all EXECUTEs, then all SHIFT_ADDs ([round, phase, slot]).
  grid = lambda a: np.broadcast_to(
    np.pad(a, (0, pad)).reshape(nr, 1, crossbars), (nr, 3, crossbars)
  ).reshape(-1)
  valid = grid(np.ones(nt, bool))
  phase = np.broadcast_to(np.arange(3, dtype=np.int64)[None, :, None], (nr, 3, crossbars)).reshape(
    -1
  )[valid]
  ops = {
    "op": np.array([OP_PROGRAM, OP_EXECUTE, OP_SHIFT_ADD], np.int64)[phase],
    "matrix": grid(matrix)[valid],
    "tile_row": grid(ti)[valid],
    "tile_col": grid(tj)[valid],
    "round": grid(round0 + t // crossbars)[valid],
    "slot": grid(t % crossbars)[valid],
    "count": np.where(phase == 0, 1, count).astype(np.int64),
    "rows": grid(rows)[valid],
    "cols": grid(cols)[valid],
  }
  digital = {
    "op": OP_DIGITAL,
    "matrix": -1,
    "tile_row": -1,
    "tile_col": -1,
    "round": -1,
    "slot": -1,
    "count": plan.m * plan.invocations * plan.repeat,
    "rows": 0,
    "cols": 0,
  }
  for k, v in digital.items():
    ops[k] = np.append(ops[k], np.int64(v))
  ops["layer"] = np.full(ops["op"].shape[0], plan.index, np.int64)
  return ops, round0 + nr


def build_schedule(plans: Sequence[LayerPlan], hw: hw_lib.HardwareTarget) -> Schedule:
  """The ordered schedule of ``plans`` on ``hw`` (module docstring)."""
  crossbars, _ = schedule_params(hw)
  parts = []
  r0 = 0
  for p in plans:
    ops, r0 = _layer_schedule(p, hw, r0, crossbars)
    parts.append(ops)
  if not parts:
    raise ProgramError("build_schedule: no layers")
  return Schedule(
    **{k: np.concatenate([p[k] for p in parts]).astype(np.int64) for k in Schedule._fields}
  )


class ScheduleCost(NamedTuple):
  """Per-layer cost measured by walking a schedule (each field float64 ``[L]``).

  Attributes:
    latency_us: latency per image, microseconds.
    latency_write_us: the programming part of it.
    energy_pj: total energy per image, picojoules (sum of the five parts below).
    e_dac_pj, e_read_pj, e_adc_pj, e_shift_add_pj, e_write_pj: energy parts.
    tiles_programmed: PROGRAM operations (tiles of all repeats).
    exec_cycles: crossbar cycles on the critical path (sum over rounds of the longest EXECUTE).
  """

  latency_us: np.ndarray
  latency_write_us: np.ndarray
  energy_pj: np.ndarray
  e_dac_pj: np.ndarray
  e_read_pj: np.ndarray
  e_adc_pj: np.ndarray
  e_shift_add_pj: np.ndarray
  e_write_pj: np.ndarray
  tiles_programmed: np.ndarray
  exec_cycles: np.ndarray


def walk_schedule(
  schedule: Schedule, hw: hw_lib.HardwareTarget, num_layers: int, amortize: int | None = None
) -> ScheduleCost:
  """Latency and energy of every layer, measured by walking the schedule's operations.

  Args:
    schedule: the operations.
    hw: the target's timing and per-op energies.
    num_layers: L.
    amortize: images per programming (default: from the latency mode, see
      :func:`schedule_params`).

  Returns:
    :class:`ScheduleCost` with ``[L]`` float64 fields.
  """
  if amortize is None:
    amortize = schedule_params(hw)[1]
  L = num_layers
  op, layer, rnd = schedule.op, schedule.layer, schedule.round
  count, rows, cols = schedule.count, schedule.rows, schedule.cols
  prog, exe, sa = op == OP_PROGRAM, op == OP_EXECUTE, op == OP_SHIFT_ADD
  nrounds = int(rnd.max()) + 1 if rnd.size and rnd.max() >= 0 else 0
  round_layer = np.zeros(nrounds, np.int64)
  tiled = rnd >= 0
  round_layer[rnd[tiled]] = layer[tiled]
  # Rounds that program (one t_write each) and the longest execution of each round.
  has_prog = np.zeros(nrounds, bool)
  has_prog[rnd[prog]] = True
  longest = np.zeros(nrounds, np.int64)
  er, ec = rnd[exe], count[exe]
  if er.size and np.all(er[1:] >= er[:-1]):  # rounds in order: segment maxima
    starts = np.flatnonzero(np.r_[True, er[1:] != er[:-1]])
    longest[er[starts]] = np.maximum.reduceat(ec, starts)
  elif er.size:
    np.maximum.at(longest, er, ec)
  n_prog_rounds = np.bincount(round_layer[has_prog], minlength=L).astype(np.float64)
  exec_cycles = np.bincount(round_layer, weights=longest.astype(np.float64), minlength=L)
  write_lat = n_prog_rounds * hw.t_write_us / amortize
  latency = write_lat + exec_cycles * hw.t_exec_us

  def per_layer(sel, weights):
    return np.bincount(layer[sel], weights=weights[sel].astype(np.float64), minlength=L)

  e_dac = per_layer(exe, rows * count) * hw.e_dac_pj
  e_read = per_layer(exe, rows * cols * count) * hw.e_cell_read_pj
  e_adc = per_layer(exe, cols * count) * hw.e_adc_pj
  e_sa = per_layer(sa, cols * count) * hw.e_shift_add_pj
  e_write = per_layer(prog, rows * cols) * hw.e_write_pj / amortize
  energy = e_dac + e_read + e_adc + e_sa + e_write
  return ScheduleCost(
    latency_us=latency,
    latency_write_us=write_lat,
    energy_pj=energy,
    e_dac_pj=e_dac,
    e_read_pj=e_read,
    e_adc_pj=e_adc,
    e_shift_add_pj=e_sa,
    e_write_pj=e_write,
    tiles_programmed=np.bincount(layer[prog], minlength=L).astype(np.float64),
    exec_cycles=exec_cycles,
  )


def compile_geometry(
  specs: Sequence[LayerSpec], policy: Any, hw: hw_lib.HardwareTarget
) -> tuple[list[LayerPlan], Schedule, ScheduleCost]:
  """Plans, schedule and walked cost of a model from its traced geometry (no weights).

  Args:
    specs: layer geometry (:func:`cimjax.trace.trace_specs`).
    policy: int ``[L, 2]`` (bits >= 1).
    hw: target.

  Returns:
    ``(plans, schedule, cost)``.
  """
  plans = plan_layers(specs, policy, hw)
  sched = build_schedule(plans, hw)
  return plans, sched, walk_schedule(sched, hw, len(plans))


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CimProgram:
  """A compiled model: plans, schedule, tiles and the digital parameters.

  Attributes:
    hw: the target.
    policy: int32 ``[L, 2]``.
    layers: one :class:`LayerPlan` per quantizable layer.
    schedule: the operations.
    arrays: ``"layerNNN/<name>"`` per-layer arrays (``w_int`` int8/int16 ``[rep, n, m]``,
      ``levels`` uint8 ``[rep, tr, tc, N, M]``, ``w_colsum`` int32 ``[rep, m]``, ``w_step``
      float32 ``[rep, m]``, ``a_step`` float32 ``[]``, ``out_scale`` float32 ``[rep, m]``,
      ``out_mult``/``out_shift`` int64 ``[rep, m]``; the weight arrays are absent for dynamic
      layers) and ``"variables/<collection>/<path>"`` the model's variables.
    input_scheme: signed-input scheme of the simulator (``"twos"`` or ``"offset"``).
    model: zoo name, or None.
    model_kwargs: keyword arguments of :func:`cimjax.models.get_model` (JSON values).
    input_shape: one input without the batch axis.
    cost: walked per-layer cost (computed when missing).
  """

  hw: hw_lib.HardwareTarget
  policy: np.ndarray
  layers: list[LayerPlan]
  schedule: Schedule
  arrays: dict[str, np.ndarray]
  input_scheme: str = "twos"
  model: str | None = None
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  input_shape: tuple[int, ...] | None = None
  cost: ScheduleCost | None = None

  def __post_init__(self):
    if self.cost is None:
      self.cost = walk_schedule(self.schedule, self.hw, len(self.layers))

  def layer_array(self, index: int, name: str) -> np.ndarray:
    """Per-layer array ``name`` of layer ``index``."""
    key = _akey(index, name)
    if key not in self.arrays:
      raise ProgramError(f"program has no array {key!r} (layer {index} {self.layers[index].name})")
    return self.arrays[key]

  def variables(self) -> dict[str, Any]:
    """The model's variables (nested dicts of NumPy arrays)."""
    flat = {k[len("variables/") :]: v for k, v in self.arrays.items() if k.startswith("variables/")}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}

  def xbar_config(self, **overrides: Any) -> xb.XbarConfig:
    """The simulator configuration (target + input scheme, with ``overrides``)."""
    kw = {"input_scheme": self.input_scheme}
    kw.update(overrides)
    return xb.XbarConfig.from_hw(self.hw, **kw)

  def summary(self) -> list[dict[str, Any]]:
    """Per-layer rows: name, kind, bits, tiles, cycles, latency and energy (from the walk)."""
    out = []
    for p in self.layers:
      i = p.index
      out.append(
        {
          "index": i,
          "name": p.name,
          "kind": p.kind,
          "w_bits": p.w_bits,
          "a_bits": p.a_bits,
          "slices": p.slices,
          "cycles": p.cycles,
          "tiles": p.total_tiles,
          "tile_grid": [p.row_tiles, p.col_tiles],
          "repeat": p.repeat,
          "dynamic": p.dynamic,
          "exec_cycles": int(self.cost.exec_cycles[i]),
          "latency_us": float(self.cost.latency_us[i]),
          "energy_pj": float(self.cost.energy_pj[i]),
        }
      )
    return out

  @property
  def total_latency_us(self) -> float:
    return float(self.cost.latency_us.sum())

  @property
  def total_energy_pj(self) -> float:
    return float(self.cost.energy_pj.sum())


def _akey(index: int, name: str) -> str:
  return f"layer{index:03d}/{name}"


def _get_path(tree: Any, path: str) -> Any:
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _unwrap(v: Any) -> Any:
  return v[0] if isinstance(v, tuple) else v


def _weight_matrices(spec: LayerSpec, w_int: np.ndarray) -> np.ndarray:
  if spec.kind == "Conv2D":
    return np.asarray(layers_lib.conv_kernel_matrices(jnp.asarray(w_int), spec.groups))
  return np.asarray(w_int)[None]


def compile_model(
  model: Any,
  variables: Any,
  policy: Any,
  hw: hw_lib.HardwareTarget | str,
  *,
  input_scheme: str = "twos",
  model_kwargs: dict[str, Any] | None = None,
  max_bits: int = 8,
) -> CimProgram:
  """Lowers a model with a bit policy onto a hardware target.

  Args:
    model: a :class:`cimjax.models.ModelDef`.
    variables: its variables (``{"params": ..., ["batch_stats": ...]}``).
    policy: int ``[L, 2]`` (weight bits, activation bits), bits in ``2..max_bits``.
    hw: target (or its name/path).
    input_scheme: signed-input scheme (``"twos"`` or ``"offset"``).
    model_kwargs: the :func:`cimjax.models.get_model` options that rebuild ``model`` (stored so
      a saved program can be executed on its own).
    max_bits: largest allowed bit-width.

  Returns:
    The :class:`CimProgram`.

  Raises:
    ProgramError: the policy does not fit, or a layer's parameters are missing.
  """
  from cimjax import models as models_lib  # local: models imports layers only
  from cimjax import trace

  target = hw_lib.load_hw(hw)
  if input_scheme not in xb.INPUT_SCHEMES:
    raise ProgramError(f"input_scheme = {input_scheme!r}; allowed: {', '.join(xb.INPUT_SCHEMES)}")
  specs = trace.trace_specs(model)
  try:
    pol = policy_lib.validate_policy(
      policy, len(specs), min_bits=2, max_bits=max_bits, layer_names=[s.name for s in specs]
    )
  except policy_lib.PolicyError as e:
    raise ProgramError(f"policy: {e}") from None
  plans = plan_layers(specs, pol, target)
  sched = build_schedule(plans, target)
  cfg = xb.XbarConfig.from_hw(target, input_scheme=input_scheme)
  # One capture pass (batch of zeros) yields every layer's integer weights exactly as the
  # model's own quantizers compute them. It runs eagerly (op by op): under jit XLA may
  # reassociate the quantizer's ``x / (clip / denom)`` and flip ties at .5, so eager
  # arithmetic is the reference (see verify()).
  x0 = jnp.zeros((1, *model.input_shape), jnp.float32)
  _, state = models_lib.forward(model.module, variables, x0, jnp.asarray(pol), capture=True)
  cim = state.get("cim", {})
  params = variables["params"]
  arrays: dict[str, np.ndarray] = {}
  for spec, plan in zip(specs, plans):
    i = plan.index
    p = _get_path(params, spec.name)
    if p is None or "a_clip" not in p:
      raise ProgramError(f"layer {i} ({spec.name}): parameters not found in variables")
    a_step = quant.step_size(
      quant.gather_clip(p["a_clip"], plan.a_bits),
      plan.a_bits,
      signed=plan.signed_input,
      narrow=False,
    )
    arrays[_akey(i, "a_step")] = np.asarray(a_step, np.float32).reshape(())
    if plan.dynamic:
      w_step = quant.step_size(
        quant.gather_clip(p["w_clip"], plan.w_bits), plan.w_bits, signed=True, narrow=True
      )
      arrays[_akey(i, "w_step")] = np.asarray(w_step, np.float32).reshape(())
      continue
    captured = _get_path(cim, spec.name)
    if captured is None or "w_int" not in captured:
      raise ProgramError(f"layer {i} ({spec.name}): no captured integer weights")
    wm = _weight_matrices(spec, np.asarray(_unwrap(captured["w_int"])))  # [rep, n, m]
    if wm.shape != (plan.repeat, plan.n, plan.m):
      raise ProgramError(
        f"layer {i} ({spec.name}): weight matrices {wm.shape} do not match "
        f"the geometry {(plan.repeat, plan.n, plan.m)}"
      )
    w_int = np.rint(wm).astype(np.int64)
    layout = layer_layout(plan, cfg)
    levels = xb.slice_levels(w_int, plan.w_bits, layout, xp=np)  # uint8
    tiles = xb.tile_matrix(levels, target.rows, target.cols)
    w_step = quant.step_size(
      quant.gather_clip(p["w_clip"], plan.w_bits), plan.w_bits, signed=True, narrow=True
    )
    w_step = np.broadcast_to(
      np.asarray(w_step, np.float32).reshape(-1), (plan.repeat * plan.m,)
    ).reshape(plan.repeat, plan.m)
    out_scale = (w_step * arrays[_akey(i, "a_step")]).astype(np.float32)
    mult, shift = xb.fixed_point_multiplier(out_scale)
    arrays[_akey(i, "w_int")] = w_int.astype(np.int8 if plan.w_bits <= 8 else np.int16)
    arrays[_akey(i, "levels")] = tiles
    arrays[_akey(i, "w_colsum")] = w_int.sum(axis=1).astype(np.int32)
    arrays[_akey(i, "w_step")] = w_step.astype(np.float32)
    arrays[_akey(i, "out_scale")] = out_scale
    arrays[_akey(i, "out_mult")] = mult
    arrays[_akey(i, "out_shift")] = shift
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
  for k, v in flat.items():
    arrays[f"variables/{k}"] = np.asarray(v)
  return CimProgram(
    hw=target,
    policy=pol,
    layers=plans,
    schedule=sched,
    arrays=arrays,
    input_scheme=input_scheme,
    model=getattr(model, "name", None),
    model_kwargs=dict(model_kwargs or {}),
    input_shape=tuple(getattr(model, "input_shape", ()) or ()) or None,
  )


def init_variables(model: Any, seed: int) -> dict[str, Any]:
  """Random-initialised variables of ``model`` (one jitted init)."""
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  return dict(
    jax.jit(lambda k: model.module.init(k, x, layers_lib.QuantContext()))(jax.random.key(seed))
  )


def restore_variables(path: str | Path, model: Any) -> dict[str, Any]:
  """Trained variables (``params``, ``batch_stats``) of ``model`` from a checkpoint directory.

  Accepts a training stage's final ``variables/`` directory (or the stage directory holding
  it), written by ``cimjax.train`` with an orbax ``StandardCheckpointer``, or a
  ``CheckpointManager`` directory of :class:`cimjax.checkpoint.Checkpointer` (the latest step's
  ``state``). The model's abstract variables are the restore target, so shapes are checked.

  Raises:
    ProgramError: missing directory, nothing restorable, or parameters that do not fit the
      model.
  """
  import orbax.checkpoint as ocp  # local: only needed here

  p = Path(path).absolute()
  if not p.is_dir():
    raise ProgramError(f"directory not found: {str(path)!r}")
  x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
  init = lambda k, xx: model.module.init(k, xx, layers_lib.QuantContext())
  target = dict(jax.eval_shape(init, jax.random.key(0), x))
  target = {k: v for k, v in target.items() if k in ("params", "batch_stats")}
  if (p / "variables").is_dir():
    p = p / "variables"
  try:
    if (p / "_CHECKPOINT_METADATA").is_file() or (p / "_METADATA").is_file():
      with ocp.StandardCheckpointer() as c:
        meta = c.metadata(p)
        tree = getattr(meta, "item_metadata", meta)
        tree = tree.tree if hasattr(tree, "tree") else tree
        _check_shapes(path, model, dict(tree), target)  # before restoring: clear errors
        from cimjax import checkpoint as ckpt_lib  # local: imports orbax

        out = dict(c.restore(p, ckpt_lib.abstract_like(target)))
    else:
      mngr = ocp.CheckpointManager(p)
      step = mngr.latest_step()
      if step is None:
        raise ProgramError(f"no checkpoint in {str(path)!r}")
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      state = restored.state
      get = (
        (lambda k: state.get(k)) if isinstance(state, dict) else (lambda k: getattr(state, k, None))
      )
      out = {k: get(k) for k in target if get(k) is not None}
  except ProgramError:
    raise
  except Exception as e:  # orbax raises many types; report them as one line
    msg = str(e).strip().splitlines()
    raise ProgramError(
      f"cannot restore {str(path)!r} for model {model.name!r}: "
      f"{type(e).__name__}: {msg[0] if msg else ''}"
    ) from None
  if "params" not in out or (
    jax.tree.structure(out["params"]) != jax.tree.structure(target["params"])
  ):
    raise ProgramError(f"{str(path)!r} holds no parameters of model {model.name!r}")
  _check_shapes(path, model, out, target)
  return out


def _check_shapes(path: Any, model: Any, got_tree: dict[str, Any], target: dict[str, Any]) -> None:
  """Raises ProgramError naming the first variable whose stored shape differs."""
  for k in target:
    if k not in got_tree:
      continue
    got = traverse_util.flatten_dict(dict(got_tree[k]), sep="/")
    want = traverse_util.flatten_dict(dict(target[k]), sep="/")
    for name, leaf in want.items():
      shape = tuple(getattr(got.get(name), "shape", np.shape(got.get(name))))
      if shape != tuple(leaf.shape):
        raise ProgramError(
          f"cannot restore {str(path)!r} for model {model.name!r}: {k}/{name} "
          f"has shape {shape}, the model needs {tuple(leaf.shape)}"
        )


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def array_sha256(a: np.ndarray) -> str:
  """SHA-256 of an array's dtype, shape and C-order bytes."""
  a = np.ascontiguousarray(a)
  h = hashlib.sha256()
  h.update(f"{a.dtype.str}|{list(a.shape)}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def _file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _manifest(program: CimProgram) -> dict[str, Any]:
  crossbars, amortize = schedule_params(program.hw)
  c = program.cost
  return {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "model": program.model,
    "model_kwargs": program.model_kwargs,
    "input_shape": list(program.input_shape) if program.input_shape else None,
    "hw": program.hw.to_dict(),
    "input_scheme": program.input_scheme,
    "policy": np.asarray(program.policy).tolist(),
    "schedule": {
      "ops": len(program.schedule),
      "crossbars_per_round": crossbars,
      "amortize": amortize,
      "latency_mode": program.hw.latency_mode,
      "op_names": list(OP_NAMES),
    },
    "layers": [
      dict(
        p.to_dict(),
        latency_us=float(c.latency_us[p.index]),
        energy_pj=float(c.energy_pj[p.index]),
        tiles_programmed=int(c.tiles_programmed[p.index]),
      )
      for p in program.layers
    ],
    "total_latency_us": program.total_latency_us,
    "total_energy_pj": program.total_energy_pj,
  }


def save_program(program: CimProgram, path: str | os.PathLike[str]) -> Path:
  """Writes a program directory atomically (temporary directory, then rename).

  An existing program directory at ``path`` is replaced; any other existing non-empty
  directory or file is refused.

  Args:
    program: the program.
    path: destination directory.

  Returns:
    The destination path.

  Raises:
    ProgramError: ``path`` exists and is not a program directory.
  """
  dest = Path(path)
  if dest.exists() and not (
    dest.is_dir() and ((dest / MANIFEST).is_file() or not any(dest.iterdir()))
  ):
    raise ProgramError(f"{dest}: exists and is not a program directory; refusing to replace it")
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  try:
    arrays = dict(program.arrays)
    for k in Schedule._fields:
      arrays[f"schedule/{k}"] = getattr(program.schedule, k)
    with open(tmp / ARRAYS, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    man = _manifest(program)
    man["arrays"] = {
      k: {"sha256": array_sha256(v), "dtype": np.asarray(v).dtype.str, "shape": list(np.shape(v))}
      for k, v in sorted(arrays.items())
    }
    man["files"] = {ARRAYS: _file_sha256(tmp / ARRAYS)}
    with open(tmp / MANIFEST, "w") as f:
      json.dump(man, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    if dest.exists():
      old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
      os.replace(dest, old)
      os.replace(tmp, dest)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dest


def load_program(path: str | os.PathLike[str]) -> CimProgram:
  """Loads and checks a program directory.

  Verifies the format, the SHA-256 of ``arrays.npz`` and of every array, and recomputes the
  walked cost.

  Raises:
    ProgramError: missing directory or file, unreadable or corrupt JSON/npz, checksum
      mismatch, unsupported format version (the message names the file or array).
  """
  root = Path(path)
  if not root.is_dir():
    raise ProgramError(f"program directory not found: {str(root)!r}")
  mpath, apath = root / MANIFEST, root / ARRAYS
  for p in (mpath, apath):
    if not p.is_file():
      raise ProgramError(f"{root}: missing {p.name} (not a complete cimjax program)")
  try:
    man = json.loads(mpath.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ProgramError(f"{mpath}: corrupt manifest: {e}") from None
  if not isinstance(man, dict) or man.get("format") != FORMAT:
    raise ProgramError(f"{mpath}: not a {FORMAT} manifest")
  if man.get("version") != FORMAT_VERSION:
    raise ProgramError(
      f"{mpath}: format version {man.get('version')!r} is not supported (expected {FORMAT_VERSION})"
    )
  try:
    want = man["files"][ARRAYS]
    got = _file_sha256(apath)
    if got != want:
      raise ProgramError(
        f"{apath}: SHA-256 mismatch (file is corrupt or was modified): "
        f"expected {want[:16]}..., got {got[:16]}..."
      )
    arrays: dict[str, np.ndarray] = {}
    with np.load(apath, allow_pickle=False) as z:
      for k in z.files:
        arrays[k] = z[k]
    for k, meta in man["arrays"].items():
      if k not in arrays:
        raise ProgramError(f"{apath}: array {k!r} listed in the manifest is missing")
      if array_sha256(arrays[k]) != meta["sha256"]:
        raise ProgramError(f"{apath}: array {k!r}: SHA-256 mismatch")
    hw = hw_lib.hw_from_dict(man["hw"], origin=str(mpath))
    layers = [LayerPlan.from_dict(d) for d in man["layers"]]
    sched = Schedule(**{k: arrays.pop(f"schedule/{k}").astype(np.int64) for k in Schedule._fields})
  except ProgramError:
    raise
  except hw_lib.HwError as e:
    raise ProgramError(f"{mpath}: {e}") from None
  except (KeyError, TypeError, ValueError, OSError) as e:
    raise ProgramError(f"{root}: corrupt program ({type(e).__name__}: {e})") from None
  return CimProgram(
    hw=hw,
    policy=np.asarray(man["policy"], np.int32),
    layers=layers,
    schedule=sched,
    arrays=arrays,
    input_scheme=man["input_scheme"],
    model=man.get("model"),
    model_kwargs=dict(man.get("model_kwargs") or {}),
    input_shape=tuple(man["input_shape"]) if man.get("input_shape") else None,
  )


# --------------------------------------------------------------------------------------------
# Executor
# --------------------------------------------------------------------------------------------


def stored_levels(program: CimProgram) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """The programmed matrices of the static layers, untiled for the simulator.

  Returns:
    ``{layer: (levels float32 [rep, rows_p, cols_p], w_colsum int32 [rep, m])}``.
  """
  out = {}
  for p in program.layers:
    if p.dynamic:
      continue
    lv = xb.untile_matrix(program.layer_array(p.index, "levels"), p.rows_p, p.cols_p)
    out[p.index] = (
      lv.astype(np.float32),
      program.layer_array(p.index, "w_colsum").astype(np.int32),
    )
  return out


def program_hook(
  program: CimProgram,
  *,
  stored: dict[int, tuple[Array, Array]] | None = None,
  adc_bits: int | None | str = "hw",
  adc_frac: Any = None,
  noise: NoiseConfig | None = None,
  key: Array | None = None,
  read_key: Array | None = None,
  straight_through_grad: bool = True,
  block_elems: int = xb.DEFAULT_BLOCK_ELEMS,
) -> xb.MvmHook:
  """An ``mvm`` hook that runs the program's stored tiles on the crossbar simulator.

  Static layers ignore the ``w`` the forward pass hands over and use the program's cell levels
  (so the program itself is what runs); dynamic layers (attention) slice their runtime operand.

  Args:
    program: the compiled program.
    stored: the untiled levels (:func:`stored_levels`, possibly as traced arrays); computed
      from the program when None.
    adc_bits: ``"hw"`` (the target's), None (ideal) or an int.
    adc_frac: optional ``[L]`` ADC ranges as fractions of full scale.
    noise, key, read_key: non-idealities, the chip key and the read key (see
      :func:`cimjax.crossbar.make_mvm_hook`).
    straight_through_grad: backward pass of the ideal integer matmul.
    block_elems: simulator token-block size.
  """
  cfg = program.xbar_config(**({} if adc_bits == "hw" else {"adc_bits": adc_bits}))
  noise = xb.static_noise(noise)
  if noise is not None and key is None:
    raise ProgramError("program_hook: noise needs a PRNG key")
  if stored is None:
    stored = stored_levels(program)
  dyn_hook = xb.make_mvm_hook(
    cfg,
    policy=program.policy,
    noise=noise,
    key=key,
    read_key=read_key,
    adc_frac=adc_frac,
    straight_through_grad=straight_through_grad,
    block_elems=block_elems,
  )

  def hook(index, spec, x, w, w_bits, a_bits):
    plan = program.layers[index]
    if plan.dynamic:
      return dyn_hook(index, spec, x, w, w_bits, a_bits)
    if x.shape[0] != plan.repeat or x.shape[-1] != plan.n or w.shape[-1] != plan.m:
      raise ProgramError(
        f"layer {index} ({plan.name}): operands x {x.shape}, w {w.shape} do "
        f"not match the program ({plan.repeat} x {plan.n} x {plan.m})"
      )
    levels, colsum = stored[index]
    layout = layer_layout(plan, cfg)
    pk, rk = xb.layer_keys(key, index)
    if read_key is not None:
      rk = jax.random.fold_in(read_key, index)
    frac = 1.0 if adc_frac is None else adc_frac[index]
    y = xb.simulate_levels(
      x,
      jnp.asarray(levels),
      plan.w_bits,
      plan.a_bits,
      layout,
      w_colsum=jnp.asarray(colsum),
      adc_frac=frac,
      noise=noise,
      prog_key=pk,
      read_key=rk,
      block_elems=block_elems,
    )
    if straight_through_grad:
      y = xb.straight_through(x, w, jax.lax.stop_gradient(y))
    return y

  return hook


def program_model(program: CimProgram, model: Any = None) -> Any:
  """The :class:`cimjax.models.ModelDef` of a program (rebuilt from its manifest if needed)."""
  if model is not None:
    return model
  from cimjax import models as models_lib

  if program.model is None:
    raise ProgramError("program has no model name; pass the model explicitly")
  try:
    return models_lib.get_model(program.model, **program.model_kwargs)
  except (TypeError, ValueError) as e:
    raise ProgramError(
      f"cannot rebuild model {program.model!r} with {program.model_kwargs}: {e}"
    ) from None


def make_executor(
  program: CimProgram,
  *,
  model: Any = None,
  capture: bool = False,
  jit: bool = True,
  adc_bits: int | None | str = "hw",
  adc_frac: Any = None,
  noise: NoiseConfig | None = None,
  key: Array | None = None,
  block_elems: int = xb.DEFAULT_BLOCK_ELEMS,
):
  """A reusable (jitted) function running the program on batches.

  Args:
    program: the program.
    model: the ModelDef (default: rebuilt from the program).
    capture: also return each layer's integer operands and accumulator (``"cim"``).
    jit: compile the whole simulated forward pass once (the stored tiles, variables, inputs,
      keys and ADC ranges are arguments, so later calls do not recompile; the noise
      magnitudes are compile-time constants).
    adc_bits, adc_frac, noise, key, block_elems: see :func:`program_hook`.

  Returns:
    ``run(x, variables=None, read_key=None, adc_frac=None) -> (logits, state)``;
    ``variables`` defaults to the program's, ``read_key`` (one per batch) to one derived from
    ``key``, ``adc_frac`` to the one given here (changing it does not recompile).
  """
  from cimjax import models as models_lib

  md = program_model(program, model)
  default_vars = program.variables()
  stored0 = stored_levels(program)
  pol = jnp.asarray(program.policy)
  noise = xb.static_noise(noise)
  if noise is not None and key is None:
    raise ProgramError("make_executor: noise needs a PRNG key")
  num = len(program.layers)
  frac0 = jnp.ones((num,), jnp.float32) if adc_frac is None else jnp.asarray(adc_frac, jnp.float32)

  # The noise magnitudes are closed over (Python floats): zero ones are skipped at trace time.
  def fn(stored, variables, x, read_key, key_arg, frac):
    hook = program_hook(
      program,
      stored=stored,
      adc_bits=adc_bits,
      adc_frac=frac,
      noise=noise,
      key=key_arg,
      read_key=read_key,
      block_elems=block_elems,
    )
    return models_lib.forward(md.module, variables, x, pol, mvm=hook, capture=capture)

  if jit:
    fn = jax.jit(fn)

  def run(x, variables=None, read_key=None, adc_frac=None):
    v = default_vars if variables is None else variables
    frac = frac0 if adc_frac is None else jnp.asarray(adc_frac, jnp.float32).reshape(num)
    return fn(stored0, v, jnp.asarray(x, jnp.float32), read_key, key, frac)

  return run


def execute(
  program: CimProgram,
  x: Array,
  *,
  model: Any = None,
  variables: Any = None,
  capture: bool = False,
  jit: bool = True,
  read_key: Array | None = None,
  **hook_kwargs: Any,
) -> tuple[Array, dict[str, Any]]:
  """Runs a compiled program on inputs through the crossbar simulator (one call).

  For many batches build the function once with :func:`make_executor`.

  Args:
    program: the program.
    x: ``[B, H, W, C]`` inputs.
    model: the ModelDef (default: rebuilt from the program).
    variables: the model's variables (default: the program's).
    capture: also return each layer's integer operands and accumulator (``"cim"``).
    jit: compile the simulated forward pass as one function.
    read_key: key of the read noise.
    **hook_kwargs: ``adc_bits``, ``adc_frac``, ``noise``, ``key``, ``block_elems``.

  Returns:
    ``(logits, state)`` as :func:`cimjax.models.forward`.
  """
  run = make_executor(program, model=model, capture=capture, jit=jit, **hook_kwargs)
  return run(x, variables, read_key)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


class LayerCheck(NamedTuple):
  """Comparison of one layer's integer accumulator (simulated vs fake-quantised model).

  Attributes:
    index, name, kind: the layer.
    exact: every accumulator value equal.
    mismatches: number of differing values.
    numel: number of values compared.
    max_abs_err: largest absolute difference.
    mean_abs_err: mean absolute difference.
    weights_match: the program's stored integer weights equal the model's (True for dynamic
      layers, which store none).
  """

  index: int
  name: str
  kind: str
  exact: bool
  mismatches: int
  numel: int
  max_abs_err: float
  mean_abs_err: float
  weights_match: bool


class VerifyReport(NamedTuple):
  """Result of :func:`verify`.

  Attributes:
    layers: one :class:`LayerCheck` per layer.
    logits_equal: simulated logits equal the model's bit for bit.
    logits_max_abs_err: largest logit difference.
    top1_agreement: fraction of inputs with the same arg-max.
    ok: every layer exact, weights match, logits equal.
  """

  layers: list[LayerCheck]
  logits_equal: bool
  logits_max_abs_err: float
  top1_agreement: float
  ok: bool

  def mismatched(self) -> list[LayerCheck]:
    """Layers that are not exact."""
    return [c for c in self.layers if not (c.exact and c.weights_match)]

  def to_dict(self) -> dict[str, Any]:
    return {
      "ok": self.ok,
      "logits_equal": self.logits_equal,
      "logits_max_abs_err": self.logits_max_abs_err,
      "top1_agreement": self.top1_agreement,
      "layers": [c._asdict() for c in self.layers],
    }


def verify(
  program: CimProgram,
  x: Array,
  *,
  model: Any = None,
  variables: Any = None,
  jit: bool = False,
  **hook_kwargs: Any,
) -> VerifyReport:
  """Checks a program against the fake-quantised model on inputs ``x``.

  By default the simulator runs with an ideal ADC and no noise (``adc_bits=None``), where every
  layer's integer accumulator and the logits must be equal. Passing ``adc_bits``/``noise``
  measures the error they cause instead.

  Args:
    program: the program.
    x: ``[B, H, W, C]`` inputs.
    model, variables: as in :func:`execute`.
    jit: run both forward passes as compiled functions (one compile each). By default both run
      eagerly (op by op; the crossbar kernels are still compiled per layer), which makes the
      digital operations after each accumulator identical in both passes, so the logits can be
      compared bit for bit. Under ``jit`` XLA fuses the two graphs differently (the
      accumulators still match exactly; logits differ in the last float32 bits), and the
      quantizers may round ties differently from the eager capture the compiler used.
    **hook_kwargs: options of :func:`program_hook`.

  Returns:
    A :class:`VerifyReport` with one entry per layer.
  """
  from cimjax import models as models_lib

  md = program_model(program, model)
  v = program.variables() if variables is None else variables
  hook_kwargs.setdefault("adc_bits", None)
  pol = jnp.asarray(program.policy)
  x = jnp.asarray(x, jnp.float32)
  ref_fn = lambda v_, x_, p_: models_lib.forward(md.module, v_, x_, p_, capture=True)
  if jit:
    ref_fn = jax.jit(ref_fn)
  ref, ref_state = ref_fn(v, x, pol)
  sim, sim_state = execute(program, x, model=md, variables=v, capture=True, jit=jit, **hook_kwargs)
  ref_cim, sim_cim = ref_state.get("cim", {}), sim_state.get("cim", {})
  checks = []
  for p in program.layers:
    a = _get_path(ref_cim, p.name)
    b = _get_path(sim_cim, p.name)
    if a is None or b is None:
      raise ProgramError(f"layer {p.index} ({p.name}): no captured accumulator")
    acc_r = np.asarray(_unwrap(a["acc"]), np.float64)
    acc_s = np.asarray(_unwrap(b["acc"]), np.float64)
    diff = np.abs(acc_r - acc_s)
    wmatch = True
    if not p.dynamic:
      spec_like = LayerSpec(
        name=p.name,
        kind=p.kind,
        m=p.m,
        n=p.n,
        invocations=p.invocations,
        repeat=p.repeat,
        groups=p.repeat,
      )
      wm = _weight_matrices(spec_like, np.asarray(_unwrap(a["w_int"])))
      wmatch = bool(
        np.array_equal(
          np.rint(wm).astype(np.int64), program.layer_array(p.index, "w_int").astype(np.int64)
        )
      )
    checks.append(
      LayerCheck(
        index=p.index,
        name=p.name,
        kind=p.kind,
        exact=bool(np.all(diff == 0)),
        mismatches=int(np.count_nonzero(diff)),
        numel=int(diff.size),
        max_abs_err=float(diff.max()) if diff.size else 0.0,
        mean_abs_err=float(diff.mean()) if diff.size else 0.0,
        weights_match=wmatch,
      )
    )
  ref_np, sim_np = np.asarray(ref), np.asarray(sim)
  logits_equal = bool(np.array_equal(ref_np, sim_np))
  err = float(np.max(np.abs(ref_np - sim_np))) if ref_np.size else 0.0
  top1 = float(np.mean(ref_np.argmax(-1) == sim_np.argmax(-1))) if ref_np.size else 1.0
  ok = logits_equal and all(c.exact and c.weights_match for c in checks)
  return VerifyReport(
    layers=checks, logits_equal=logits_equal, logits_max_abs_err=err, top1_agreement=top1, ok=ok
  )


def calibrate_adc(
  program: CimProgram,
  x: Array,
  *,
  percentile: float = 99.99,
  min_frac: float = 1.0 / 64,
  model: Any = None,
  variables: Any = None,
) -> np.ndarray:
  """Per-layer calibrated ADC ranges from sample inputs (analog-cim-sim ``CALIB`` mode).

  Runs the program ideally on ``x`` (eagerly), collects every layer's analog partial sums and
  returns the ``percentile`` of their share of the full-scale range: the ADC then spends its
  levels on the range the data uses and clips the rare larger sums.

  Args:
    program: the program.
    x: ``[B, H, W, C]`` calibration inputs.
    percentile: in ``(0, 100]``; 100 gives the largest observed sum.
    min_frac: lower bound of the returned fractions.
    model, variables: as in :func:`execute`.

  Returns:
    float32 ``[L]`` fractions of full scale in ``[min_frac, 1]`` (pass as ``adc_frac``).
  """
  from cimjax import models as models_lib

  md = program_model(program, model)
  v = program.variables() if variables is None else variables
  cfg = program.xbar_config(adc_bits=None)
  stored = stored_levels(program)
  out = np.ones(len(program.layers), np.float32)

  def hook(index, spec, xi, w, w_bits, a_bits):
    p = program.layers[index]
    layout = layer_layout(p, cfg)
    if p.dynamic:
      levels = xb.slice_levels(w, p.w_bits, layout)
    else:
      levels = jnp.asarray(stored[index][0])
    u = np.asarray(xb.adc_utilisation(xi, levels, p.w_bits, p.a_bits, layout))
    u = u[u > 0]
    if u.size:
      out[index] = float(np.clip(np.percentile(u, percentile), min_frac, 1.0))
    # The ideal integer product continues the forward pass (equal to the ideal simulator).
    return xb.int_matmul(xi, w)

  models_lib.forward(
    md.module, v, jnp.asarray(x, jnp.float32), jnp.asarray(program.policy), mvm=hook
  )
  return out


def evaluate_accuracy(
  program: CimProgram,
  images: Any,
  labels: Any,
  *,
  batch_size: int = 250,
  simulate: bool = True,
  model: Any = None,
  variables: Any = None,
  read_seed: int = 0,
  **exec_kwargs: Any,
) -> float:
  """Top-1 accuracy of a program on a labelled set.

  Args:
    program: the program.
    images: ``[N, H, W, C]`` float inputs.
    labels: ``[N]`` int labels.
    batch_size: fixed batch size (the last batch is padded and masked; one compilation).
    simulate: run the crossbar simulator (True) or the plain fake-quantised model (False).
    model, variables: as in :func:`execute`.
    read_seed: seed of the per-batch read-noise keys.
    **exec_kwargs: options of :func:`make_executor` (``adc_bits``, ``adc_frac``, ``noise``,
      ``key``, ``block_elems``).

  Returns:
    Accuracy in ``[0, 1]``.
  """
  from cimjax import models as models_lib

  md = program_model(program, model)
  v = program.variables() if variables is None else variables
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  n = len(labels)
  if n == 0:
    raise ProgramError("evaluate_accuracy: no images")
  pol = jnp.asarray(program.policy)
  if simulate:
    run = make_executor(program, model=md, **exec_kwargs)
    fn = lambda xb_, i: run(xb_, v, jax.random.fold_in(jax.random.key(read_seed), i))[0]
  else:
    ref = jax.jit(lambda v_, x_: models_lib.forward(md.module, v_, x_, pol)[0])
    fn = lambda xb_, i: ref(v, xb_)
  correct = 0
  for bi, lo in enumerate(range(0, n, batch_size)):
    hi = min(lo + batch_size, n)
    xb_ = images[lo:hi]
    if hi - lo < batch_size:
      xb_ = np.concatenate([xb_, np.repeat(xb_[:1], batch_size - (hi - lo), axis=0)])
    pred = np.asarray(jnp.argmax(fn(jnp.asarray(xb_), bi), axis=-1))[: hi - lo]
    correct += int(np.sum(pred == labels[lo:hi]))
  return correct / n


class CompileResult(NamedTuple):
  """What :func:`compile_and_verify` produced.

  Attributes:
    program: the compiled program.
    report: the verification report (ideal ADC, no noise).
    path: the saved program directory, or None.
    accuracy: ``{"fake_quant", "crossbar"}`` test accuracies when data was given, else None.
    summary: JSON-ready summary (per-layer table, totals, verification, accuracy).
  """

  program: CimProgram
  report: VerifyReport
  path: Path | None
  accuracy: dict[str, float] | None
  summary: dict[str, Any]


def compile_and_verify(
  model: Any,
  variables: Any,
  policy: Any,
  hw: hw_lib.HardwareTarget | str,
  *,
  workdir: str | os.PathLike[str] | None = None,
  verify_inputs: Any = None,
  num_verify: int = 4,
  seed: int = 0,
  input_scheme: str = "twos",
  model_kwargs: dict[str, Any] | None = None,
  adc_bits: int | None | str = "hw",
  adc_frac: Any = None,
  noise: NoiseConfig | None = None,
  eval_data: tuple[Any, Any] | None = None,
  eval_batch: int = 250,
  program: CimProgram | None = None,
) -> CompileResult:
  """Compiles (or takes) a program, verifies it bit-exactly, saves it and measures accuracy.

  The entry point of ``python -m launch.compile`` and of pipeline code.

  Args:
    model: the ModelDef.
    variables: its variables (trained or random).
    policy: int ``[L, 2]``.
    hw: target (object, name or path).
    workdir: if given, the program is saved to ``workdir/program`` and the summary to
      ``workdir/compile_report.json`` (both atomically).
    verify_inputs: ``[B, H, W, C]`` inputs for verification; default ``num_verify`` standard
      normal images drawn with ``seed``.
    num_verify: see above.
    seed: seed of the verification inputs and of the noise (chip) key.
    input_scheme: signed-input scheme.
    model_kwargs: :func:`cimjax.models.get_model` options (stored in the program).
    adc_bits: ADC of the non-ideal accuracy run (``"hw"``: the target's).
    adc_frac: ``[L]`` calibrated ADC ranges or None (full scale).
    noise: non-idealities of the non-ideal accuracy run.
    eval_data: ``(images, labels)`` of a test split, or None to skip accuracy.
    eval_batch: evaluation batch size.
    program: an already compiled (e.g. loaded) program; then ``variables``/``policy``/``hw`` are
      ignored and nothing is recompiled.

  Returns:
    :class:`CompileResult`.
  """
  if program is None:
    program = compile_model(
      model, variables, policy, hw, input_scheme=input_scheme, model_kwargs=model_kwargs
    )
  md = program_model(program, model)
  if verify_inputs is None:
    verify_inputs = jax.random.normal(
      jax.random.key(seed), (num_verify, *md.input_shape), jnp.float32
    )
  report = verify(program, verify_inputs, model=md)
  accuracy = None
  if eval_data is not None:
    images, labels = eval_data
    accuracy = {
      "fake_quant": evaluate_accuracy(
        program, images, labels, simulate=False, model=md, batch_size=eval_batch
      )
    }
    key = jax.random.key(seed + 1) if noise is not None else None
    accuracy["crossbar"] = evaluate_accuracy(
      program,
      images,
      labels,
      model=md,
      batch_size=eval_batch,
      adc_bits=adc_bits,
      adc_frac=adc_frac,
      noise=noise,
      key=key,
      read_seed=seed + 2,
    )
  summary = {
    "model": program.model,
    "model_kwargs": program.model_kwargs,
    "hw": program.hw.name,
    "mapping": program.hw.mapping,
    "latency_mode": program.hw.latency_mode,
    "input_scheme": program.input_scheme,
    "policy": np.asarray(program.policy).tolist(),
    "layers": program.summary(),
    "total_latency_us": program.total_latency_us,
    "total_energy_pj": program.total_energy_pj,
    "total_tiles": int(sum(p.total_tiles for p in program.layers)),
    "cost_model_mismatches": check_cost(program),
    "verify": report.to_dict(),
    "accuracy": accuracy,
    "nonideal": {
      "adc_bits": (program.hw.adc_bits if adc_bits == "hw" else adc_bits),
      "adc_frac": None if adc_frac is None else np.asarray(adc_frac).tolist(),
      "noise": None if noise is None else noise.to_dict(),
    },
  }
  path = None
  if workdir is not None:
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    path = save_program(program, wd / "program")
    io.write_json(wd / "compile_report.json", summary, indent=1)
  return CompileResult(
    program=program, report=report, path=path, accuracy=accuracy, summary=summary
  )


def check_cost(
  program_or_plans: CimProgram | Sequence[LayerPlan],
  hw: hw_lib.HardwareTarget | None = None,
  *,
  cost: ScheduleCost | None = None,
  rtol: float = 1e-12,
) -> list[str]:
  """Compares the walked cost with :func:`cimjax.cost.cost_tables` (xp=np) layer by layer.

  Returns:
    Human-readable mismatch descriptions (empty when everything agrees within ``rtol``).
  """
  from cimjax import cost as cost_lib

  if isinstance(program_or_plans, CimProgram):
    plans, hw, cost = program_or_plans.layers, program_or_plans.hw, program_or_plans.cost
  else:
    plans = list(program_or_plans)
    if hw is None:
      raise ValueError("check_cost: hw is required with plans")
    if cost is None:
      cost = walk_schedule(build_schedule(plans, hw), hw, len(plans))
  geom = {
    "m": np.array([p.m for p in plans]),
    "n": np.array([p.n for p in plans]),
    "inv": np.array([p.invocations for p in plans]),
    "rep": np.array([p.repeat for p in plans]),
  }
  maxb = max(8, max(max(p.w_bits, p.a_bits) for p in plans))
  t = cost_lib.cost_tables(geom, hw, max_bits=maxb, xp=np)
  pairs = (
    ("latency_us", "latency_us"),
    ("latency_write_us", "latency_write_us"),
    ("energy_pj", "energy_pj"),
    ("e_dac_pj", "e_dac_pj"),
    ("e_read_pj", "e_read_pj"),
    ("e_adc_pj", "e_adc_pj"),
    ("e_shift_add_pj", "e_shift_add_pj"),
    ("e_write_pj", "e_write_pj"),
  )
  bad = []
  for p in plans:
    i, w, a = p.index, p.w_bits - 1, p.a_bits - 1
    if int(t.tiles[i, w, a]) != p.tiles:
      bad.append(f"layer {i} ({p.name}): tiles {p.tiles} != cost model {int(t.tiles[i, w, a])}")
    for mine, theirs in pairs:
      x, y = float(getattr(cost, mine)[i]), float(getattr(t, theirs)[i, w, a])
      if not np.isclose(x, y, rtol=rtol, atol=0.0):
        bad.append(
          f"layer {i} ({p.name}) w{p.w_bits}/a{p.a_bits}: {mine} {x!r} != cost model {y!r}"
        )
  return bad


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
