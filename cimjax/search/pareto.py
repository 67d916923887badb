"""The planner's Pareto DP, pruned to the damage limits it is asked about (exact).

:func:`cimjax.search.baselines.pareto_dp` keeps, after every layer, the whole (cost, damage)
Pareto front of the partial policies. The planner only asks the final front a few questions:
the cheapest policy whose total damage is at most ``t`` for a few limits ``t`` (and, when no
policy meets a limit, the least damaging one). :func:`constrained_front` runs the same DP with
the same tie-breaks, and after each layer also drops the front points that cannot lie on the
path of any of those answers, by a bound-and-prune test (branch and bound on the
multiple-choice knapsack):

- *lower bound*: the LP relaxation of the remaining layers (:func:`suffix_bounds`): for a
  partial point ``(c, d)`` after layer ``l`` and a limit ``t``, no completion is cheaper than
  ``c + LP_l(t - d)``, where ``LP_l(b)`` is the least cost of the convexified remaining layers
  with damage at most ``b`` (``+inf`` below their least damage). It is the lower convex hull of
  each layer's options, merged by slope (the greedy solution of the MCKP's LP).
- *upper bound*: a policy known to meet the limit (:func:`greedy_upper_bounds`): the first
  integer vertex of the same greedy path over all layers with damage at most ``t``, and the
  least-damage policy, whose cost bounds every answer (see there).

A point is dropped when, for every limit, its lower bound exceeds the upper bound. Both tests
carry a slack of ``1e-9`` of the problem's cost and damage scales (far above the rounding error
of the float64 sums, far below any cost step), so the answers' paths always survive. The pruned
DP's fronts are subsets of the full DP's fronts (a point that the full DP drops is dominated by
one it keeps, and a dominated point fails the bound test whenever its dominator does; exactly
so in real arithmetic, and the slack absorbs the float64 rounding), with the same order and the
same representative policy for every point kept, so the planner's answers are the full DP's,
bit for bit (tests/test_planner_dp.py checks this against
:func:`~cimjax.search.baselines.pareto_dp`, which stays the reference, and against brute force).

All functions are NumPy in, NumPy out (host code of the planner's ``pure_callback``). See
docs/architecture.md and the planner in :mod:`cimjax.search.planner`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cimjax.search import baselines
from cimjax.search import space as space_lib

TOL = 1e-9  # slack of the bound tests, relative to the problem's cost / damage scale


class LayerOptions(NamedTuple):
  """Each layer's allowed pairs with their cost and damage.

  Attributes:
    codes: per layer, int64 ``[K_l]`` pair codes ``(w - 1) * 8 + (a - 1)``, ascending.
    cost: per layer, float64 ``[K_l]`` cost of each pair.
    damage: per layer, float64 ``[K_l]`` damage of each pair.
  """

  codes: list[np.ndarray]
  cost: list[np.ndarray]
  damage: list[np.ndarray]


class SuffixBounds(NamedTuple):
  """The LP relaxation of the layers after each layer, as convex piecewise-linear functions.

  ``LP_l(b)`` (the least cost of layers ``l + 1 .. L - 1`` with their options convexified and
  total damage at most ``b``) is linear between the breakpoints ``(damage[l][i], cost[l][i])``,
  with ``damage[l]`` strictly decreasing; it is ``cost[l][0]`` above ``damage[l][0]`` and
  ``+inf`` below ``damage[l][-1]``. Index ``l = -1`` (the last entry, ``[L]``) is all layers.

  Attributes:
    damage: ``L + 1`` float64 arrays, breakpoint damages (strictly decreasing).
    cost: ``L + 1`` float64 arrays, breakpoint costs (increasing).
  """

  damage: list[np.ndarray]
  cost: list[np.ndarray]


def layer_options(space: space_lib.SearchSpace, cost_table: Any, damage: Any) -> LayerOptions:
  """Each layer's allowed pairs (in code order, as :func:`baselines.pareto_dp` takes them).

  Args:
    space: the search space.
    cost_table: ``[L, 8, 8]`` costs.
    damage: ``[L, 8, 8]`` damages (any sign).

  Returns:
    The :class:`LayerOptions`.
  """
  table = np.asarray(cost_table, np.float64).reshape(space.num_layers, -1)
  dmg = np.asarray(damage, np.float64).reshape(space.num_layers, -1)
  codes = [np.flatnonzero(r) for r in space.mask.reshape(space.num_layers, -1)]
  return LayerOptions(
    codes=codes,
    cost=[table[l, k] for l, k in enumerate(codes)],
    damage=[dmg[l, k] for l, k in enumerate(codes)],
  )


def lower_hull(cost: np.ndarray, damage: np.ndarray) -> np.ndarray:
  """Indices of one layer's options on the lower-left convex hull of (cost, damage).

  The hull starts at the cheapest option (least damage among equally cheap ones) and ends at
  the least damaging one (cheapest among equally damaging ones); along it cost increases,
  damage decreases and the cost of a unit of damage removed (the slope) increases; collinear
  options are skipped. A monotone chain over the options' staircase (plain Python: a layer
  has a few dozen options at most).

  Args:
    cost: float64 ``[K]``.
    damage: float64 ``[K]``.

  Returns:
    int64 ``[H]`` option indices in hull order.
  """
  order = np.lexsort((damage, cost)).tolist()  # cost ascending, then damage
  c, d = cost.tolist(), damage.tolist()
  hull: list[int] = []
  for i in order:
    if hull and d[i] >= d[hull[-1]]:
      continue  # not on the staircase: no cheaper in cost for less damage
    # pop while the last vertex is not strictly below the chord from the one before it to i
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      if (c[b] - c[a]) * (d[a] - d[i]) >= (c[i] - c[a]) * (d[a] - d[b]):
        hull.pop()
      else:
        break
    hull.append(i)
  return np.asarray(hull, np.int64)


def suffix_bounds(opts: LayerOptions) -> SuffixBounds:
  """The LP relaxation of every suffix of layers (:class:`SuffixBounds`).

  Every layer's hull edges (:func:`lower_hull`) are merged by slope, cheapest damage removal
  first; the LP of layers ``l + 1 ..`` starts from their cheapest options and takes their
  edges in that order. Cost ``O(L * E)`` for ``E`` hull edges in all.

  Args:
    opts: the layers' options.

  Returns:
    The :class:`SuffixBounds`.
  """
  num = len(opts.codes)
  c0, d0, e_layer, e_dc, e_dd, e_slope = [], [], [], [], [], []
  for l in range(num):
    h = lower_hull(opts.cost[l], opts.damage[l])
    c, d = opts.cost[l][h], opts.damage[l][h]
    c0.append(c[0])
    d0.append(d[0])
    dc, dd = np.diff(c), np.diff(d)  # dc >= 0, dd < 0
    e_layer.append(np.full(dc.shape, l))
    e_dc.append(dc)
    e_dd.append(dd)
    # non-decreasing within the layer (as on the exact hull), so the stable sort below keeps
    # each layer's edges in hull order even where rounding would swap them
    e_slope.append(np.maximum.accumulate(dc / -dd) if dc.size else dc)
  layer = np.concatenate(e_layer)
  order = np.lexsort((np.arange(layer.size), np.concatenate(e_slope)))  # by slope, stable
  layer = layer[order]
  dc, dd = np.concatenate(e_dc)[order], np.concatenate(e_dd)[order]
  c0, d0 = np.asarray(c0), np.asarray(d0)
  dam, cst = [], []
  for l in list(range(num)) + [-1]:
    sel = layer > l  # l = -1: every layer
    bd = d0[l + 1 :].sum() + np.concatenate([[0.0], np.cumsum(dd[sel])])
    bc = c0[l + 1 :].sum() + np.concatenate([[0.0], np.cumsum(dc[sel])])
    keep = np.concatenate([[True], np.diff(bd) < 0.0])  # equal damages: the cheaper (first)
    dam.append(bd[keep])
    cst.append(bc[keep])
  return SuffixBounds(damage=dam, cost=cst)


def lp_cost(bounds: SuffixBounds, layer: int, budget: np.ndarray) -> np.ndarray:
  """``LP_layer(budget)``: the LP lower bound on the cost of the layers after ``layer``.

  Args:
    bounds: :func:`suffix_bounds`.
    layer: ``-1 .. L - 1`` (``-1``: all layers).
    budget: float64 ``[...]`` damage allowed to those layers.

  Returns:
    float64 ``[...]``; ``+inf`` where the budget is below their least damage.
  """
  bd, bc = bounds.damage[layer], bounds.cost[layer]
  out = np.interp(-budget, -bd, bc)  # -bd increasing; above bd[0]: bc[0]
  return np.where(budget < bd[-1], np.inf, out)


def greedy_upper_bounds(
  bounds: SuffixBounds, limits: np.ndarray, tol_d: float
) -> tuple[np.ndarray, np.ndarray]:
  """Upper bounds on the answers' costs, and the damage limits the pruning uses.

  The greedy path's vertices (``bounds`` at ``l = -1``) are integer policies. For a limit
  ``t``, the first vertex with damage at most ``t - tol_d`` meets it for sure, so the cheapest
  policy meeting ``t`` costs no more. The last vertex (the least damage, cheapest among
  equally damaging policies, cost ``C_end``) bounds every answer: if it meets ``t`` the answer
  costs at most ``C_end``; if not, nothing meets ``t`` and the answer is the least damaging
  policy, which costs at most ``C_end``. Limits below the least damage ``D_end`` are raised to
  it (the answer is then that policy).

  Args:
    bounds: :func:`suffix_bounds`.
    limits: float64 ``[Q]`` damage limits.
    tol_d: damage slack.

  Returns:
    ``(upper, limits)``: float64 ``[Q]`` cost upper bounds and float64 ``[Q]`` limits.
  """
  bd, bc = bounds.damage[-1], bounds.cost[-1]
  t = np.maximum(np.asarray(limits, np.float64), bd[-1])
  # bd decreasing: the first index with bd <= t - tol_d (len(bd) if none)
  i = np.searchsorted(-bd, -(t - tol_d), side="left")
  upper = np.where(i < bd.size, bc[np.minimum(i, bd.size - 1)], np.inf)
  return np.minimum(upper, bc[-1]), t


def _scales(opts: LayerOptions, limits: np.ndarray) -> tuple[float, float]:
  """``(tol_c, tol_d)``: the bound tests' slacks (``TOL`` of the cost and damage scales)."""
  scale_c = sum(float(np.abs(c).max()) for c in opts.cost)
  scale_d = sum(float(np.abs(d).max()) for d in opts.damage)
  finite = np.abs(limits[np.isfinite(limits)])
  scale_d += float(finite.max()) if finite.size else 0.0
  return TOL * max(scale_c, 1e-300), TOL * max(scale_d, 1e-300)


