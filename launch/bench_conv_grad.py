"""XLA's convolution gradient against :func:`cimjax.models.conv_grad.conv2d`'s:
``python -m launch.bench_conv_grad``.

On the reference work's CNN (28x28x1 images; conv 1->32, conv 32->64 + 2x2 max pool, conv
64->128 + pool, dense 6272->256->10; all 3x3 SAME), measures:

* **ops**: per conv layer, the filter gradient and the input gradient alone (jitted,
  ``block_until_ready``), ``lax.conv_general_dilated``'s own VJP against ``conv2d``'s, in ms
  and GFLOP/s (``2 * N * H_out * W_out * kh * kw * C * O`` a gradient); conv1's input gradient
  is left out (a training step never computes it);
* **step**: the whole fp32 training step (forward, backward, AdamW; a plain-JAX model with
  :func:`max_pool_2x2` pools) in img/s with each conv, and the largest absolute difference of
  the parameters after ``--compare_steps`` steps from the same start (float rounding only:
  the filter gradient's partial sums are added in another order).

The step here is a plain-JAX model: on 2026-12-02 cimjax's own fp32 stage step of the same CNN
was faster with lax convs than this one (324 vs 239 img/s) and gained only ~5 % from conv2d, so
this part overstates what wiring conv2d into ``cimjax.layers`` buys.

Every figure is the median of ``--repeats`` rounds; within a round the two variants run back to
back (lax first, then conv2d), so a shared CPU's load changes hit both alike. The load average is
recorded at the start and the end.

Example::

  python -m launch.bench_conv_grad                       # ~2 minutes on a shared 2-core CPU
  python -m launch.bench_conv_grad --parts=step --repeats=9 --out=bench_conv_grad.json
  python -m launch.bench_conv_grad --chunk=8             # images per filter-gradient chunk
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from cimjax import cli as cli_lib
from cimjax.models.conv_grad import chunk_size, conv2d
from cimjax.models.pooling import max_pool_2x2

PROG = "launch.bench_conv_grad"
PARTS = ("ops", "step")
# the reference CNN: (C_in, C_out, H = W, 2x2 max pool after)
LAYERS = ((1, 32, 28, False), (32, 64, 28, True), (64, 128, 14, True))
HIDDEN = 256
DN = ("NHWC", "HWIO", "NHWC")

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_integer("batch_size", 128, "Images a step.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 3, "Timed calls per measurement.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 7, "Rounds; figures are medians over them.", flag_values=FLAGS)
flags.DEFINE_integer("compare_steps", 5, "Steps before comparing parameters.", flag_values=FLAGS)
flags.DEFINE_integer(
  "chunk", 0, "Images per filter-gradient chunk (0: conv2d's default).", flag_values=FLAGS
)
flags.DEFINE_list("parts", list(PARTS), f"Subset of: {', '.join(PARTS)}.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Write the results as JSON here.", flag_values=FLAGS)
flags.register_validator(
  "parts",
  lambda v: bool(v) and all(x in PARTS for x in v),
  f"allowed values are {', '.join(PARTS)}",
  flag_values=FLAGS,
)
for _name, _lo in (("batch_size", 1), ("steps", 1), ("repeats", 1), ("compare_steps", 1)):
  flags.register_validator(
    _name, lambda v, lo=_lo: v >= lo, f"allowed values are integers >= {_lo}", flag_values=FLAGS
  )
flags.register_validator(
  "chunk", lambda v: v >= 0, "allowed values are integers >= 0", flag_values=FLAGS
)


def load_average() -> float | None:
  """The 1-minute load average (None where unknown)."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def lax_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def convs(chunk: int) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
  """``{"lax": lax conv, "conv2d": conv2d}``, both 3x3 SAME stride 1."""

  def fast(x: jax.Array, w: jax.Array) -> jax.Array:
    return conv2d(x, w, strides=(1, 1), padding="SAME", chunk=chunk or None)

  return {"lax": lax_conv, "conv2d": fast}


def interleaved(
  fns: dict[str, Callable[[], Any]], steps: int, repeats: int
) -> dict[str, list[float]]:
  """Seconds per call of each ``fn`` (blocking), one warm-up call each, then ``repeats``
  rounds of ``steps`` calls per fn, the fns back to back within a round."""
  for f in fns.values():
    jax.block_until_ready(f())
  out: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(f())
      out[k].append((time.perf_counter() - t) / steps)
  return out


# ----------------------------------------------------------------------------------------------
# ops


