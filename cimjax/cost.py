"""Latency, energy and tile tables of a model on a CIM target, and the cost of bit-width policies.

Everything here is a pure function. The tables are computed once per (model, target) as
``[L, B, B]`` arrays indexed ``[layer, w_bits - 1, a_bits - 1]`` (``B = max_bits``); a policy's
cost is then a gather, so it is cheap, jittable and vmappable over candidate policies.

Geometry (docs/architecture.md section 3; CIM-AQ's ``create_custom_latency_table.py``), for a
layer with output dim ``m``, input dim ``n``, ``inv`` MVM invocations and ``rep`` repeats, on a
target with ``N`` rows, ``M`` columns, ``c`` cell bits and ``d`` DAC bits::

  S      = ceil(w / c)                          weight slices
  cols   = m * S;  rows = n                     physical columns / rows of one matrix
  cols  += 1  if mapping == "of"                offset: one correction column
  cols  *= 2  if mapping == "dc"                differential column
  rows  *= 2  if mapping == "dr"                differential row
  tiles  = ceil(cols / M) * ceil(rows / N)      crossbar tiles of one matrix
  cycles = ceil(a / d)                          input bit-planes
  execs  = inv * tiles * cycles                 crossbar MVM cycles of one matrix

Latency modes (``hw.latency_mode``; microseconds per image):

- ``"serial"``: CIM-AQ exactly. One crossbar, used serially; every tile of every matrix is
  programmed once per image (batch 1), then run for all its invocations and cycles::

    lat = rep * (tiles * t_write + execs * t_exec)

- ``"stationary"``: as serial, but the weights stay programmed for ``batch`` images, so the
  programming time is amortised over the batch (weights-stationary batch processing)::

    lat = rep * (tiles * t_write / batch + execs * t_exec)

- ``"parallel"``: ``P = num_crossbars`` crossbars work in lockstep on one layer. The layer's
  ``rep * tiles`` tiles are processed in ``rounds = ceil(rep * tiles / P)`` rounds; in each
  round up to P tiles are programmed at once (one ``t_write``) and then run concurrently for
  all ``inv * cycles`` cycles. Layers still run one after another (no pipelining). Programming
  is amortised over ``batch`` images as in stationary mode::

    lat = rounds * t_write / batch + inv * rounds * cycles * t_exec

  With ``P = 1`` and ``batch = 1`` this equals serial (up to float rounding order).

``batch`` is ignored in serial mode and ``num_crossbars`` outside parallel mode.

Energy (picojoules per image), counted per operation with the target's per-op energies. Let
``cols``/``rows`` be the physical columns/rows above, ``tc = ceil(cols / M)`` and
``tr = ceil(rows / N)`` the tile grid, and ``k = inv * rep * cycles`` the number of cycles a
matrix is driven:

- DAC: every physical row of every column tile is driven once per cycle:
  ``rows * tc * k`` conversions x ``e_dac_pj``.
- Array read: every used cell (``rows * cols``) is read once per cycle:
  ``rows * cols * k`` x ``e_cell_read_pj``.
- ADC: every used physical column of every row tile is converted once per cycle:
  ``cols * tr * k`` x ``e_adc_pj``. (Differential columns are counted as two conversions; an
  analog subtraction before the ADC would halve this.) The ADC resolution does not enter.
- Shift-add: one digital shift-add per ADC output: ``cols * tr * k`` x ``e_shift_add_pj``.
- Programming: every used cell is written once per programming: ``rows * cols * rep`` x
  ``e_write_pj`` per image in serial mode, divided by ``batch`` in stationary and parallel
  modes (the number of crossbars does not change how many cells are written).

``energy_pj`` is the sum of the five, in that order.

Numerics: :func:`cost_tables` is written once over an array module ``xp``. With ``xp=np``
tables are float64/int64 and reproduce the formulas above exactly (all counts are exact
integers below 2^53). With ``xp=jnp`` they are float32/int32 and traceable: the target's numeric
fields may be traced arrays (see :func:`cost_tables_from_arrays` and :func:`hw_params`), so
``jax.vmap`` over e.g. ``t_exec_us`` or ``rows`` gives a design-space sweep. ``mapping``,
``latency_mode`` and ``max_bits`` are static.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import hw as hw_lib
from cimjax import policy as policy_lib
from cimjax.spec import LayerSpec

Array = Any  # np.ndarray | jax.Array

_HW_NUMERIC_FIELDS = (
  "rows",
  "cols",
  "cell_bits",
  "dac_bits",
  "t_write_us",
  "t_exec_us",
  "e_dac_pj",
  "e_cell_read_pj",
  "e_adc_pj",
  "e_shift_add_pj",
  "e_write_pj",
  "num_crossbars",
  "batch",
)


class CostTables(NamedTuple):
  """Per-layer cost of every (weight bits, activation bits) pair.

  Every field is an array of shape ``[L, B, B]`` indexed ``[layer, w_bits - 1, a_bits - 1]``
  (``B = max_bits``): float64/int64 with ``xp=np``, float32/int32 with ``xp=jnp``. Leading axes
  are added by ``jax.vmap`` over hardware parameters.

  Attributes:
    latency_us: latency per image in microseconds (the target's latency mode).
    energy_pj: energy per image in picojoules (sum of the five ``e_*`` fields).
    tiles: crossbar tiles of one matrix (independent of ``a``; times ``repeat`` for all).
    execs: crossbar MVM cycles of one matrix, ``inv * tiles * cycles``.
    cycles: input bit-planes ``ceil(a / dac_bits)`` (independent of the layer and ``w``).
    latency_write_us: the programming part of ``latency_us``, in microseconds.
    e_dac_pj: DAC energy in picojoules.
    e_read_pj: crossbar cell-read energy in picojoules.
    e_adc_pj: ADC energy in picojoules.
    e_shift_add_pj: shift-add energy in picojoules.
    e_write_pj: programming energy per image in picojoules.
  """

  latency_us: Array
  energy_pj: Array
  tiles: Array
  execs: Array
  cycles: Array
  latency_write_us: Array
  e_dac_pj: Array
  e_read_pj: Array
  e_adc_pj: Array
  e_shift_add_pj: Array
  e_write_pj: Array


def geometry_arrays(specs: Sequence[LayerSpec]) -> dict[str, np.ndarray]:
  """Stacks the cost-relevant geometry of ``specs``.

  Args:
    specs: ``L`` layer specs in policy (call) order.

  Returns:
    ``{"m", "n", "inv", "rep"}``, each an int64 array of shape ``[L]``.

  Raises:
    ValueError: if there are no layers or a dimension is not a positive integer (the message
      names the layer).
  """
  if len(specs) == 0:
    raise ValueError("no layers: the cost model needs at least one LayerSpec")
  out: dict[str, list[int]] = {"m": [], "n": [], "inv": [], "rep": []}
  for i, s in enumerate(specs):
    for key, field in (("m", "m"), ("n", "n"), ("inv", "invocations"), ("rep", "repeat")):
      v = getattr(s, field)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"layer {i} ({s.name}): {field} = {v!r}; allowed: an integer >= 1")
      out[key].append(int(v))
  return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def hw_params(hw: hw_lib.HardwareTarget) -> dict[str, Any]:
  """The numeric fields of a target, as keyword arguments of :func:`cost_tables_from_arrays`.

  Replace any of them by a (traced) array to sweep it, e.g.::

    p = hw_params(target)
    sweep = jax.vmap(lambda t: cost_tables_from_arrays(
        geom, **{**p, "t_exec_us": t}, mapping=target.mapping,
        latency_mode=target.latency_mode))(jnp.array([0.1, 1.4]))

  Returns:
    ``{"rows", "cols", "cell_bits", "dac_bits", "t_write_us", "t_exec_us", "e_dac_pj",
    "e_cell_read_pj", "e_adc_pj", "e_shift_add_pj", "e_write_pj", "num_crossbars", "batch"}``.
  """
  return {f: getattr(hw, f) for f in _HW_NUMERIC_FIELDS}


def _ceil_div(a, b):
  return -(-a // b)


def _check_static(mapping: str, latency_mode: str, max_bits: int) -> None:
  if mapping not in hw_lib.MAPPINGS:
    raise ValueError(f"mapping = {mapping!r}; allowed: {', '.join(hw_lib.MAPPINGS)}")
  if latency_mode not in hw_lib.LATENCY_MODES:
    raise ValueError(f"latency_mode = {latency_mode!r}; allowed: {', '.join(hw_lib.LATENCY_MODES)}")
  if not isinstance(max_bits, int) or max_bits < 1:
    raise ValueError(f"max_bits = {max_bits!r}; allowed: an integer >= 1")


def _grid(m, n, w, a, big_n, big_m, c, d, mapping: str) -> dict[str, Any]:
  """Physical rows/columns, the tile grid ``tc x tr`` and input cycles (integer arrays)."""
  slices = _ceil_div(w, c)  # [1, B, 1]
  cols_p = m * slices  # [L, B, 1]
  if mapping == "of":
    cols_p = cols_p + 1
  elif mapping == "dc":
    cols_p = cols_p * 2
  rows_p = n * 2 if mapping == "dr" else n  # [L, 1, 1]
  tc = _ceil_div(cols_p, big_m)  # [L, B, 1]
  tr = _ceil_div(rows_p, big_n)  # [L, 1, 1]
  cycles = _ceil_div(a, d)  # [1, 1, B]
  return {
    "cols_p": cols_p,
    "rows_p": rows_p,
    "tc": tc,
    "tr": tr,
    "tiles": tc * tr,
    "cycles": cycles,
  }


def _latency(mode, tiles_f, rep_f, inv_f, cycles_f, rounds_f, t_w, t_e, batch_f):
  """``(write latency, latency)`` in microseconds of one image, for a latency mode."""
  execs_f = inv_f * tiles_f * cycles_f
  if mode == "serial":
    return rep_f * (tiles_f * t_w), rep_f * (tiles_f * t_w + execs_f * t_e)
  if mode == "stationary":
    return rep_f * (tiles_f * t_w / batch_f), rep_f * (tiles_f * t_w / batch_f + execs_f * t_e)
  write = rounds_f * t_w / batch_f  # parallel
  return write, rounds_f * t_w / batch_f + inv_f * rounds_f * cycles_f * t_e


def _energy(rows_f, cols_f, tc_f, tr_f, k, rep_f, batch_f, pj: dict[str, Any]) -> dict[str, Any]:
  """Energy terms in picojoules of one image (``batch_f`` None: programming not amortised)."""
  n_adc = cols_f * tr_f * k
  e_write = (rows_f * cols_f * rep_f) * pj["write"]
  return {
    "dac": (rows_f * tc_f * k) * pj["dac"],
    "read": (rows_f * cols_f * k) * pj["read"],
    "adc": n_adc * pj["adc"],
    "sa": n_adc * pj["sa"],
    "write": e_write if batch_f is None else e_write / batch_f,
  }


def cost_tables_from_arrays(
  geom: dict[str, Array],
  *,
  rows,
  cols,
  cell_bits,
  dac_bits,
  t_write_us,
  t_exec_us,
  e_dac_pj=0.0,
  e_cell_read_pj=0.0,
  e_adc_pj=0.0,
  e_shift_add_pj=0.0,
  e_write_pj=0.0,
  num_crossbars=1,
  batch=1,
  mapping: str = "dc",
  latency_mode: str = "serial",
  max_bits: int = 8,
  xp=jnp,
) -> CostTables:
  """Cost tables from raw geometry and hardware numbers (which may be traced with ``xp=jnp``).

  Args:
    geom: ``{"m", "n", "inv", "rep"}`` int arrays ``[L]`` (see :func:`geometry_arrays`).
    rows: N, crossbar rows (int scalar).
    cols: M, crossbar columns (int scalar).
    cell_bits: bits per cell (int scalar).
    dac_bits: input bits per cycle (int scalar).
    t_write_us: microseconds to program one tile.
    t_exec_us: microseconds per crossbar cycle.
    e_dac_pj: picojoules per DAC conversion.
    e_cell_read_pj: picojoules per cell read per cycle.
    e_adc_pj: picojoules per ADC conversion.
    e_shift_add_pj: picojoules per shift-add.
    e_write_pj: picojoules per cell programmed.
    num_crossbars: P, used in ``"parallel"`` mode (int scalar).
    batch: images per programming, used in ``"stationary"`` and ``"parallel"`` modes.
    mapping: static, ``"of"``, ``"dc"`` or ``"dr"``.
    latency_mode: static, ``"serial"``, ``"stationary"`` or ``"parallel"``.
    max_bits: static, B, the largest bit-width in the tables.
    xp: ``numpy`` (exact float64/int64) or ``jax.numpy`` (float32/int32, traceable).

  Returns:
    :class:`CostTables` with ``[L, B, B]`` fields.

  Raises:
    ValueError: unknown ``mapping``/``latency_mode`` or ``max_bits < 1``.
  """
  _check_static(mapping, latency_mode, max_bits)
  idt, fdt = (np.int64, np.float64) if xp is np else (jnp.int32, jnp.float32)
  i = lambda x: xp.asarray(x, dtype=idt)
  f = lambda x: xp.asarray(x).astype(fdt)
  m = i(geom["m"])[:, None, None]  # [L, 1, 1]
  n = i(geom["n"])[:, None, None]
  inv = i(geom["inv"])[:, None, None]
  rep = i(geom["rep"])[:, None, None]
  bits = xp.arange(1, max_bits + 1, dtype=idt)
  w = bits[None, :, None]  # [1, B, 1]
  a = bits[None, None, :]  # [1, 1, B]
  g = _grid(m, n, w, a, i(rows), i(cols), i(cell_bits), i(dac_bits), mapping)
  execs = inv * g["tiles"] * g["cycles"]  # [L, B, B]
  # Float copies of the integer counts: exact in float64; in float32 they avoid int32 overflow.
  tiles_f, rep_f, inv_f, cycles_f = f(g["tiles"]), f(rep), f(inv), f(g["cycles"])
  batch_f = f(batch)
  rounds_f = (
    f(_ceil_div(rep * g["tiles"], i(num_crossbars))) if latency_mode == "parallel" else None
  )
  write_lat, latency = _latency(
    latency_mode, tiles_f, rep_f, inv_f, cycles_f, rounds_f, f(t_write_us), f(t_exec_us), batch_f
  )
  e = _energy(
    f(g["rows_p"]),
    f(g["cols_p"]),
    f(g["tc"]),
    f(g["tr"]),
    inv_f * rep_f * cycles_f,  # [L, 1, B]
    rep_f,
    batch_f if latency_mode != "serial" else None,
    {
      k: f(v)
      for k, v in (
        ("dac", e_dac_pj),
        ("read", e_cell_read_pj),
        ("adc", e_adc_pj),
        ("sa", e_shift_add_pj),
        ("write", e_write_pj),
      )
    },
  )
  energy = e["dac"] + e["read"] + e["adc"] + e["sa"] + e["write"]

  shape = (m.shape[0], max_bits, max_bits)
  bc = lambda x: xp.broadcast_to(x, shape)
  return CostTables(
    latency_us=bc(latency),
    energy_pj=bc(energy),
    tiles=bc(g["tiles"]),
    execs=bc(execs),
    cycles=bc(g["cycles"]),
    latency_write_us=bc(write_lat),
    e_dac_pj=bc(e["dac"]),
    e_read_pj=bc(e["read"]),
    e_adc_pj=bc(e["adc"]),
    e_shift_add_pj=bc(e["sa"]),
    e_write_pj=bc(e["write"]),
  )


# One compiled program per (geometry shape, mapping, mode, max_bits) instead of many eager ops.
_cost_tables_jit = jax.jit(
  cost_tables_from_arrays, static_argnames=("mapping", "latency_mode", "max_bits", "xp")
)


def cost_tables(
  specs: Sequence[LayerSpec] | dict[str, Array],
  hw: hw_lib.HardwareTarget,
  max_bits: int = 8,
  xp=jnp,
) -> CostTables:
  """Latency, energy and tile tables of a model on a target.

  Args:
    specs: ``L`` layer specs in policy order, or the dict of :func:`geometry_arrays`.
    hw: the hardware target (its ``mapping`` and ``latency_mode`` select the formulas).
    max_bits: B, the largest bit-width in the tables.
    xp: ``numpy`` for exact float64/int64 tables, ``jax.numpy`` for float32/int32.

  Returns:
    :class:`CostTables`, each field ``[L, B, B]`` indexed ``[l, w - 1, a - 1]``.
  """
  geom = specs if isinstance(specs, dict) else geometry_arrays(specs)
  fn = cost_tables_from_arrays if xp is np else _cost_tables_jit
  return fn(
    geom,
    **hw_params(hw),
    mapping=hw.mapping,
    latency_mode=hw.latency_mode,
    max_bits=max_bits,
    xp=xp,
  )


def _use_numpy(*xs) -> bool:
  return all(not isinstance(x, jax.Array) for x in xs) and isinstance(xs[0], np.ndarray)


def per_layer_cost(table: Array, policy: Array) -> Array:
  """Gathers each layer's cost at its (w, a) bits.

  Args:
    table: ``[L, B, B]`` cost table (any field of :class:`CostTables`).
    policy: int ``[..., L, 2]`` of (weight bits, activation bits), 1-based; leading batch axes
      are allowed. Bits must lie in ``1..B`` (validate first: out-of-range indices are clamped
      by JAX, not reported).

  Returns:
    ``[..., L]`` per-layer costs. NumPy in, NumPy out (exact); otherwise a JAX array (works
    under ``jit`` and ``vmap``).
  """
  xp = np if _use_numpy(table, policy) else jnp
  table = xp.asarray(table)
  policy = xp.asarray(policy)
  num_layers = table.shape[-3]
  return table[xp.arange(num_layers), policy[..., 0] - 1, policy[..., 1] - 1]


def policy_cost(table: Array, policy: Array) -> Array:
  """Total cost of a policy: ``sum_l table[l, w_l - 1, a_l - 1]``.

  Args:
    table: ``[L, B, B]`` cost table.
    policy: int ``[..., L, 2]``.

  Returns:
    ``[...]`` totals (a scalar for one policy).
  """
  return per_layer_cost(table, policy).sum(axis=-1)


def baseline_cost(table: Array, baseline_bits: tuple[int, int] = (8, 8)) -> Array:
  """Total cost with every layer at ``baseline_bits`` (CIM-AQ: uniform 8/8)."""
  w, a = baseline_bits
  return table[:, w - 1, a - 1].sum(axis=-1)


def cost_ratio(table: Array, policy: Array, baseline_bits: tuple[int, int] = (8, 8)) -> Array:
  """``policy_cost / baseline_cost`` (CIM-AQ's ``cost_ratio``; smaller is better)."""
  return policy_cost(table, policy) / baseline_cost(table, baseline_bits)


def speedup(table: Array, policy: Array, baseline_bits: tuple[int, int] = (8, 8)) -> Array:
  """``baseline_cost / policy_cost`` (CIM-AQ's speedup over uniform 8/8 for a latency table)."""
  return baseline_cost(table, baseline_bits) / policy_cost(table, policy)


def _masked_softmax(logits: jax.Array, mask: jax.Array | None, axis: int = -1) -> jax.Array:
  """Softmax over ``axis`` that gives masked-out entries exactly zero probability (and zero
  gradient), with no NaNs for finite logits."""
  logits = jnp.asarray(logits)
  if mask is None:
    return jax.nn.softmax(logits, axis=axis)
  mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), logits.shape)
  safe = jnp.where(mask, logits, -jnp.inf)
  zmax = jax.lax.stop_gradient(jnp.max(safe, axis=axis, keepdims=True))
  zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits, zmax) - zmax), 0.0)
  return e / jnp.sum(e, axis=axis, keepdims=True)