def drop_dominated_options(opts: LayerOptions, tol_c: float, tol_d: float) -> LayerOptions:
  """Each layer's options without those that can never be on a front the full DP keeps.

  Option ``j`` goes when another option ``i`` of the same layer costs no more and damages no
  more, and either comes first (so on a tie after rounding the full DP keeps ``i``'s point, as
  it keeps the first of equal points) or is better by more than the slack in cost or damage
  (so no rounding makes the two points tie). Either way every point with ``j`` is dropped by
  the full DP, and only because of a point with ``i``; order and ties are unchanged.

  Args:
    opts: the layers' options.
    tol_c: cost slack.
    tol_d: damage slack.

  Returns:
    The kept options (:class:`LayerOptions`, code order kept).
  """
  codes, cost, dmg = [], [], []
  for k, c, d in zip(*opts):
    le = (c[:, None] <= c[None, :]) & (d[:, None] <= d[None, :])  # [i, j]: i no worse than j
    idx = np.arange(c.size)
    clear = (c[None, :] - c[:, None] > tol_c) | (d[None, :] - d[:, None] > tol_d)
    drop = (le & ((idx[:, None] < idx[None, :]) | clear)).any(axis=0)
    codes.append(k[~drop])
    cost.append(c[~drop])
    dmg.append(d[~drop])
  return LayerOptions(codes=codes, cost=cost, damage=dmg)


