"""Accuracy sources: what a search calls to score candidate policies.

A source maps policies ``[N, L, 2]`` to top-1 accuracy in percent ``[N]``. It has a host entry
(``source(policies)``, NumPy in and out) and, when it can be traced, a pure JAX function
``source.fn`` (``int32 [N, L, 2] -> float32 [N]``) so the whole search loop can be jitted.

Sources:

- :class:`SyntheticAccuracy`: cheap closed-form models for tests and the latency-side
  benchmark (see its docstring for the formula). ``"additive"`` and ``"saturating"`` are
  monotone functions of a per-layer additive damage, so :func:`cimjax.search.baselines.dp_optimum`
  finds their exact optimum; ``"interaction"`` adds a non-additive term between neighbours.
- :class:`DataAccuracy`: the batched evaluator (:func:`cimjax.evaluate.make_evaluator`) of a
  trained any-precision model on a data split. On CPU its host entry loops over candidates
  (fastest there); ``fn`` vmaps over candidates for accelerators.
- :class:`TableAccuracy`: a lookup table over a whole (small) space, e.g. an exhaustive sweep
  of a :class:`DataAccuracy` (:func:`exhaustive_table`). Jittable, and exactly the numbers the
  wrapped source gave.
- :class:`MemoAccuracy`: a host memo around any source, shared between searches (benchmarks):
  it only avoids recomputation; each search's budget counter still counts its own unique
  evaluations (:mod:`cimjax.search.env`).
- :class:`MultiProcessAccuracy`: splits each batch over the processes of a multi-controller
  run (``jax.distributed``) and all-gathers the results.
"""

from __future__ import annotations

import io as io_lib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import io as cimjax_io
from cimjax.search import space as space_lib
from cimjax.spec import LayerSpec

Array = Any
SYNTHETIC_KINDS = ("additive", "saturating", "interaction")


class AccuracySource:
  """Base class: ``source(policies [N, L, 2]) -> accuracy % [N]`` (NumPy float64).

  Attributes:
    name: short label for reports.
    fn: pure JAX function ``int32 [N, L, 2] -> float32 [N]`` or None (host only).
    preferred_mode: ``"scan"`` when the whole search should be one jitted loop, ``"loop"``
      when a Python loop of jitted agent steps around the host entry is faster.
    chunk: candidates per jitted call of the default host entry (fixed shapes: the last call
      is padded, so values never depend on how a batch was split).
    num_images: images of the split (0: not an image-based source, e.g. synthetic).

  Sources that can score slices of their images (lazy evaluation,
  :mod:`cimjax.search.lazy`) also have ``chunk_correct(policies, start, stop) -> int64 [N]``;
  those that can tell which images each policy gets right (paired comparisons in the final
  re-evaluation) have ``correct_images(policies) -> bool [N, num_images]``.
  """

  name: str = "source"
  fn: Callable[[jax.Array], jax.Array] | None = None
  preferred_mode: str = "loop"
  chunk: int = 64
  num_images: int = 0

  def __call__(self, policies: Array) -> np.ndarray:
    if self.fn is None:
      raise NotImplementedError(f"{type(self).__name__} has no host evaluation")
    return _chunked(self._jit_fn(), np.asarray(policies, np.int32), self.chunk)

  def _jit_fn(self) -> Callable[[jax.Array], jax.Array]:
    f = self.__dict__.get("_jitted")
    if f is None:
      f = jax.jit(self.fn)
      self.__dict__["_jitted"] = f
    return f

  def describe(self) -> dict[str, Any]:
    """JSON-ready description."""
    return {"name": self.name, "kind": type(self).__name__}


def _chunked(f: Callable[[jax.Array], jax.Array], pols: np.ndarray, chunk: int) -> np.ndarray:
  if pols.ndim == 2:
    pols = pols[None]
  n = pols.shape[0]
  if n == 0:
    return np.zeros((0,), np.float64)
  out = []
  for s in range(0, n, chunk):
    part = pols[s : s + chunk]
    k = part.shape[0]
    if k < chunk:
      part = np.concatenate([part, np.repeat(part[-1:], chunk - k, axis=0)])
    out.append(np.asarray(f(jnp.asarray(part)))[:k])
  return np.concatenate(out).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Synthetic


