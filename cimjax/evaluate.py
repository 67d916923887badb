"""Batched candidate evaluator: accuracy and loss of thousands of bit policies, memory-bounded.

``make_evaluator(model, variables, x, y)`` returns a function ``policies [N, L, 2] ->
EvalResult(accuracy [N], loss [N], correct [N])`` that scores every candidate on the same data
with the same shared weights (any-precision QAT makes one weight set serve every policy).

Strategies (``strategy=``):

- ``"loop"``: a Python loop over candidates, each one jitted call that scans the data in
  batches. No per-candidate batching overhead; fastest on CPU, where XLA lowers a vmapped
  conv with per-candidate weights to a grouped convolution that runs slowly (measured, see
  BUILD_NOTES.md).
- ``"vmap"``: ``jit(vmap)`` over chunks of ``chunk`` candidates, each chunk one call that scans
  the data; on GPU/TPU the candidate axis fills the device.
- ``"map"``: the whole candidate batch in ONE jitted call: ``lax.map`` over chunks of
  ``chunk`` candidates (vmapped inside a chunk), scanning the data inside. Memory is bounded
  by the chunk, not by N.
- ``"shard"``: like ``"vmap"``, on a 2-D mesh ``(cand, data)`` of this process's devices
  (``jax.sharding`` Mesh + NamedSharding, shape ``(len(devices) // data_parallel,
  data_parallel)``). Each chunk's candidate axis is sharded over ``"cand"`` (the chunk is
  rounded up to a multiple of ``len(devices) // data_parallel``) and the images of every
  forward batch over ``"data"`` (the batch is rounded up to a multiple of ``data_parallel``;
  the added rows are masked, so counts are unchanged). The per-device program is a
  ``jax.shard_map``: each device scores its candidates on its images and the per-candidate
  sums are ``psum``-ed over ``"data"``, the only collective (GSPMD alone all-gathered parts of
  the vmapped convolution).
  ``data_parallel=1`` (default) shards candidates only and replicates the data; a larger
  ``data_parallel`` serves few candidates on many images (a final re-evaluation of a top-k,
  or fewer candidates than devices). The correct counts equal the single-device run exactly;
  the loss sums agree to float32 rounding (the summation order differs).
- ``"auto"``: ``"loop"`` on CPU, ``"shard"`` with several accelerators, else ``"vmap"``;
  always ``"shard"`` when ``data_parallel > 1``.

How the parallel axes combine: candidates over processes (:class:`cimjax.search.
MultiProcessAccuracy` splits every batch of candidates between the processes of a
``jax.distributed`` run, each process holding the whole split) x this process's local devices
(``jax.local_devices()``) as the ``(cand, data)`` mesh: a chunk's candidates over ``"cand"``,
each forward batch's images over ``"data"``. No collective crosses processes except the
all-gather of the results.

Every strategy computes the same per-candidate function; integer operands make the results
independent of batching (docs/architecture.md), so accuracy equals the single-policy evaluation.

Integer products (``int_mode=``, :data:`cimjax.layers.INT_MODES`): ``"auto"`` (default) is
resolved once when the evaluator is built, by :func:`cimjax.layers.resolve_int_dtype`: int8
operands with int32 sums on GPU/TPU, float32 codes on CPU. Both are exact where the float32
sums are (below 2^24), so the accuracies agree bit for bit there.

:func:`evaluate_policy` is the single-policy evaluator (accuracy in percent and mean loss of
one policy, or of the float model, over masked fixed-size batches); training and the pipeline
use it through :func:`cimjax.train.evaluate`. :func:`cross_entropy` is the per-example loss that
both report.

Peak memory (float32) of one chunk is about::

  bytes ~= 4 * chunk * (batch_size * A + P)

where ``A`` is the activation floats live per image in the forward pass (about the sum over
quantizable layers of ``(n + m) * invocations * repeat``; :func:`activation_floats` gives it
from the layer geometry) and ``P`` the parameter count (each candidate holds its own quantized
copy of the weights). It does not grow with N; data (``x``) is resident once. With
``"shard"`` on ``D = len(devices)`` devices and ``d = data_parallel``, per device::

  bytes ~= 4 * (chunk / (D / d)) * (batch_size / d * A + P) + 4 * num * H * W * C / d

(``chunk`` and ``batch_size`` after rounding up; the images are split over ``"data"`` and
replicated over ``"cand"``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cimjax import data as data_lib
from cimjax import layers as layers_lib
from cimjax import models as models_lib
from cimjax.spec import LayerSpec
from cimjax.variables import FAST_COMPILE

Array = jax.Array
STRATEGIES = ("auto", "loop", "vmap", "map", "shard")


class EvalResult(NamedTuple):
  """Per-candidate results.

  Attributes:
    accuracy: ``[N]`` top-1 accuracy in percent.
    loss: ``[N]`` mean cross-entropy.
    correct: ``[N]`` int number of correct predictions (exact).
  """

  accuracy: np.ndarray
  loss: np.ndarray
  correct: np.ndarray


def activation_floats(specs: Sequence[LayerSpec]) -> int:
  """Floats of layer inputs and outputs per image (the ``A`` of the memory formula)."""
  return int(sum((s.n + s.m) * s.invocations * s.repeat for s in specs))


def chunk_bytes(specs: Sequence[LayerSpec], num_params: int, chunk: int, batch_size: int) -> int:
  """Estimated peak bytes of one evaluation chunk (see the module docstring)."""
  return 4 * chunk * (batch_size * activation_floats(specs) + num_params)


def default_strategy(devices: Sequence[Any] | None = None, data_parallel: int = 1) -> str:
  """The strategy ``"auto"`` resolves to.

  Args:
    devices: the devices (default: ``jax.local_devices()``, this process's devices; the same
      as ``jax.devices()`` in a single-process run).
    data_parallel: images split over this many devices (> 1 needs ``"shard"``).

  Returns:
    ``"shard"`` when ``data_parallel > 1``, else ``"loop"`` on CPU, ``"shard"`` with several
    accelerators, ``"vmap"`` with one.
  """
  if data_parallel > 1:
    return "shard"
  devices = list(devices if devices is not None else jax.local_devices())
  if devices[0].platform == "cpu":
    return "loop"
  return "shard" if len(devices) > 1 else "vmap"


def eval_mesh(devices: Sequence[Any] | None = None, data_parallel: int = 1) -> jax.sharding.Mesh:
  """The ``(cand, data)`` mesh of strategy ``"shard"``.

  Args:
    devices: the devices (default: ``jax.local_devices()``).
    data_parallel: size of the ``"data"`` axis; must divide the device count.

  Returns:
    A mesh of shape ``(len(devices) // data_parallel, data_parallel)``, axes
    ``("cand", "data")``.

  Raises:
    ValueError: ``data_parallel`` < 1 or not a divisor of the device count.
  """
  devs = list(devices if devices is not None else jax.local_devices())
  _check_data_parallel(data_parallel, len(devs))
  grid = np.asarray(devs, dtype=object).reshape(len(devs) // data_parallel, data_parallel)
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(grid, ("cand", "data"), axis_types=(auto, auto))


def _check_data_parallel(data_parallel: Any, num_devices: int | None = None) -> None:
  """Raises ValueError unless ``data_parallel`` is an int >= 1 dividing ``num_devices``."""
  if (
    not isinstance(data_parallel, (int, np.integer))
    or isinstance(data_parallel, bool)
    or data_parallel < 1
  ):
    raise ValueError(f"data_parallel = {data_parallel!r}; allowed: an int >= 1")
  if num_devices is not None and num_devices % data_parallel:
    divisors = ", ".join(str(d) for d in range(1, num_devices + 1) if num_devices % d == 0)
    raise ValueError(
      f"data_parallel = {data_parallel} must divide the {num_devices} device(s) of the "
      f"evaluation mesh; allowed: {divisors}"
    )


def _batch_data(x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[Array, Array, Array]:
  """Pads to whole batches: ``x [nb, B, ...]``, ``y [nb, B]``, ``w [nb, B]`` (0 on padding)."""
  n = x.shape[0]
  nb = max(1, math.ceil(n / batch_size))
  pad = nb * batch_size - n
  xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
  yp = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
  wp = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return (
    jnp.asarray(xp.reshape(nb, batch_size, *x.shape[1:]), jnp.float32),
    jnp.asarray(yp.reshape(nb, batch_size), jnp.int32),
    jnp.asarray(wp.reshape(nb, batch_size)),
  )


def _batch_hits(module: Any, variables: Any, int_dtype: Any) -> Callable[..., tuple[Array, Array]]:
  """``hits(policy, xi [B, ...], yi [B], wi [B]) -> (hit int32 [B], nll [B])`` of one batch."""

  def hits(policy, xi, yi, wi):
    logits, _ = models_lib.forward(module, variables, xi, policy, int_dtype=int_dtype)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, yi[:, None], axis=1)[:, 0]
    hit = (jnp.argmax(logits, axis=-1) == yi).astype(jnp.int32) * (wi > 0).astype(jnp.int32)
    return hit, nll

  return hits


def make_policy_score(
  module: Any, variables: Any, *, int_mode: Any = "auto"
) -> Callable[[Array, Array, Array, Array], tuple[Array, Array]]:
  """The per-candidate function every strategy shares.

  Args:
    module: the Flax module.
    variables: the shared weights.
    int_mode: integer-product mode or dtype (:data:`cimjax.layers.INT_MODES`), resolved here
      once for the default backend.

  Returns:
    ``score(policy [L, 2], xb [nb, B, ...], yb [nb, B], wb [nb, B]) -> (correct, loss_sum)``,
    scanning the data batches (a forward-only scan costs nothing extra on CPU).
  """

  int_dtype = layers_lib.resolve_int_dtype(int_mode)
  batch = _batch_hits(module, variables, int_dtype)

  def score(policy, xb, yb, wb):
    def body(carry, data):
      xi, yi, wi = data
      hit, nll = batch(policy, xi, yi, wi)
      correct, loss = carry
      return (correct + jnp.sum(hit), loss + jnp.sum(nll * wi)), None

    (correct, loss), _ = jax.lax.scan(body, (jnp.int32(0), jnp.float32(0.0)), (xb, yb, wb))
    return correct, loss

  score.int_dtype = int_dtype  # type: ignore[attr-defined]
  return score


def make_policy_hits(
  module: Any, variables: Any, *, int_mode: Any = "auto"
) -> Callable[[Array, Array, Array, Array], Array]:
  """Per-image correctness of one candidate: the same forward as :func:`make_policy_score`.

  Paired comparisons between candidates on the same images (:func:`cimjax.search.runner.
  reevaluate`) need which images each one gets right, not only how many.

  Returns:
    ``hits(policy [L, 2], xb [nb, B, ...], yb [nb, B], wb [nb, B]) -> int32 [nb, B]``: 1 where
    the prediction is right (0 on padding rows, ``wb == 0``); its sum is ``score``'s count.
  """
  batch = _batch_hits(module, variables, layers_lib.resolve_int_dtype(int_mode))

  def hits(policy, xb, yb, wb):
    return jax.lax.map(lambda data: batch(policy, *data)[0], (xb, yb, wb))

  return hits


Runner = Callable[[Array], tuple[np.ndarray, np.ndarray]]  # policies -> (correct, loss sum)
Score = Callable[[Array, Array, Array, Array], tuple[Array, Array]]


def _loop_runner(score: Score, data: tuple[Array, Array, Array]) -> Runner:
  """``"loop"``: one jitted call a candidate."""
  one = jax.jit(score)

  def run(pols: Array) -> tuple[np.ndarray, np.ndarray]:
    out = [one(p, *data) for p in pols]
    return (np.asarray([int(c) for c, _ in out]), np.asarray([float(l) for _, l in out]))

  return run


def _chunked_runner(
  score: Score,
  data: tuple[Array, Array, Array],
  chunk: int,
  devices: Sequence[Any] | None,
  shard: bool,
  data_parallel: int = 1,
) -> Runner:
  """``"vmap"``/``"shard"``: one jitted vmapped call a chunk.

  With ``shard``, on the :func:`eval_mesh` ``(cand, data)``: candidates ``P("cand")``, the
  image axis of every batch ``P(None, "data")`` (its size must be a multiple of
  ``data_parallel``: :func:`make_evaluator` rounds it up). The per-device function is written
  with ``jax.shard_map``: every device scores its own candidates on its own images (the
  ``"vmap"`` computation on a block) and the per-candidate sums are ``psum``-ed over
  ``"data"``, the only collective. (Left to GSPMD, the vmapped convolution, a grouped
  convolution over candidates, was partly all-gathered: measured on 4 host devices.)
  """
  xb, yb, wb = data
  vscore = jax.vmap(score, in_axes=(0, None, None, None))
  size, ncand = chunk, 1
  sharding = None
  if shard:
    mesh = eval_mesh(devices, data_parallel)
    spec = jax.sharding.PartitionSpec
    sharding = jax.sharding.NamedSharding(mesh, spec("cand"))
    ncand = mesh.shape["cand"]
    size = _round_up(chunk, ncand)
    images = spec(None, "data")
    xb, yb, wb = (jax.device_put(a, jax.sharding.NamedSharding(mesh, images)) for a in data)

    def block(p: Array, xs: Array, ys: Array, ws: Array) -> tuple[Array, Array]:
      c, l = vscore(p, xs, ys, ws)
      if data_parallel == 1:
        return c, l
      return jax.lax.psum(c, "data"), jax.lax.psum(l, "data")

    many = jax.jit(
      jax.shard_map(
        block,
        mesh=mesh,
        in_specs=(spec("cand"), images, images, images),
        out_specs=(spec("cand"), spec("cand")),
        check_vma=False,  # the scan carries start unvarying; the psum makes them replicated
      )
    )
  else:
    many = jax.jit(vscore)

  def run(pols: Array) -> tuple[np.ndarray, np.ndarray]:
    n = pols.shape[0]
    step = size if n >= size else _round_up(n, ncand)  # small N: no padding to a full chunk
    padded = _pad_rows(pols, step)
    cs, ls = [], []
    for start in range(0, padded.shape[0], step):
      part = padded[start : start + step]
      if sharding is not None:
        part = jax.device_put(part, sharding)
      c, l = many(part, xb, yb, wb)
      cs.append(np.asarray(c))
      ls.append(np.asarray(l))
    return np.concatenate(cs)[:n], np.concatenate(ls)[:n]

  return run


def _mapped_runner(score: Score, data: tuple[Array, Array, Array], chunk: int) -> Runner:
  """``"map"``: one call for all candidates, chunked inside by ``lax.map``."""
  vscore = jax.vmap(score, in_axes=(0, None, None, None))

  @functools.partial(jax.jit, static_argnums=4)
  def mapped(pols, xb, yb, wb, size):
    groups = pols.reshape(-1, size, *pols.shape[1:])
    c, l = jax.lax.map(lambda g: vscore(g, xb, yb, wb), groups)
    return c.reshape(-1), l.reshape(-1)

  def run(pols: Array) -> tuple[np.ndarray, np.ndarray]:
    n = pols.shape[0]
    size = min(chunk, n)
    c, l = mapped(_pad_rows(pols, size), *data, size)
    return np.asarray(c)[:n], np.asarray(l)[:n]

  return run


def make_evaluator(
  model: Any,
  variables: Any,
  x: np.ndarray,
  y: np.ndarray,
  *,
  strategy: str = "auto",
  chunk: int = 16,
  batch_size: int = 500,
  devices: Sequence[Any] | None = None,
  int_mode: Any = "auto",
  data_parallel: int = 1,
) -> Callable[[Any], EvalResult]:
  """Builds an evaluator of bit policies on a fixed split.

  Args:
    model: a :class:`cimjax.models.ModelDef` or a Flax module (``__call__(x, ctx)``).
    variables: the shared weights ``{"params", ["batch_stats"]}``.
    x: ``[num, H, W, C]`` float32 inputs of the split (normalised).
    y: ``[num]`` int labels.
    strategy: one of :data:`STRATEGIES` (see the module docstring).
    chunk: candidates per vmapped call (``"vmap"``, ``"map"``, ``"shard"``); bounds memory.
    batch_size: images per forward pass; bounds memory.
    devices: devices of the ``"shard"`` mesh (default: ``jax.local_devices()``, this
      process's devices; candidates are split between processes by
      :class:`cimjax.search.MultiProcessAccuracy`, not here).
    int_mode: integer-product mode (:data:`cimjax.layers.INT_MODES`) or dtype; ``"auto"`` is
      resolved once here for the platform of ``devices`` (int8 on GPU/TPU, float32 on CPU).
    data_parallel: devices each forward batch's images are split over (the ``"data"`` axis of
      the ``(cand, data)`` mesh; the other ``len(devices) // data_parallel`` split the
      candidates). Must divide the device count; > 1 needs strategy ``"shard"`` (``"auto"``
      then resolves to it). ``batch_size`` is rounded up to a multiple of it.

  Returns:
    ``evaluate(policies) -> EvalResult`` for policies ``[N, L, 2]`` (or ``[L, 2]``: N = 1), with
    attributes ``strategy``, ``num_images``, ``int_dtype`` (the resolved operand dtype),
    ``data_parallel`` and ``batch_size`` (images per forward pass, after rounding).

  Raises:
    ValueError: unknown strategy, bad chunk/batch size, or a bad ``data_parallel`` (not an
      int >= 1 dividing the device count, or > 1 with a strategy other than ``"shard"`` or
      ``"auto"``).
    cimjax.errors.ConfigError: an unknown ``int_mode``.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy = {strategy!r}; allowed: {', '.join(STRATEGIES)}")
  if chunk < 1 or batch_size < 1:
    raise ValueError(f"chunk = {chunk} and batch_size = {batch_size} must be >= 1")
  _check_data_parallel(data_parallel)
  data_parallel = int(data_parallel)
  if data_parallel > 1 and strategy not in ("shard", "auto"):
    raise ValueError(
      f"data_parallel = {data_parallel} needs strategy 'shard' (or 'auto', which then resolves "
      f"to it); got strategy = {strategy!r}. Allowed with other strategies: data_parallel = 1"
    )
  if strategy == "auto":
    strategy = default_strategy(devices, data_parallel)
  if strategy == "shard":
    devices = list(devices if devices is not None else jax.local_devices())
    _check_data_parallel(data_parallel, len(devices))
  module = getattr(model, "module", model)
  num = int(x.shape[0])
  if num == 0 or y.shape[0] != num:
    raise ValueError(f"x has {num} images and y {y.shape[0]} labels; need equal and > 0")
  platform = list(devices)[0].platform if devices else None
  int_dtype = layers_lib.resolve_int_dtype(int_mode, platform)
  batch = _round_up(min(batch_size, num), data_parallel)  # padded rows are masked (w = 0)
  data = _batch_data(np.asarray(x, np.float32), np.asarray(y), batch)
  score = make_policy_score(module, variables, int_mode=int_dtype)
  if strategy == "loop":
    run = _loop_runner(score, data)
  elif strategy in ("vmap", "shard"):
    run = _chunked_runner(
      score, data, chunk, devices, shard=strategy == "shard", data_parallel=data_parallel
    )
  else:
    run = _mapped_runner(score, data, chunk)

  def evaluate(policies: Any) -> EvalResult:
    pols = jnp.asarray(policies, jnp.int32)
    if pols.ndim == 2:
      pols = pols[None]
    if pols.ndim != 3 or pols.shape[-1] != 2:
      raise ValueError(f"policies must be [N, L, 2] or [L, 2]; got shape {tuple(pols.shape)}")
    correct, loss = run(pols)
    return EvalResult(
      accuracy=100.0 * correct / num, loss=loss / num, correct=correct.astype(np.int64)
    )

  evaluate.strategy = strategy  # type: ignore[attr-defined]
  evaluate.num_images = num  # type: ignore[attr-defined]
  evaluate.int_dtype = int_dtype  # type: ignore[attr-defined]
  evaluate.data_parallel = data_parallel  # type: ignore[attr-defined]
  evaluate.batch_size = batch  # type: ignore[attr-defined]
  return evaluate