def expected_cost(table: Array, logits: Array, mask: Array | None = None) -> jax.Array:
  """Expected total cost when each layer's (w, a) is drawn from ``softmax(logits[l])``.

  Each layer draws its pair independently from a categorical distribution over the ``B * B``
  pairs; pairs where ``mask`` is False get zero probability. The result is differentiable in
  ``logits`` (gradient ``p * (c - E_l)`` per layer) and can be vmapped over leading axes.

  Args:
    table: ``[L, B, B]`` cost table.
    logits: ``[L, B, B]`` unnormalised log-probabilities of (w, a) per layer.
    mask: optional bool ``[L, B, B]`` of allowed pairs (e.g. :func:`cimjax.policy.action_mask`);
      every layer needs at least one allowed pair.

  Returns:
    Scalar: ``sum_l sum_{w,a} p[l, w, a] * table[l, w, a]``.
  """
  logits = jnp.asarray(logits)
  num_layers, b1, b2 = logits.shape[-3:]
  flat = logits.reshape(logits.shape[:-2] + (b1 * b2,))
  flat_mask = (
    None if mask is None else jnp.asarray(mask, bool).reshape(jnp.shape(mask)[:-2] + (b1 * b2,))
  )
  p = _masked_softmax(flat, flat_mask).reshape(logits.shape)
  return jnp.sum(p * jnp.asarray(table, p.dtype), axis=(-3, -2, -1))