def _front_pass(
  opts: LayerOptions,
  bounds: SuffixBounds,
  limits: np.ndarray,
  upper: np.ndarray,
  tols: tuple[float, float],
  beam: int,
  max_front: int,
) -> baselines.ParetoDP | None:
  """One pass of the bound-and-prune DP over layers (:func:`constrained_front`).

  Args:
    opts: the layers' options.
    bounds: :func:`suffix_bounds` of ``opts``.
    limits: float64 ``[Q]`` damage limits (raised to the least damage).
    upper: float64 ``[Q]`` upper bounds on the answers' costs.
    tols: ``(tol_c, tol_d)``, the slacks.
    beam: 0 for the exact pass; otherwise keep after each layer only the ``beam`` points of
      least lower bound for each limit (a heuristic pass, for upper bounds).
    max_front: guard on the number of points kept after a layer.

  Returns:
    The front, or None when a beam pass loses every point.

  Raises:
    RuntimeError: the front grew beyond ``max_front``, or the exact pass emptied it (a bug).
  """
  tol_c, tol_d = tols
  cost = np.zeros(1)
  dam = np.zeros(1)
  parents: list[np.ndarray] = []
  choices: list[np.ndarray] = []
  for l, (codes, c_l, d_l) in enumerate(zip(*opts)):
    cc = (cost[:, None] + c_l[None, :]).reshape(-1)
    dd = (dam[:, None] + d_l[None, :]).reshape(-1)
    order = np.lexsort((dd, cc))  # cost ascending, then damage (as baselines.pareto_dp)
    cc, dd = cc[order], dd[order]
    run_min = np.minimum.accumulate(dd)
    keep = np.ones(cc.shape[0], bool)
    keep[1:] = dd[1:] < run_min[:-1]  # strictly better damage than all cheaper
    sel, cc, dd = order[keep], cc[keep], dd[keep]
    # bound and prune: useful for some limit t if c + LP_l(t - d) <= upper(t)
    lower = cc[:, None] + lp_cost(bounds, l, limits[None, :] - dd[:, None] + tol_d)
    ok = lower <= upper[None, :] + tol_c  # [F, Q]
    useful = ok.any(axis=1)
    if beam and int(useful.sum()) > beam:
      rank = np.argsort(np.where(ok, lower, np.inf), axis=0, kind="stable")[:beam]  # [beam, Q]
      best = np.zeros(useful.shape, bool)
      best[rank.reshape(-1)] = True
      useful &= best
    sel, cost, dam = sel[useful], cc[useful], dd[useful]
    if not cost.size:
      if beam:
        return None
      raise RuntimeError(f"the pruned Pareto front is empty after layer {l} (a bug)")
    if cost.shape[0] > max_front:
      raise RuntimeError(
        f"Pareto front has {cost.shape[0]} points after layer {l}; above max_front = {max_front}"
      )
    parents.append((sel // len(codes)).astype(np.int64))
    choices.append(codes[sel % len(codes)].astype(np.int16))
  return baselines.ParetoDP(cost=cost, damage=dam, parents=parents, choices=choices)


def constrained_front(
  space: space_lib.SearchSpace,
  cost_table: Any,
  damage: Any,
  limits: Any,
  upper: Any = None,
  beam: int = 16,
  max_front: int = 5_000_000,
) -> baselines.ParetoDP:
  """The part of the exact (cost, damage) Pareto front that answers the damage ``limits``.

  For every limit ``t``, the returned front holds the full front's cheapest point with total
  damage at most ``t`` (the same point and the same policy as
  :func:`~cimjax.search.baselines.pareto_dp`), and its least damaging point; every point it
  holds is a point of the full front (in the same order). So ``front.policy(i)`` for the first
  ``i`` meeting a limit (or the last point, when none does) is the full DP's answer.

  Two passes: a beam pass (``beam`` points a limit after each layer) finds good policies
  meeting each limit, whose costs tighten the upper bounds; the exact pass then prunes with
  them. The upper bounds only decide how much is pruned, never what the answer is.

  Args:
    space: the space (allowed pairs).
    cost_table: ``[L, 8, 8]`` costs.
    damage: ``[L, 8, 8]`` damages (any sign).
    limits: float64 ``[Q]`` damage limits (at least one).
    upper: optional float64 ``[Q]`` known upper bounds on the answers' costs (each the cost of
      a policy that meets its limit for sure); tighter bounds prune more.
    beam: points a limit of the beam pass (0: no beam pass).
    max_front: guard on the number of points kept after a layer.

  Returns:
    A :class:`~cimjax.search.baselines.ParetoDP` (cost ascending, damage strictly
    decreasing).

  Raises:
    RuntimeError: the front grew beyond ``max_front``, or the pruning emptied it (a bug).
  """
  opts = layer_options(space, cost_table, damage)
  lim = np.atleast_1d(np.asarray(limits, np.float64))
  tols = _scales(opts, lim)
  opts = drop_dominated_options(opts, *tols)
  bounds = suffix_bounds(opts)
  up, lim = greedy_upper_bounds(bounds, lim, tols[1])
  if upper is not None:
    up = np.minimum(up, np.asarray(upper, np.float64))
  if beam:
    found = _front_pass(opts, bounds, lim, up, tols, beam, max_front)
    if found is not None:
      # the cheapest beam point that surely meets each limit (cost ascending: the first)
      meets = found.damage[:, None] <= lim[None, :] - tols[1]  # [F, Q]
      first = np.argmax(meets, axis=0)
      up = np.where(meets.any(axis=0), np.minimum(up, found.cost[first]), up)
  out = _front_pass(opts, bounds, lim, up, tols, 0, max_front)
  assert out is not None  # the exact pass raises rather than returning None
  return out


__all__ = [
  "LayerOptions",
  "SuffixBounds",
  "TOL",
  "constrained_front",
  "drop_dominated_options",
  "greedy_upper_bounds",
  "layer_options",
  "lower_hull",
  "lp_cost",
  "suffix_bounds",
]