def bench_ops(a: dict[str, Any]) -> dict[str, Any]:
  """Each conv layer's filter and input gradient alone, lax vs conv2d."""
  bs = a["batch_size"]
  cv = convs(a["chunk"])
  key = jax.random.key(1)
  rows: dict[str, Any] = {}
  for i, (c_in, c_out, hw, _) in enumerate(LAYERS):
    k = jax.random.split(jax.random.fold_in(key, i), 3)
    x = jax.random.normal(k[0], (bs, hw, hw, c_in))
    w = jax.random.normal(k[1], (3, 3, c_in, c_out)) * 0.1
    g = jax.random.normal(k[2], (bs, hw, hw, c_out))
    flop = 2 * bs * hw * hw * 9 * c_in * c_out
    kinds = (("filter", 1), ("input", 0)) if i else (("filter", 1),)
    for kind, arg in kinds:
      fns = {
        name: jax.jit(lambda x, w, g, c=c, arg=arg: jax.vjp(c, x, w)[1](g)[arg])
        for name, c in cv.items()
      }
      ref = np.asarray(fns["lax"](x, w, g))
      err = float(np.max(np.abs(np.asarray(fns["conv2d"](x, w, g)) - ref)) / np.max(np.abs(ref)))
      calls = {n: (lambda f=f, args=(x, w, g): f(*args)) for n, f in fns.items()}
      t = interleaved(calls, a["steps"], a["repeats"])
      med = {n: statistics.median(v) for n, v in t.items()}
      rows[f"conv{i + 1} {kind} gradient"] = {
        "ms": {n: 1e3 * v for n, v in med.items()},
        "gflop_s": {n: flop / v / 1e9 for n, v in med.items()},
        "speedup": med["lax"] / med["conv2d"],
        "max_rel_err": err,
        "chunk": (a["chunk"] or chunk_size(x.shape, g.shape)) if kind == "filter" else None,
        "load": load_average(),
      }
      print(f"  conv{i + 1} {kind} gradient: {_fmt_row(rows[f'conv{i + 1} {kind} gradient'])}")
  return rows


# ----------------------------------------------------------------------------------------------
# the whole step


