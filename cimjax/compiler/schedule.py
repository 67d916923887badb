"""The tile schedule of a planned model and the latency/energy measured by walking it.

:func:`build_schedule` orders the operations of every layer (:class:`Schedule`, one row per
operation: ``PROGRAM`` a tile, ``EXECUTE`` its input cycles, ``SHIFT_ADD`` its partial sums,
``DIGITAL`` the layer's host-side operations); :func:`walk_schedule` measures each layer's
latency and energy (:class:`ScheduleCost`).

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
:mod:`cimjax.cost`; :func:`cimjax.compiler.check_cost` checks both agree.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from cimjax import hw as hw_lib
from cimjax.compiler.plan import LayerPlan, plan_layers
from cimjax.errors import ProgramError
from cimjax.spec import LayerSpec

OP_PROGRAM, OP_EXECUTE, OP_SHIFT_ADD, OP_DIGITAL = 0, 1, 2, 3
OP_NAMES = ("program", "execute", "shift_add", "digital")


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
  """The ordered schedule of ``plans`` on ``hw`` (semantics in the module docstring)."""
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
  op, layer = schedule.op, schedule.layer
  count, rows, cols = schedule.count, schedule.rows, schedule.cols
  prog, exe, sa = op == OP_PROGRAM, op == OP_EXECUTE, op == OP_SHIFT_ADD
  round_layer, has_prog, longest = _rounds(schedule)
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


def _rounds(schedule: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per round of the schedule: its layer, whether it programs, its longest ``EXECUTE``.

  Returns:
    ``(layer int64 [R], programs bool [R], longest int64 [R])``, ``R`` rounds.
  """
  op, layer, rnd, count = schedule.op, schedule.layer, schedule.round, schedule.count
  nrounds = int(rnd.max()) + 1 if rnd.size and rnd.max() >= 0 else 0
  round_layer = np.zeros(nrounds, np.int64)
  tiled = rnd >= 0
  round_layer[rnd[tiled]] = layer[tiled]
  # Rounds that program (one t_write each) and the longest execution of each round.
  has_prog = np.zeros(nrounds, bool)
  has_prog[rnd[op == OP_PROGRAM]] = True
  longest = np.zeros(nrounds, np.int64)
  exe = op == OP_EXECUTE
  er, ec = rnd[exe], count[exe]
  if er.size and np.all(er[1:] >= er[:-1]):  # rounds in order: segment maxima
    starts = np.flatnonzero(np.r_[True, er[1:] != er[:-1]])
    longest[er[starts]] = np.maximum.reduceat(ec, starts)
  elif er.size:
    np.maximum.at(longest, er, ec)
  return round_layer, has_prog, longest


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


__all__ = [
  "OP_DIGITAL",
  "OP_EXECUTE",
  "OP_NAMES",
  "OP_PROGRAM",
  "OP_SHIFT_ADD",
  "Schedule",
  "ScheduleCost",
  "build_schedule",
  "compile_geometry",
  "schedule_params",
  "walk_schedule",
]