def _first(out: Any) -> Any:
  """The first element of a ``(correct, loss)`` pair; a hits array as it is."""
  return out[0] if isinstance(out, tuple) else out


def noise_gain(bits: Array, xp: Any = np) -> Array:
  """``g(b) = (4^(8-b) - 1) / 255``: quantisation-noise power relative to 4 bits, 0 at 8 bits.

  Uniform quantisation noise has variance proportional to ``4^-b``; ``g(4) = 1``, ``g(2) = 16.06``,
  ``g(8) = 0``.
  """
  b = xp.asarray(bits)
  return (4.0 ** (8.0 - b) - 1.0) / 255.0


class SyntheticAccuracy(AccuracySource):
  """A closed-form accuracy model with per-layer sensitivities from geometry and a seed.

  Damage of layer ``l`` at ``(w, a)``: ``d_l = s_w[l] * g(w) + s_a[l] * g(a)`` with
  :func:`noise_gain` ``g``. Sensitivities::

    r_w[l] = exp(sigma * z_w[l]) * (W_l / geomean(W)) ** -0.25 * e_l
    r_a[l] = exp(sigma * z_a[l]) * (2 if the layer's input is signed else 1) * e_l
    s_w = w_share * drop44 * r_w / sum(r_w);   s_a = (1 - w_share) * drop44 * r_a / sum(r_a)

  where ``z ~ N(0, 1)`` drawn from ``numpy.random.default_rng(seed)``, ``W_l`` the layer's
  weight count (small layers are more sensitive), ``e_l = first_last`` for the first and last
  layer and 1 otherwise. So uniform 4/4 loses ``drop44`` points (default 2.0), uniform 5/5
  about a quarter of that, 8/8 nothing. With ``D = sum_l d_l``:

  - ``"additive"``: ``acc = acc8 - D`` (may go below chance: it is a model, not a classifier);
  - ``"saturating"``: ``acc = floor + (acc8 - floor) * exp(-D / (acc8 - floor))``, which is
    ``acc8 - D`` for small ``D`` and tends to ``floor`` (chance, 10 %);
  - ``"interaction"``: as saturating with ``D + gamma * sum_l sqrt(d_l * d_{l+1})``:
    neighbouring low-precision layers compound (not separable; no exact DP).

  Args:
    specs: layer geometry (policy order).
    kind: one of :data:`SYNTHETIC_KINDS`.
    seed: sensitivity seed.
    acc8: accuracy at 8/8 (percent).
    drop44: points lost at uniform 4/4.
    floor: chance accuracy of the saturating kinds.
    sigma: log-normal spread of the sensitivities.
    w_share: share of ``drop44`` due to weights.
    first_last: sensitivity multiplier of the first and last layer.
    gamma: neighbour interaction strength (``"interaction"``).
  """

  preferred_mode = "scan"

  def __init__(
    self,
    specs: Sequence[LayerSpec],
    *,
    kind: str = "additive",
    seed: int = 0,
    acc8: float = 90.0,
    drop44: float = 2.0,
    floor: float = 10.0,
    sigma: float = 0.5,
    w_share: float = 0.5,
    first_last: float = 2.0,
    gamma: float = 0.5,
  ):
    if kind not in SYNTHETIC_KINDS:
      raise ValueError(f"kind = {kind!r}; allowed: {', '.join(SYNTHETIC_KINDS)}")
    num = len(specs)
    if num < 1:
      raise ValueError("SyntheticAccuracy needs at least one layer")
    rng = np.random.default_rng(seed)
    z_w, z_a = rng.standard_normal(num), rng.standard_normal(num)
    wc = np.asarray([max(s.weight_count, 1) for s in specs], np.float64)
    geo = (wc / np.exp(np.mean(np.log(wc)))) ** -0.25
    edge = np.ones(num)
    edge[0] = edge[-1] = first_last
    signed = np.asarray([2.0 if s.signed_input else 1.0 for s in specs])
    r_w = np.exp(sigma * z_w) * geo * edge
    r_a = np.exp(sigma * z_a) * signed * edge
    self.s_w = w_share * drop44 * r_w / r_w.sum()
    self.s_a = (1.0 - w_share) * drop44 * r_a / r_a.sum()
    self.kind, self.seed, self.acc8, self.drop44, self.floor = kind, seed, acc8, drop44, floor
    self.sigma, self.w_share, self.first_last, self.gamma = sigma, w_share, first_last, gamma
    self.name = f"synthetic-{kind}"
    g = noise_gain(np.arange(1, space_lib.TABLE_BITS + 1, dtype=np.float64))
    self.damage = (
      self.s_w[:, None, None] * g[None, :, None] + self.s_a[:, None, None] * g[None, None, :]
    )  # [L, 8, 8] float64
    damage32 = jnp.asarray(self.damage, jnp.float32)
    self.fn = lambda policies: self._accuracy(damage32, policies, jnp)

  @property
  def separable(self) -> bool:
    """Whether accuracy is a decreasing function of ``sum_l damage[l, w_l-1, a_l-1]``."""
    return self.kind in ("additive", "saturating")

  def acc_of_damage(self, total: Array, xp: Any = np) -> Array:
    """Accuracy from the total damage ``D`` (separable kinds; decreasing in ``D``)."""
    total = xp.asarray(total)
    if self.kind == "additive":
      return self.acc8 - total
    span = self.acc8 - self.floor
    return self.floor + span * xp.exp(-total / span)

  def _accuracy(self, damage: Array, policies: Array, xp: Any) -> Array:
    p = xp.asarray(policies)
    num = damage.shape[0]
    d = damage[xp.arange(num), p[..., 0] - 1, p[..., 1] - 1]  # [..., L]
    total = d.sum(axis=-1)
    if self.kind == "interaction":
      if num > 1:
        total = total + self.gamma * xp.sqrt(d[..., 1:] * d[..., :-1]).sum(axis=-1)
      span = self.acc8 - self.floor
      return self.floor + span * xp.exp(-total / span)
    return self.acc_of_damage(total, xp)

  def exact(self, policies: Array) -> np.ndarray:
    """Float64 NumPy accuracy (the reference of the exact optimum)."""
    p = np.asarray(policies)
    return self._accuracy(self.damage, p if p.ndim == 3 else p[None], np)

  def describe(self) -> dict[str, Any]:
    return {
      "name": self.name,
      "kind": "SyntheticAccuracy",
      "model": self.kind,
      "seed": self.seed,
      "acc8": self.acc8,
      "drop44": self.drop44,
      "floor": self.floor,
      "sigma": self.sigma,
      "w_share": self.w_share,
      "first_last": self.first_last,
      "gamma": self.gamma,
    }


