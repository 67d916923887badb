"""Where the CPU evaluator's time goes: ``python -m launch.profile_eval``.

Profiles the ``loop`` strategy of :mod:`cimjax.evaluate` (the fastest on CPU) on the small
CNN by timing jitted sub-graphs of one candidate's forward over ``--images`` images (in
batches of ``--batch_size``, as the evaluator scans them), each alone with
``block_until_ready``, medians of ``--repeats`` rounds:

* the evaluator itself (``make_evaluator(strategy="loop")`` over ``--n`` candidates) and one
  jitted score call; and a what-if evaluator whose first conv (one input channel) is traced as
  nine shifted multiply-adds (:func:`taps_for_single_channel_convs`), checked to give the same
  correct counts and losses bit for bit;
* the float forward (no quantization: convs, ReLU, pools, dense);
* per layer: the native convolution / dense product alone on pre-quantized integer codes (the
  real codes of a random policy), its FLOP/s, the same product as im2col patches + one dot and
  as kh*kw shifted products ("taps"; both exact for integer codes, checked), the patches alone
  and a plain dot of the im2col shape;
* the elementwise part alone, unfused (an upper bound): every layer's activation and weight
  quantization (clip, divide, round), dequantization, bias, ReLU and max pool, on the real layer
  inputs; and, derived, what quantization adds (score - float forward) and all non-product work
  (score - the sum of the products);
* the tail: log-softmax, NLL, argmax and compare on the logits;
* machine references: the f32 ``jnp.dot`` peak (as ``launch.bench_eval``) and the memory
  bandwidth of a large fused elementwise pass.

Example::

  python -m launch.profile_eval                      # ~1-2 minutes on a 2-core CPU
  python -m launch.profile_eval --images=1000 --n=64 --out=profile_eval.json
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cimjax import cli as cli_lib
from cimjax import data as data_lib
from cimjax import evaluate, models, quant, trace
from cimjax.layers import HIGHEST, conv_kernel_matrices, conv_patches
from launch.bench_eval import dot_peak_flops, synthetic_images

PROG = "launch.profile_eval"
SCORE = "one score call (jitted, quantized forward)"

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_enum(
  "dataset",
  "fashion_mnist",
  ("fashion_mnist", "synthetic"),
  "Evaluation images (synthetic: random 28x28x1, no files).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("images", 1000, "Images a candidate.", flag_values=FLAGS)
flags.DEFINE_integer("n", 64, "Candidates for the evaluator timing.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 500, "Images per forward pass.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Rounds; figures are medians.", flag_values=FLAGS)
flags.DEFINE_integer("calls", 4, "Timed calls per sub-graph per round.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Write the results as JSON here.", flag_values=FLAGS)
for _name in ("images", "n", "batch_size", "repeats", "calls"):
  flags.register_validator(
    _name, lambda v: v >= 1, "allowed values are integers >= 1", flag_values=FLAGS
  )


def _time(fn: Callable[[], Any], calls: int) -> float:
  """Seconds a call (after one untimed call)."""
  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t) / calls


def bandwidth_gbs(mb: int = 64, calls: int = 5) -> float:
  """GB/s of a fused elementwise pass ``round(clip(x / s, 0, 255)) * s`` (read + write)."""
  x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda v: jnp.round(jnp.clip(v / 0.37, 0.0, 255.0)) * 0.37)
  return 2 * x.nbytes / _time(lambda: f(x), calls) / 1e9


def _taps_conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """A 1-input-channel SAME stride-1 NHWC/HWIO convolution as kh*kw shifted multiply-adds
  (one fused elementwise pass; equal to the native conv bit for bit on integer codes, whose
  float32 sums are exact)."""
  kh, kw = rhs.shape[:2]
  # a barrier: without it XLA fuses the input's quantization into each of the kh*kw taps
  # (and every output channel), recomputing it ~kh*kw*C_out times
  lhs = jax.lax.optimization_barrier(lhs)
  vp = jnp.pad(lhs, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = lhs.shape[1:3]
  out = None
  for i in range(kh):
    for j in range(kw):
      t = vp[:, i : i + h, j : j + w, :] * rhs[i, j, 0]
      out = t if out is None else out + t
  return jax.lax.optimization_barrier(out)  # materialized: a fused pool consumer is slow


@contextlib.contextmanager
def taps_for_single_channel_convs() -> Any:
  """While tracing: ``lax.conv_general_dilated`` of a 1-channel, odd-kernel, SAME, stride-1
  NHWC float32 conv runs as :func:`_taps_conv` (a what-if for the evaluator's first conv)."""
  orig = jax.lax.conv_general_dilated

  def conv(lhs, rhs, window_strides, padding, *args, **kw):
    dn = kw.get("dimension_numbers")
    plain = (
      dn == ("NHWC", "HWIO", "NHWC")
      and lhs.ndim == 4
      and lhs.shape[-1] == 1
      and tuple(window_strides) == (1, 1)
      and padding == "SAME"
      and not args
      and kw.get("feature_group_count", 1) == 1
      and rhs.shape[0] % 2 == 1
      and rhs.shape[1] % 2 == 1
      and lhs.dtype == rhs.dtype == jnp.float32
      and "preferred_element_type" not in kw
    )
    if plain:
      return _taps_conv(lhs, rhs)
    return orig(lhs, rhs, window_strides, padding, *args, **kw)

  jax.lax.conv_general_dilated = conv
  try:
    yield
  finally:
    jax.lax.conv_general_dilated = orig


def _acc(cim: Any, name: str) -> jax.Array:
  node = cim
  for part in name.split("/"):
    node = node[part]
  return node["acc"][0]


def profile(
  x: np.ndarray, y: np.ndarray, *, n: int, batch_size: int, repeats: int, calls: int
) -> dict[str, Any]:
  """The sub-graph timings (seconds per candidate over all of ``x``) and the references."""
  md = models.get_model("small_cnn")
  specs = trace.trace_specs(md)
  variables = models.init(md, jax.random.key(0))
  module = md.module
  nb = -(-len(x) // batch_size)
  xb = jnp.asarray(
    np.resize(x, (nb * batch_size, *x.shape[1:])).reshape(nb, batch_size, *x.shape[1:])
  )
  yb = jnp.asarray(np.resize(y, nb * batch_size).reshape(nb, batch_size))
  pols = np.asarray(jax.random.randint(jax.random.key(n), (n, len(specs), 2), 2, 9), np.int32)
  policy = jnp.asarray(pols[0])
  flops = {s.name: 2.0 * s.macs * nb * batch_size for s in specs}

  ev = evaluate.make_evaluator(md, variables, x, y, strategy="loop", batch_size=batch_size)
  score = jax.jit(evaluate.make_policy_score(module, variables, int_mode="float32"))
  wb = jnp.ones(yb.shape, jnp.float32)

  def scan_fwd(policy_or_none):
    def body(c, xi):
      logits, _ = models.forward(module, variables, xi, policy_or_none, int_dtype=jnp.float32)
      return c + jnp.sum(logits), None

    return jax.lax.scan(body, jnp.float32(0), xb)[0]

  float_fwd = jax.jit(lambda: scan_fwd(None))
  # the real codes of each layer (first batch), to time the products alone
  _, cap = models.forward(module, variables, xb[0], policy, capture=True)
  cim = cap["cim"]
  layers = []
  for s in specs:
    node = cim
    for part in s.name.split("/"):
      node = node[part]
    xi, wi = node["x_int"][0], node["w_int"][0]
    layers.append((s, xi, wi))

  def products(s, xi, wi):
    """``{label: (jitted fn, args)}`` of the layer's product on ``nb`` batches of codes."""
    xs = jnp.stack([xi] * nb)  # every batch: the same shapes (an argument, not a constant)
    if s.kind == "Conv2D":

      def native(v, w):
        return jax.lax.conv_general_dilated(
          v, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST
        )

      def patches(v, w):
        return conv_patches(v, w.shape[:2], (1, 1), "SAME")

      def im2col(v, w):
        return jnp.einsum(
          "bhwk,km->bhwm", patches(v, w), conv_kernel_matrices(w, 1)[0], precision=HIGHEST
        )

      def taps(v, w):  # the conv as a sum of kh*kw shifted products (SAME, stride 1)
        kh, kw = w.shape[:2]
        vp = jnp.pad(v, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        h, wd = v.shape[1:3]
        out = None
        for i in range(kh):
          for j in range(kw):
            sl = vp[:, i : i + h, j : j + wd, :]
            t = (
              sl * w[i, j, 0]
              if v.shape[-1] == 1
              else jnp.einsum("bhwc,co->bhwo", sl, w[i, j], precision=HIGHEST)
            )
            out = t if out is None else out + t
        return out

      rows = xi.shape[0] * xi.shape[1] * xi.shape[2]
      a = jnp.ones((nb, rows, s.n), jnp.float32)
      b = jnp.ones((s.n, s.m), jnp.float32)
      per = lambda f: jax.jit(lambda xs, w: [f(xs[i], w) for i in range(nb)])  # noqa: E731
      fns = {
        "native": (per(native), (xs, wi)),
        "im2col": (per(im2col), (xs, wi)),
        "patches": (per(patches), (xs, wi)),
        "taps": (per(taps), (xs, wi)),
        "dot_of_im2col_shape": (per(lambda v, w: jnp.dot(v, w, precision=HIGHEST)), (a, b)),
      }
      ref = native(xi, wi)
      exact = {
        "im2col": bool(jnp.array_equal(ref, im2col(xi, wi))),
        "taps": bool(jnp.array_equal(ref, taps(xi, wi))),
      }
    else:
      dense = lambda v, w: jnp.dot(v.reshape(v.shape[0], -1), w, precision=HIGHEST)  # noqa: E731
      fns = {"native": (jax.jit(lambda xs, w: [dense(xs[i], w) for i in range(nb)]), (xs, wi))}
      exact = {}
    return fns, exact

  prod = {}
  for s, xi, wi in layers:
    prod[s.name] = products(s, xi, wi)

  # the elementwise part alone, on the real layer inputs and accumulators (arguments): every
  # layer's activation and weight quantization, dequantization, bias, ReLU and max pool
  def elementwise(xins, accs, params):
    out = []
    for i, (s, _, _) in enumerate(layers):
      p = params[i]
      bits = policy[i]
      xq, sx = quant.quantize_act(
        xins[i], quant.gather_clip(p["a_clip"], bits[1]), bits[1], signed=s.signed_input
      )
      wq, sw = quant.quantize_weight(p["kernel"], quant.gather_clip(p["w_clip"], bits[0]), bits[0])
      yv = accs[i] * (sx * sw.reshape(-1)) + p["bias"]
      if s.kind == "Conv2D":
        yv = nn.max_pool(nn.relu(yv.reshape(-1, *yv.shape[2:])), (2, 2), (2, 2))
      out += [xq, wq, yv]
    return out

  def layer_params(name):
    p = variables["params"]
    for part in name.split("/"):
      p = p[part]
    return p

  el_args = (
    [jnp.stack([xi * 0.05] * nb) for _, xi, _ in layers],
    [jnp.stack([_acc(cim, s.name)] * nb) for s, _, _ in layers],
    [layer_params(s.name) for s, _, _ in layers],
  )
  elem = jax.jit(elementwise)
  logits = jax.random.normal(jax.random.key(2), (nb, batch_size, 10))

  def tail(logits, yb):
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, yb[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == yb).astype(jnp.int32)
    return jnp.sum(hit), jnp.sum(nll)

  tail_j = jax.jit(tail)
  rounds: dict[str, list[float]] = {}

  def add(k: str, v: float) -> None:
    rounds.setdefault(k, []).append(v)

  ev(pols[:1])  # compiles
  ev_taps = evaluate.make_evaluator(md, variables, x, y, strategy="loop", batch_size=batch_size)
  with taps_for_single_channel_convs():
    ev_taps(pols[:1])  # traces and compiles with conv1 as taps
  same = ev(pols), ev_taps(pols)
  identical = bool(
    np.array_equal(same[0].correct, same[1].correct)
    and np.array_equal(
      np.asarray(same[0].loss).view(np.uint32), np.asarray(same[1].loss).view(np.uint32)
    )
  )
  for _ in range(repeats):
    t = time.perf_counter()
    ev(pols)
    add("evaluator loop (per candidate)", (time.perf_counter() - t) / n)
    t = time.perf_counter()
    ev_taps(pols)
    add("what-if: evaluator loop, conv1 as 9 taps (per candidate)", (time.perf_counter() - t) / n)
    add(
      "one score call (jitted, quantized forward)", _time(lambda: score(policy, xb, yb, wb), calls)
    )
    add("float forward (no quantization)", _time(float_fwd, calls))
    for name, (fns, _) in prod.items():
      for k, (f, args) in fns.items():
        add(f"{name}: {k}", _time(lambda f=f, args=args: f(*args), calls))
    add(
      "elementwise: quantize/dequantize/bias/relu/pool, all layers",
      _time(lambda: elem(*el_args), calls),
    )
    add("tail: log_softmax/nll/argmax/compare", _time(lambda: tail_j(logits, yb), calls))
    print(f"  round done (load {os.getloadavg()[0]:.1f})", flush=True)
  med = {k: statistics.median(v) for k, v in rounds.items()}
  peak = dot_peak_flops(2048)
  bw = bandwidth_gbs()
  total_flops = sum(flops.values())
  q = med["one score call (jitted, quantized forward)"]
  products_s = sum(med[f"{k}: native"] for k in prod)
  derived = {
    "sum of the native products": products_s,
    "score - float forward (what quantization adds)": q - med["float forward (no quantization)"],
    "score - sum of products (all non-product work)": q - products_s,
  }
  return {
    "model": md.name,
    "images": int(len(x)),
    "batch_size": batch_size,
    "n": n,
    "flops_per_candidate": total_flops,
    "layer_flops": flops,
    "exact_on_codes": {k: v[1] for k, v in prod.items() if v[1]},
    "dot_peak_gflops": peak / 1e9,
    "bandwidth_gbs": bw,
    "seconds": med,
    "derived_seconds": derived,
    "what_if_identical_results": identical,
    "rounds": rounds,
    "load": os.getloadavg()[0],
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }


def format_table(r: dict[str, Any]) -> str:
  peak = r["dot_peak_gflops"] * 1e9
  lines = [
    f"profile_eval: {r['model']}, {r['images']} images a candidate (batches of "
    f"{r['batch_size']}), {r['flops_per_candidate'] / 1e9:.2f} GFLOP a candidate; f32 dot peak "
    f"{r['dot_peak_gflops']:.1f} GFLOP/s, elementwise bandwidth {r['bandwidth_gbs']:.1f} GB/s, "
    f"load {r['load']:.1f}",
    f"{'part (one candidate, all images)':62s} {'ms':>8} {'GFLOP/s':>8} {'%peak':>6}",
  ]
  for k, v in r["seconds"].items():
    layer = k.split(":")[0]
    fl = None
    if (
      k.startswith(("evaluator", "what-if"))
      or k.startswith("one score")
      or k.startswith("float forward")
    ):
      fl = r["flops_per_candidate"]
    elif layer in r["layer_flops"] and (
      k.endswith("native") or k.endswith("im2col") or k.endswith("shape")
    ):
      fl = r["layer_flops"][layer]
    g = f"{fl / v / 1e9:8.1f} {100 * fl / v / peak:5.1f}%" if fl else f"{'':8} {'':6}"
    lines.append(f"  {k:60s} {1000 * v:8.2f} {g}")
  for k, v in r["derived_seconds"].items():
    lines.append(
      f"  = {k:58s} {1000 * v:8.2f} ({100 * v / r['seconds'][SCORE]:.0f}% of the score call)"
    )
  lines.append(
    "what-if evaluator (conv1 as taps) gives the real evaluator's correct counts and losses bit "
    f"for bit on all {r['n']} candidates: {r['what_if_identical_results']}"
  )
  lines.append(
    "equal to the native conv bit for bit on the layer's integer codes: "
    + json.dumps(r["exact_on_codes"])
  )
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  """absl entry point."""

  def body() -> None:
    cli_lib.no_positional(argv)
    if FLAGS.dataset == "synthetic":
      x, y = synthetic_images((28, 28, 1), FLAGS.images, 10)
    else:
      splits = data_lib.load_dataset(
        "fashion_mnist", val_size=FLAGS.images, train_size=1000, test_size=0
      )
      x, y = splits.val.images, splits.val.labels
    r = profile(
      x,
      y,
      n=FLAGS.n,
      batch_size=min(FLAGS.batch_size, len(x)),
      repeats=FLAGS.repeats,
      calls=FLAGS.calls,
    )
    cli_lib.emit_result(r, format_table(r), FLAGS.out)

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Entry point of ``python -m launch.profile_eval``."""
  cli_lib.run_console(main, cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