def expected_cost_factored(
  table: Array, w_logits: Array, a_logits: Array, mask: Array | None = None
) -> jax.Array:
  """Expected total cost when w and a are drawn independently per layer.

  ``P(w, a) = softmax(w_logits[l])[w] * softmax(a_logits[l])[a]``. With a mask, the allowed
  weight bits of layer ``l`` are those with any allowed pair, and likewise for activation
  bits, so ``mask`` must be a per-layer product of a weight set and an activation set (every
  mask from :func:`cimjax.policy.action_mask` is).

  Args:
    table: ``[L, B, B]`` cost table.
    w_logits: ``[L, B]`` weight-bit logits.
    a_logits: ``[L, B]`` activation-bit logits.
    mask: optional bool ``[L, B, B]``.

  Returns:
    Scalar expected total cost, differentiable in both logits.
  """
  if mask is None:
    w_mask = a_mask = None
  else:
    mask = jnp.asarray(mask, bool)
    w_mask, a_mask = mask.any(axis=-1), mask.any(axis=-2)
  pw = _masked_softmax(w_logits, w_mask)
  pa = _masked_softmax(a_logits, a_mask)
  table = jnp.asarray(table, pw.dtype)
  return jnp.einsum("...lw,...la,lwa->...", pw, pa, table)