def _round_up(n: int, multiple: int) -> int:
  return math.ceil(n / multiple) * multiple


def _pad_rows(pols: Array, multiple: int) -> Array:
  """Pads the candidate axis to a multiple by repeating the last candidate."""
  n = pols.shape[0]
  target = math.ceil(n / multiple) * multiple
  if target == n:
    return pols
  return jnp.concatenate([pols, jnp.repeat(pols[-1:], target - n, axis=0)])


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
  """Per-example softmax cross-entropy.

  Args:
    logits: ``[B, C]``.
    labels: int ``[B]``.
    label_smoothing: mass spread uniformly over the ``C`` classes (training only).

  Returns:
    ``[B]`` losses in nats.
  """
  n = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, n)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / n
  return optax.softmax_cross_entropy(logits, onehot)


def _batch_counts(
  variables: Any,
  x: Array,
  y: Array,
  mask: Array,
  policy: Array | None,
  *,
  module: Any,
  int_dtype: Any = "float32",
) -> tuple[Array, Array]:
  """``(correct, summed loss)`` of one masked batch (float32 scalars)."""
  logits, _ = models_lib.forward(module, variables, x, policy, int_dtype=int_dtype)
  m = mask.astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32) * m)
  loss = jnp.sum(cross_entropy(logits, y) * m)
  return correct, loss