# ----------------------------------------------------------------------------------------------
# Real data


class DataAccuracy(AccuracySource):
  """Top-1 accuracy of a trained (any-precision) model on a data split, per policy.

  The host entry is :func:`cimjax.evaluate.make_evaluator` (``strategy="auto"``: a loop on
  CPU, sharded chunks over several accelerators). ``fn`` is the same per-candidate scoring
  vmapped over candidates inside ``lax.map`` chunks, for a fully jitted search on accelerators.

  Args:
    model: :class:`cimjax.models.ModelDef` (or a Flax module).
    variables: shared weights ``{"params", ["batch_stats"]}``. Batch-norm statistics are used
      as stored (not re-estimated per policy).
    x: ``[num, H, W, C]`` normalised images of the split.
    y: ``[num]`` labels.
    strategy: evaluator strategy (``cimjax.evaluate.STRATEGIES``).
    chunk: candidates per vmapped call.
    batch_size: images per forward pass.
    name: label.
    data_parallel: devices each forward batch's images are split over in the host entry
      (``make_evaluator(data_parallel=)``: a ``(cand, data)`` mesh of this process's devices;
      > 1 needs ``strategy`` ``"shard"`` or ``"auto"``, and must divide the device count).
  """

  def __init__(
    self,
    model: Any,
    variables: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    strategy: str = "auto",
    chunk: int = 16,
    batch_size: int = 500,
    name: str = "data",
    data_parallel: int = 1,
  ):
    from cimjax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

    self.name = name
    self.num_images = int(x.shape[0])
    self._evaluate = eval_lib.make_evaluator(
      model,
      variables,
      x,
      y,
      strategy=strategy,
      chunk=chunk,
      batch_size=batch_size,
      data_parallel=data_parallel,
    )
    self.strategy = self._evaluate.strategy
    self.data_parallel = self._evaluate.data_parallel
    self.preferred_mode = "loop" if self.strategy == "loop" else "scan"
    module = getattr(model, "module", model)
    score = eval_lib.make_policy_score(module, variables)
    xb, yb, wb = eval_lib._batch_data(  # pylint: disable=protected-access
      np.asarray(x, np.float32), np.asarray(y), min(batch_size, self.num_images)
    )
    vscore = jax.vmap(score, in_axes=(0, None, None, None))
    num, vchunk = self.num_images, chunk

    def fn(policies: jax.Array) -> jax.Array:
      n = policies.shape[0]
      pad = (-n) % vchunk
      p = jnp.concatenate([policies, jnp.repeat(policies[-1:], pad, axis=0)]) if pad else policies
      c, _ = jax.lax.map(lambda g: vscore(g, xb, yb, wb), p.reshape(-1, vchunk, *p.shape[1:]))
      return (100.0 * c.reshape(-1)[:n].astype(jnp.float32)) / num

    self.fn = fn
    self.seconds = 0.0
    self.evaluated = 0
    self.image_passes = 0
    self._x, self._y = np.asarray(x, np.float32), np.asarray(y)
    self._batch_size, self._vchunk = batch_size, chunk
    self._score = jax.jit(score)  # one compilation per slice shape (data are arguments)
    self._vscore = jax.jit(vscore)
    hits = eval_lib.make_policy_hits(module, variables)
    self._hits, self._vhits = jax.jit(hits), jax.jit(jax.vmap(hits, in_axes=(0, None, None, None)))
    self._slices: dict[tuple[int, int], tuple[jax.Array, jax.Array, jax.Array]] = {}

  def chunk_correct(self, policies: Array, start: int, stop: int) -> np.ndarray:
    """int64 ``[N]`` correct predictions of each policy on images ``[start, stop)``.

    The same per-candidate function as the full evaluation on a slice of the split (images
    are classified independently of their batch: integer operands, stored batch-norm
    statistics), so the counts of consecutive slices add up to the full split's count.
    Equal-sized slices share one compilation.
    """
    out = self._per_candidate(policies, start, stop, hits=False)
    return out.astype(np.int64)

  def correct_images(self, policies: Array) -> np.ndarray:
    """bool ``[N, num_images]``: which images each policy classifies correctly.

    The same per-candidate forward as the counts (row sums equal :meth:`chunk_correct` over
    the whole split); for paired comparisons on the same images
    (:func:`cimjax.search.runner.reevaluate`).
    """
    return self._per_candidate(policies, 0, self.num_images, hits=True).astype(bool)

  def _per_candidate(self, policies: Array, start: int, stop: int, *, hits: bool) -> np.ndarray:
    """Counts ``[N]`` (or hits ``[N, stop - start]``) of each policy on images ``[start, stop)``."""
    from cimjax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top

    pols = np.asarray(policies, np.int32)
    if pols.ndim == 2:
      pols = pols[None]
    if not 0 <= start < stop <= self.num_images:
      raise ValueError(f"image slice [{start}, {stop}) outside [0, {self.num_images})")
    if pols.shape[0] == 0:
      return np.zeros((0, stop - start) if hits else (0,), np.int64)
    t0 = time.perf_counter()
    data = self._slices.get((start, stop))
    if data is None:
      data = eval_lib._batch_data(  # pylint: disable=protected-access
        self._x[start:stop], self._y[start:stop], min(self._batch_size, stop - start)
      )
      self._slices[(start, stop)] = data
    one, many = (self._hits, self._vhits) if hits else (self._score, self._vscore)
    if self.strategy == "loop":
      out = np.stack([np.asarray(_first(one(jnp.asarray(p), *data))) for p in pols])
    else:
      n, size = pols.shape[0], self._vchunk
      pad = np.concatenate([pols, np.repeat(pols[-1:], (-n) % size, axis=0)])
      parts = [
        np.asarray(_first(many(jnp.asarray(pad[i : i + size]), *data)))
        for i in range(0, pad.shape[0], size)
      ]
      out = np.concatenate(parts)[:n]
    if hits:
      out = out.reshape(pols.shape[0], -1)[:, : stop - start]  # [N, nb, B] less the padding
    self.seconds += time.perf_counter() - t0
    self.image_passes += pols.shape[0] * (stop - start)
    return out

  def __call__(self, policies: Array) -> np.ndarray:
    pols = np.asarray(policies, np.int32)
    if pols.ndim == 2:
      pols = pols[None]
    if pols.shape[0] == 0:
      return np.zeros((0,), np.float64)
    t0 = time.perf_counter()
    res = self._evaluate(pols)
    self.seconds += time.perf_counter() - t0
    self.evaluated += pols.shape[0]
    self.image_passes += pols.shape[0] * self.num_images
    return np.asarray(res.accuracy, np.float64)

  def describe(self) -> dict[str, Any]:
    return {
      "name": self.name,
      "kind": "DataAccuracy",
      "images": self.num_images,
      "strategy": self.strategy,
      "data_parallel": self.data_parallel,
    }