def layer_report(
  specs: Sequence[LayerSpec],
  hw: hw_lib.HardwareTarget,
  policy: Array,
  *,
  baseline_bits: tuple[int, int] = (8, 8),
  max_bits: int = 8,
) -> dict[str, Any]:
  """Per-layer and total latency and energy of ``policy`` on ``hw``, as plain JSON-ready data.

  Computed exactly in float64 (``xp=np``).

  Args:
    specs: ``L`` layer specs in policy order.
    hw: hardware target.
    policy: int ``[L, 2]``; validated (bits in ``1..max_bits``; errors name the layer).
    baseline_bits: bits of the uniform baseline (CIM-AQ: 8/8).
    max_bits: B.

  Returns:
    ``{"hw", "latency_mode", "layers": [{"name", "type", "m", "n", "invocations", "repeat",
    "w_bits", "a_bits", "tiles", "latency_us", "energy_pj"}, ...], "total_latency_us",
    "baseline_latency_us", "speedup", "total_energy_pj", "baseline_energy_pj"}``, times in
    microseconds and energies in picojoules. ``tiles`` are the tiles of one matrix (as in
    :class:`CostTables`; the layer programs ``tiles * repeat``). Totals are sums over the
    layers in order.

  Raises:
    cimjax.policy.PolicyError: the policy does not fit the layers.
  """
  names = [s.name for s in specs]
  pol = policy_lib.validate_policy(
    policy, len(specs), min_bits=1, max_bits=max_bits, layer_names=names
  )
  bw, ba = baseline_bits
  t = cost_tables(specs, hw, max_bits=max_bits, xp=np)
  layers: list[dict[str, Any]] = []
  for l, s in enumerate(specs):
    w, a = int(pol[l, 0]), int(pol[l, 1])
    layers.append(
      {
        "name": s.name,
        "type": s.kind,
        "m": int(s.m),
        "n": int(s.n),
        "invocations": int(s.invocations),
        "repeat": int(s.repeat),
        "w_bits": w,
        "a_bits": a,
        "tiles": int(t.tiles[l, w - 1, a - 1]),
        "latency_us": float(t.latency_us[l, w - 1, a - 1]),
        "energy_pj": float(t.energy_pj[l, w - 1, a - 1]),
      }
    )
  total = sum(r["latency_us"] for r in layers)
  base = sum(float(t.latency_us[l, bw - 1, ba - 1]) for l in range(len(specs)))
  return {
    "hw": hw.name,
    "latency_mode": hw.latency_mode,
    "layers": layers,
    "total_latency_us": total,
    "baseline_latency_us": base,
    "speedup": base / total,
    "total_energy_pj": sum(r["energy_pj"] for r in layers),
    "baseline_energy_pj": sum(float(t.energy_pj[l, bw - 1, ba - 1]) for l in range(len(specs))),
  }