def init_params(key: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
  """The reference CNN's ``[(kernel, bias)]``, He-normal convs, LeCun-normal dense layers."""
  ps, hw = [], 28
  for c_in, c_out, _, pool in LAYERS:
    key, k = jax.random.split(key)
    ps.append(
      (jax.random.normal(k, (3, 3, c_in, c_out)) * (2 / (9 * c_in)) ** 0.5, jnp.zeros(c_out))
    )
    hw = hw // 2 if pool else hw
  for n_in, n_out in ((LAYERS[-1][1] * hw * hw, HIDDEN), (HIDDEN, 10)):
    key, k = jax.random.split(key)
    ps.append((jax.random.normal(k, (n_in, n_out)) * n_in**-0.5, jnp.zeros(n_out)))
  return ps


def make_loss(conv: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable[..., jax.Array]:
  def loss(ps: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    for (w, b), (_, _, _, pool) in zip(ps[:3], LAYERS):
      x = jax.nn.relu(conv(x, w) + b)
      if pool:
        x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ ps[3][0] + ps[3][1])
    logits = x @ ps[4][0] + ps[4][1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  return loss


def make_step(conv: Callable[[jax.Array, jax.Array], jax.Array], opt: Any) -> Callable[..., Any]:
  grad = jax.value_and_grad(make_loss(conv))

  @jax.jit
  def step(ps: Any, st: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
    l, g = grad(ps, x, y)
    up, st = opt.update(g, st, ps)
    return optax.apply_updates(ps, up), st, l

  return step


def bench_step(a: dict[str, Any]) -> dict[str, Any]:
  """img/s of the fp32 step with each conv; parameter difference after compare_steps."""
  bs = a["batch_size"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((bs, 28, 28, 1), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 10, bs).astype(np.int32))
  opt = optax.adamw(1e-3, weight_decay=1e-4)
  p0 = init_params(jax.random.key(0))
  s0 = opt.init(p0)
  steps = {name: make_step(c, opt) for name, c in convs(a["chunk"]).items()}
  final = {}
  for name, step in steps.items():
    ps, st = p0, s0
    for _ in range(a["compare_steps"]):
      ps, st, _ = step(ps, st, x, y)
    final[name] = ps
  diff = max(
    float(jnp.max(jnp.abs(u - v)))
    for u, v in zip(jax.tree.leaves(final["lax"]), jax.tree.leaves(final["conv2d"]))
  )
  # time the step on fixed inputs (the state does not feed back: same work every call)
  fns = {n: (lambda f=f: f(p0, s0, x, y)) for n, f in steps.items()}
  t = interleaved(fns, a["steps"], a["repeats"])
  med = {n: statistics.median(v) for n, v in t.items()}
  r = {
    "img_s": {n: bs / v for n, v in med.items()},
    "ms": {n: 1e3 * v for n, v in med.items()},
    "speedup": med["lax"] / med["conv2d"],
    "rounds_conv2d_faster": sum(u > v for u, v in zip(t["lax"], t["conv2d"])),
    "rounds": a["repeats"],
    "params_max_abs_diff": diff,
    "compare_steps": a["compare_steps"],
    "load": load_average(),
  }
  print(
    f"  step: lax {r['img_s']['lax']:.1f} img/s, conv2d {r['img_s']['conv2d']:.1f} img/s "
    f"({r['speedup']:.2f}x, faster in {r['rounds_conv2d_faster']}/{r['rounds']} rounds), "
    f"params max |diff| after {a['compare_steps']} steps {diff:.2e}"
  )
  return r


# ----------------------------------------------------------------------------------------------
# report


def _fmt_row(v: dict[str, Any]) -> str:
  return (
    f"lax {v['ms']['lax']:7.2f} ms {v['gflop_s']['lax']:6.1f} GF/s | conv2d "
    f"{v['ms']['conv2d']:7.2f} ms {v['gflop_s']['conv2d']:6.1f} GF/s | {v['speedup']:.2f}x"
  )


def format_table(r: dict[str, Any]) -> str:
  lines = [
    f"bench_conv_grad: reference CNN, batch {r['batch_size']}, backend {r['backend']}, "
    f"jax {r['jax']}, {r['machine']}, load {r['load_start']} -> {r['load_end']}; medians of "
    f"{r['repeats']} rounds (lax and conv2d interleaved)"
  ]
  if "ops" in r:
    lines.append(
      f"{'op':26s} {'lax ms':>8} {'GF/s':>6} {'conv2d ms':>10} {'GF/s':>6} {'speedup':>8} "
      f"{'chunk':>5} {'rel err':>8}"
    )
    for k, v in r["ops"].items():
      lines.append(
        f"{k:26s} {v['ms']['lax']:8.2f} {v['gflop_s']['lax']:6.1f} {v['ms']['conv2d']:10.2f} "
        f"{v['gflop_s']['conv2d']:6.1f} {v['speedup']:7.2f}x {v['chunk'] or '-':>5} "
        f"{v['max_rel_err']:8.1e}"
      )
  if "step" in r:
    s = r["step"]
    lines.append(f"{'fp32 step (fwd+bwd+AdamW)':26s} {'img/s':>8} {'ms':>8}")
    for n in ("lax", "conv2d"):
      lines.append(f"  {n:24s} {s['img_s'][n]:8.1f} {s['ms'][n]:8.1f}")
    lines.append(
      f"  speedup {s['speedup']:.2f}x (conv2d faster in {s['rounds_conv2d_faster']}/"
      f"{s['rounds']} rounds); params after {s['compare_steps']} steps: max |diff| "
      f"{s['params_max_abs_diff']:.2e}"
    )
  return "\n".join(lines)


def run_benchmark(a: dict[str, Any]) -> dict[str, Any]:
  """The parts in ``a["parts"]``; ``a`` holds the flag values."""
  r: dict[str, Any] = {
    "batch_size": a["batch_size"],
    "repeats": a["repeats"],
    "steps": a["steps"],
    "chunk": a["chunk"],
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    "load_start": load_average(),
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  if "ops" in a["parts"]:
    print("conv gradients alone", flush=True)
    r["ops"] = bench_ops(a)
  if "step" in a["parts"]:
    print("fp32 training step", flush=True)
    r["step"] = bench_step(a)
  r["load_end"] = load_average()
  return r


def main(argv: Sequence[str]) -> int:
  """absl entry point."""

  def body() -> None:
    cli_lib.no_positional(argv)
    a = {k: FLAGS[k].value for k in FLAGS}
    result = run_benchmark(a)
    summ = {"load": [result["load_start"], result["load_end"]]}
    if "step" in result:
      summ.update({f"{k}_img_s": round(v, 1) for k, v in result["step"]["img_s"].items()})
    cli_lib.emit_result(result, format_table(result), FLAGS.out, summ)

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Entry point of ``python -m launch.bench_conv_grad``."""
  cli_lib.run_console(main, cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