# ----------------------------------------------------------------------------------------------
# Tables, memo, multi-process


class TableAccuracy(AccuracySource):
  """Accuracy looked up in a table over a whole space (mixed-radix order of the space).

  Args:
    space: the space the table covers (policies outside it are not supported).
    table: ``[space.size]`` accuracies in percent, in :func:`cimjax.search.space.enumerate_policies`
      order.
    name: label.
  """

  preferred_mode = "scan"

  def __init__(self, space: space_lib.SearchSpace, table: np.ndarray, name: str = "table"):
    table = np.asarray(table, np.float64)
    if table.shape != (space.size,):
      raise ValueError(f"table has shape {table.shape}; the space has {space.size} policies")
    self.space, self.table, self.name = space, table, name
    t32 = jnp.asarray(table, jnp.float32)
    self.fn = lambda p: t32[space_lib.option_indices(space, p, jnp)]

  def __call__(self, policies: Array) -> np.ndarray:
    p = np.asarray(policies)
    if p.ndim == 2:
      p = p[None]
    self.space.check(p)
    return self.table[space_lib.option_indices(self.space, p, np)]

  def describe(self) -> dict[str, Any]:
    return {"name": self.name, "kind": "TableAccuracy", "size": int(self.table.shape[0])}


def exhaustive_table(
  source: AccuracySource,
  space: space_lib.SearchSpace,
  *,
  chunk: int = 512,
  path: str | os.PathLike[str] | None = None,
  progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
  """Evaluates every policy of ``space`` with ``source`` (resumable through ``path``).

  Args:
    source: the accuracy source.
    space: a space small enough to enumerate.
    chunk: policies per call of ``source``.
    path: optional ``.npz`` file; partial progress is saved atomically after every chunk and
      resumed from, so a killed sweep continues where it stopped.
    progress: optional ``progress(done, total)``.

  Returns:
    float64 ``[space.size]`` accuracies in enumeration order.
  """
  size = space.size
  acc = np.full((size,), np.nan)
  done = 0
  p = Path(path) if path is not None else None
  if p is not None and p.is_file():
    with np.load(p, allow_pickle=False) as z:
      if int(z["size"]) == size and np.array_equal(z["mask"], space.mask):
        acc, done = np.asarray(z["acc"], np.float64), int(z["done"])
  while done < size:
    pols = space_lib.enumerate_policies(space, done, chunk)
    acc[done : done + pols.shape[0]] = source(pols)
    done += pols.shape[0]
    if p is not None:
      _save_npz(p, acc=acc, done=np.int64(done), size=np.int64(size), mask=space.mask)
    if progress is not None:
      progress(done, size)
  return acc


def _save_npz(path: Path, **arrays: Any) -> None:
  """Atomic, fsynced ``.npz`` (via :func:`cimjax.io.write_bytes`)."""
  buf = io_lib.BytesIO()
  np.savez(buf, **arrays)
  cimjax_io.write_bytes(path, buf.getvalue())


class MemoAccuracy(AccuracySource):
  """Host memo around a source: a policy is computed once across all searches sharing it.

  It never changes values, only avoids recomputation (benchmarks run several agents and seeds
  on the same weights and split). Each search's budget still counts every policy that search
  evaluated for the first time.

  Attributes:
    computed: policies the inner source computed.
    hits: lookups answered from the memo.
  """

  def __init__(self, inner: AccuracySource):
    self.inner = inner
    self.name = inner.name
    self.fn = inner.fn
    self.preferred_mode = inner.preferred_mode
    self._memo: dict[bytes, float] = {}
    self.computed = 0
    self.hits = 0
    self.num_images = int(getattr(inner, "num_images", 0) or 0)
    self._chunks: dict[tuple[bytes, int, int], int] = {}
    if callable(getattr(inner, "chunk_correct", None)):
      self.chunk_correct = self._chunk_correct
    if callable(getattr(inner, "correct_images", None)):
      self.correct_images = inner.correct_images  # not memoised (a final re-evaluation, once)

  def _chunk_correct(self, policies: Array, start: int, stop: int) -> np.ndarray:
    """int64 ``[N]`` correct predictions on images ``[start, stop)`` (memoised per slice; only
    when the inner source has ``chunk_correct``)."""
    pols = np.asarray(policies, np.int32)
    if pols.ndim == 2:
      pols = pols[None]
    keys = [(space_lib.policy_bytes(p), int(start), int(stop)) for p in pols]
    todo, seen = [], set()
    for i, k in enumerate(keys):
      if k not in self._chunks and k not in seen:
        todo.append(i)
        seen.add(k)
    if todo:
      vals = self.inner.chunk_correct(pols[todo], start, stop)
      for i, v in zip(todo, vals):
        self._chunks[keys[i]] = int(v)
    return np.asarray([self._chunks[k] for k in keys], np.int64)

  def __call__(self, policies: Array) -> np.ndarray:
    pols = np.asarray(policies, np.int32)
    if pols.ndim == 2:
      pols = pols[None]
    keys = [space_lib.policy_bytes(p) for p in pols]
    todo, seen = [], set()
    for i, k in enumerate(keys):
      if k not in self._memo and k not in seen:
        todo.append(i)
        seen.add(k)
    if todo:
      vals = self.inner(pols[todo])
      for i, v in zip(todo, vals):
        self._memo[keys[i]] = float(v)
      self.computed += len(todo)
    self.hits += len(keys) - len(todo)
    return np.asarray([self._memo[k] for k in keys], np.float64)

  def __len__(self) -> int:
    return len(self._memo)

  def save(self, path: str | os.PathLike[str], tag: str = "") -> None:
    """Writes the memo to an ``.npz`` (policies int8 ``[N, L, 2]``, accuracies), atomically.

    Args:
      path: the file.
      tag: what the accuracies belong to (model weights, images, ...); :meth:`load` refuses a
        file whose tag differs, so a memo is never reused for another checkpoint or split.
    """
    if not self._memo:
      return
    keys = list(self._memo)
    pols = np.stack([np.frombuffer(k, np.int8) for k in keys])
    num = pols.shape[1] // 2
    _save_npz(
      Path(path),
      policies=pols.reshape(-1, num, 2),
      accuracy=np.asarray([self._memo[k] for k in keys], np.float64),
      tag=np.asarray(tag),
    )

  def load(self, path: str | os.PathLike[str], tag: str = "") -> int:
    """Adds the entries of a file written by :meth:`save` (if it exists); returns how many.

    Raises:
      ValueError: the file was saved with another ``tag`` (stale memo).
    """
    p = Path(path)
    if not p.is_file():
      return 0
    with np.load(p, allow_pickle=False) as z:
      pols, acc = z["policies"], z["accuracy"]
      saved = str(z["tag"]) if "tag" in z.files else ""
    if saved != tag:
      raise ValueError(
        f"{p}: accuracy memo of another source (tag {saved!r}, expected "
        f"{tag!r}); delete it or use another workdir"
      )
    for pol, a in zip(pols, acc):
      self._memo[space_lib.policy_bytes(pol)] = float(a)
    return int(acc.shape[0])

  def describe(self) -> dict[str, Any]:
    return {**self.inner.describe(), "memo": True}


class MultiProcessAccuracy(AccuracySource):
  """Splits every batch over the processes of a ``jax.distributed`` run.

  Each process evaluates a contiguous block of the (padded) batch with its own ``inner``
  source (e.g. a :class:`DataAccuracy` on its local devices) and the blocks are all-gathered,
  so every process returns the full, identical result. All processes must call it with the
  same batch (the search loop is replicated: same seed, same agent steps).

  Args:
    inner: the per-process source.
    block: candidates per process are padded to a multiple of this (fixed shapes).
  """

  def __init__(self, inner: AccuracySource, block: int = 8):
    self.inner, self.block = inner, int(block)
    self.name = inner.name
    self.num_images = inner.num_images  # each candidate is scored on every image, once
    self.fn = inner.fn
    self.preferred_mode = "loop"
    if callable(getattr(inner, "correct_images", None)):
      self.correct_images = self._correct_images

  def __call__(self, policies: Array) -> np.ndarray:
    # float64 travels bit-exactly as pairs of uint32 (jax arrays are 32-bit by default).
    out = self._split(policies, lambda p: np.ascontiguousarray(self.inner(p), np.float64))
    return out.view(np.float64).reshape(-1)

  def _correct_images(self, policies: Array) -> np.ndarray:
    """bool ``[N, num_images]`` (the inner source's ``correct_images``), split like a batch."""
    out = self._split(policies, lambda p: np.asarray(self.inner.correct_images(p), np.uint8))
    return out.astype(bool).reshape(-1, self.num_images)

  def _split(self, policies: Array, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` of this process's block of the padded batch, all-gathered: ``[N, ...]`` raw."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    pols = np.asarray(policies, np.int32)
    if pols.ndim == 2:
      pols = pols[None]
    n, procs, me = pols.shape[0], jax.process_count(), jax.process_index()
    if n == 0:
      return np.zeros((0, 0), np.uint32)  # views as float64 [0, 0] and reshapes to [0, ...]
    per = math.ceil(n / procs / self.block) * self.block
    padded = np.concatenate([pols, np.repeat(pols[-1:], per * procs - n, axis=0)])
    mine = np.ascontiguousarray(fn(padded[me * per : (me + 1) * per]))
    raw = mine.view(np.uint32) if mine.dtype == np.float64 else mine
    every = np.ascontiguousarray(np.asarray(multihost_utils.process_allgather(raw), raw.dtype))
    return every.reshape(procs * per, -1)[:n].view(mine.dtype)

  def describe(self) -> dict[str, Any]:
    return {**self.inner.describe(), "processes": jax.process_count()}


__all__ = [
  "AccuracySource",
  "DataAccuracy",
  "MemoAccuracy",
  "MultiProcessAccuracy",
  "SYNTHETIC_KINDS",
  "SyntheticAccuracy",
  "TableAccuracy",
  "exhaustive_table",
  "noise_gain",
]