# The module is static (one compilation per model and batch shape); ``fast_compile`` picks the
# XLA options (without the expensive passes: faster compiles, slower batches).
_BATCH_COUNTS = {
  fast: jax.jit(
    _batch_counts,
    static_argnames=("module", "int_dtype"),
    compiler_options=FAST_COMPILE if fast else None,
  )
  for fast in (False, True)
}


def evaluate_policy(
  model: Any,
  variables: Any,
  x: np.ndarray,
  y: np.ndarray,
  policy: Any = None,
  *,
  batch_size: int = 500,
  fast_compile: bool = False,
  int_mode: Any = "auto",
) -> tuple[float, float]:
  """Accuracy and mean loss of one policy (the reference for the batched strategies).

  The data is scanned in batches of exactly ``batch_size`` images (the last one padded and
  masked, as :func:`cimjax.data.eval_batches` does), so one compilation serves every split.
  Batch-norm models use the running statistics in ``variables`` as they are.

  Args:
    model: a :class:`cimjax.models.ModelDef` or a Flax module.
    variables: ``{"params", ["batch_stats"]}``.
    x: ``[num, H, W, C]`` float32 images.
    y: ``[num]`` int labels.
    policy: int ``[L, 2]``, or None for the float model.
    batch_size: images a forward pass.
    fast_compile: compile without XLA's expensive optimisations (small splits, tests).
    int_mode: integer-product mode or dtype (see :func:`make_evaluator`), resolved once here.

  Returns:
    ``(accuracy in percent, mean cross-entropy)``.

  Raises:
    ValueError: no images, or a label count that differs from the image count.
  """
  num = int(np.shape(x)[0])
  if num == 0 or np.shape(y)[0] != num:
    raise ValueError(f"x has {num} images and y {np.shape(y)[0]} labels; need equal and > 0")
  fn = _BATCH_COUNTS[bool(fast_compile)]
  int_dtype = layers_lib.resolve_int_dtype(int_mode)
  module = getattr(model, "module", model)
  pol = None if policy is None else jnp.asarray(policy, jnp.int32)
  split = data_lib.Dataset(np.asarray(x), np.asarray(y), np.arange(num))
  outs = [
    fn(variables, xb, yb, mb, pol, module=module, int_dtype=int_dtype)
    for xb, yb, mb in data_lib.eval_batches(split, batch_size)
  ]
  correct, loss = 0.0, 0.0
  for c, l in jax.device_get(outs):
    correct += float(c)
    loss += float(l)
  return 100.0 * correct / num, loss / num


__all__ = [
  "EvalResult",
  "STRATEGIES",
  "activation_floats",
  "chunk_bytes",
  "cross_entropy",
  "default_strategy",
  "evaluate_policy",
  "make_evaluator",
  "make_policy_hits",
  "make_policy_score",
]
