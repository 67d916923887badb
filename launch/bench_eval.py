"""Candidates evaluated per second, per evaluator strategy: ``python -m launch.bench_eval``.

For N = 1, 64, 1024 (and 4096 on accelerators) candidate policies, times every strategy of
:mod:`cimjax.evaluate` against the Python loop over a jitted single-policy evaluator, in the
same run, and reports the achieved FLOP/s against a plain ``jnp.dot`` FLOP/s measured in the
same run (the machine's practical peak). Each cell runs whole chunks until ``--max_seconds``
is spent (at least one chunk) and reports the measured throughput, so slow strategies at large
N do not take hours; the table says how many candidates each figure was measured on.

``--int_modes`` (default ``float32``) adds the integer-product paths
(:data:`cimjax.layers.INT_MODES`): each cell is measured per mode, and its ops/s are reported
against the peak of a big matmul in that mode's dtype (float32 at ``HIGHEST``, int8 x int8 ->
int32), measured on the device in the same run. ``--dataset=synthetic`` feeds random images
of the model's input shape (no files; e.g. ResNet-18 at ``--image_size=224``).

Example::

  python -m launch.bench_eval --quick
  python -m launch.bench_eval --model=small_cnn --images=1000 --out=bench_eval.json
  python -m launch.bench_eval --model=resnet18 --image_size=224 --dataset=synthetic \
      --images=16 --int_modes=float32,int8 --strategies=vmap --chunk=8
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cimjax import cli as cli_lib
from cimjax import data as data_lib
from cimjax import evaluate, io, layers, models, trace
from cimjax.errors import CimjaxError

PROG = "launch.bench_eval"
STRATEGIES = tuple(s for s in evaluate.STRATEGIES if s != "auto")

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_string(
  "model",
  "small_cnn",
  "Model reference (zoo name, pkg.mod:factory, file.py:factory).",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "dataset",
  "fashion_mnist",
  (*data_lib.DATASET_NAMES, "synthetic"),
  "Dataset for the evaluation split (synthetic: random images of the model's input shape).",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "image_size", 0, "Model image size option (0: the model's default).", flag_values=FLAGS
)
flags.DEFINE_list(
  "int_modes",
  ["float32"],
  f"Integer-product modes, of {', '.join(m for m in layers.INT_MODES if m != 'auto')}.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "images", 1000, "Images of the search-validation split per candidate.", flag_values=FLAGS
)
flags.DEFINE_list(
  "n", None, "Candidate counts (default 1,64,1024; plus 4096 on accelerators).", flag_values=FLAGS
)
flags.DEFINE_list(
  "strategies",
  None,
  f"Strategies, of {', '.join(STRATEGIES)} (default: all that apply to the devices).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("chunk", 16, "Candidates per vmapped chunk.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 500, "Images per forward pass.", flag_values=FLAGS)
flags.DEFINE_float(
  "max_seconds", 20.0, "Time budget per (strategy, N) cell after warm-up.", flag_values=FLAGS
)
flags.DEFINE_bool(
  "quick", False, "Small run: N = 1, 16, 64, 300 images, 5 s per cell.", flag_values=FLAGS
)
flags.DEFINE_string("out", "", "Write the results as JSON here.", flag_values=FLAGS)
flags.register_validator(
  "n",
  lambda v: v is None or all(x.isdigit() and int(x) >= 1 for x in v),
  "allowed values are integers >= 1",
  flag_values=FLAGS,
)
flags.register_validator(
  "int_modes",
  lambda v: all(x in layers.INT_MODES and x != "auto" for x in v),
  "allowed values are float32, int32, int8",
  flag_values=FLAGS,
)
flags.register_validator(
  "strategies",
  lambda v: v is None or all(x in STRATEGIES for x in v),
  f"allowed values are {', '.join(STRATEGIES)}",
  flag_values=FLAGS,
)


def dot_peak_flops(n: int = 2048, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """Practical matmul peak: op/s of a jitted dot of two ``n x n`` matrices in ``dtype``.

  float32 runs at ``precision=HIGHEST``; int8 (and int32) operands accumulate in int32
  (``preferred_element_type``), as the integer products of :mod:`cimjax.layers` do.
  """
  dt = np.dtype(dtype)
  if dt == np.float32:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda u, v: jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST))
  else:
    a = jax.random.randint(jax.random.key(0), (n, n), -128, 128).astype(dt)
    f = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.int32))
  f(a, a).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


def time_cell(
  evaluator: Any, policies: np.ndarray, unit: int, max_seconds: float
) -> tuple[int, float]:
  """Evaluates whole units of candidates until the budget is spent; ``(done, seconds)``."""
  evaluator(policies[:unit])  # warm-up: compile
  done, spent = 0, 0.0
  while done < len(policies) and (done == 0 or spent < max_seconds):
    part = policies[done : done + unit]
    t = time.perf_counter()
    evaluator(part)
    spent += time.perf_counter() - t
    done += len(part)
  return done, spent


def synthetic_images(
  input_shape: Sequence[int], num: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """``(x [num, *input_shape] float32 N(0, 1), y [num] int)``: stand-in images, no files."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num, *input_shape), dtype=np.float32)
  return x, rng.integers(0, num_classes, num).astype(np.int32)


def run_benchmark(
  model_name: str,
  x: np.ndarray,
  y: np.ndarray,
  ns: Sequence[int],
  strategies: Sequence[str],
  *,
  chunk: int,
  batch_size: int,
  max_seconds: float,
  seed: int = 0,
  int_modes: Sequence[str] = ("float32",),
  model_kw: dict[str, Any] | None = None,
  peak_n: int = 2048,
) -> dict[str, Any]:
  """Runs the benchmark grid and returns a JSON-able dict of results.

  One evaluator is built per (int mode, strategy) and reused for every N (its compilation for
  a chunk shape is shared; each cell still warms up before it is timed).

  Args:
    model_name: zoo name (with ``model_kw`` options, e.g. ``image_size``).
    x, y: the evaluation images ``[num, ...]`` and labels.
    ns: candidate counts.
    strategies: evaluator strategies.
    chunk, batch_size, max_seconds: see the flags.
    seed: weights and policies seed.
    int_modes: integer-product modes to measure (``float32``, ``int32``, ``int8``).
    model_kw: model options.
    peak_n: matmul size of the peak measurement.
  """
  md = models.get_model(model_name, **(model_kw or {}))
  specs = trace.trace_specs(md)
  variables = models.init(md, jax.random.key(seed))
  flops_per_cand = 2.0 * sum(s.macs for s in specs) * len(x)
  peaks = {m: dot_peak_flops(peak_n, dtype=layers.resolve_int_dtype(m)) for m in int_modes}
  peak = peaks.get("float32") or dot_peak_flops(peak_n)
  rows = []
  evaluators = {
    (m, st): evaluate.make_evaluator(
      md, variables, x, y, strategy=st, chunk=chunk, batch_size=batch_size, int_mode=m
    )
    for m in int_modes
    for st in strategies
  }
  for n in ns:
    pols = np.asarray(jax.random.randint(jax.random.key(n), (n, len(specs), 2), 2, 9), np.int32)
    for (mode, strategy), ev in evaluators.items():
      if strategy == "map":
        unit = n  # one call evaluates all N candidates
      elif strategy == "loop":
        unit = 1
      else:
        unit = min(n, chunk)
      done, spent = time_cell(ev, pols, unit, max_seconds)
      rate = done / spent
      rows.append(
        {
          "n": n,
          "strategy": strategy,
          "int_mode": mode,
          "measured_candidates": done,
          "seconds": spent,
          "candidates_per_s": rate,
          "ms_per_candidate": 1000.0 / rate,
          "gflops": rate * flops_per_cand / 1e9,
          "fraction_of_dot_peak": rate * flops_per_cand / peak,
          "fraction_of_mode_peak": rate * flops_per_cand / peaks.get(mode, peak),
        }
      )
      print(
        f"  n={n:5d} {strategy:6s} {mode:7s} {rate:9.2f} cand/s  ({done} measured in "
        f"{spent:.1f} s)",
        flush=True,
      )
  for n in ns:
    cells = [r for r in rows if r["n"] == n]
    best = max(cells, key=lambda r: r["candidates_per_s"])
    loop = next(
      (r for r in cells if r["strategy"] == "loop" and r["int_mode"] == int_modes[0]), None
    )
    for r in cells:
      r["fastest"] = r is best
      r["speedup_vs_loop"] = (r["candidates_per_s"] / loop["candidates_per_s"]) if loop else None
  return {
    "model": model_name,
    "model_kw": dict(model_kw or {}),
    "images": int(len(x)),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "auto_strategy": evaluate.default_strategy(),
    "flops_per_candidate": flops_per_cand,
    "dot_peak_gflops": peak / 1e9,
    "mode_peak_gops": {m: p / 1e9 for m, p in peaks.items()},
    "int_modes": list(int_modes),
    "auto_int_dtype": str(layers.resolve_int_dtype("auto")),
    "chunk": chunk,
    "batch_size": batch_size,
    "max_seconds": max_seconds,
    "rows": rows,
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }


def format_table(result: dict[str, Any]) -> str:
  """Plain-text table of :func:`run_benchmark`'s result."""
  mode_peaks = ", ".join(f"{m} {p:.1f}" for m, p in result.get("mode_peak_gops", {}).items())
  lines = [
    f"bench_eval: {result['model']}, {result['images']} images/candidate, backend "
    f"{result['backend']} ({len(result['devices'])} devices), auto = "
    f"{result['auto_strategy']}, dot peak {result['dot_peak_gflops']:.1f} GFLOP/s"
    + (f" (per mode, Gop/s: {mode_peaks})" if mode_peaks else ""),
    f"{'N':>6} {'strategy':8} {'int':7} {'cand/s':>9} {'ms/cand':>9} {'GFLOP/s':>8} "
    f"{'%f32pk':>6} {'%modepk':>7} {'vs loop':>8} {'measured':>8}",
  ]
  for r in result["rows"]:
    mark = " *" if r["fastest"] else ""
    vs = r["speedup_vs_loop"]
    vs_loop = f"{vs:7.2f}x" if vs is not None else f"{'-':>8s}"
    lines.append(
      f"{r['n']:6d} {r['strategy']:8} {r.get('int_mode', 'float32'):7} "
      f"{r['candidates_per_s']:9.2f} {r['ms_per_candidate']:9.2f} {r['gflops']:8.2f} "
      f"{100 * r['fraction_of_dot_peak']:5.1f}% "
      f"{100 * r.get('fraction_of_mode_peak', r['fraction_of_dot_peak']):6.1f}% {vs_loop} "
      f"{r['measured_candidates']:8d}{mark}"
    )
  lines.append("* fastest (strategy, int mode) for that N; %f32pk, %modepk: of the f32, mode peak")
  return "\n".join(lines)


def grid() -> tuple[list[int], list[str], int, float]:
  """``(ns, strategies, images, max_seconds)`` of the flags (``--quick`` and device defaults)."""
  accel = jax.default_backend() != "cpu"
  if FLAGS.n:
    ns = [int(v) for v in FLAGS.n]
  elif FLAGS.quick:
    ns = [1, 16, 64]
  else:
    ns = [1, 64, 1024] + ([4096] if accel else [])
  images = 300 if FLAGS.quick and FLAGS.images == 1000 else FLAGS.images
  max_seconds = 5.0 if FLAGS.quick and FLAGS.max_seconds == 20.0 else FLAGS.max_seconds
  strategies = FLAGS.strategies or (
    ["loop", "vmap", "map"] + (["shard"] if len(jax.devices()) > 1 else [])
  )
  return ns, strategies, images, max_seconds


def main(argv: Sequence[str]) -> None:
  """absl entry point."""
  del argv
  ns, strategies, images, max_seconds = grid()
  model_kw = {"image_size": FLAGS.image_size} if FLAGS.image_size else {}
  try:
    if FLAGS.dataset == "synthetic":
      md = models.get_model(FLAGS.model, **model_kw)
      x, y = synthetic_images(md.input_shape, images, md.num_classes)
    else:
      splits = data_lib.load_dataset(
        FLAGS.dataset,
        val_size=images,
        train_size=1000,
        test_size=0 if FLAGS.dataset != "digits" else None,
      )
      x, y = splits.val.images, splits.val.labels
    print(f"bench_eval: {FLAGS.model} on {len(x)} {FLAGS.dataset} images; N = {ns}", flush=True)
    result = run_benchmark(
      FLAGS.model,
      x,
      y,
      ns,
      strategies,
      chunk=FLAGS.chunk,
      batch_size=FLAGS.batch_size,
      max_seconds=max_seconds,
      int_modes=FLAGS.int_modes,
      model_kw=model_kw,
    )
  except CimjaxError as e:
    cli_lib.fail(PROG, e)
  print(format_table(result))
  if FLAGS.out:
    io.write_json(FLAGS.out, result)
    print(f"wrote {FLAGS.out}")
  else:
    print(json.dumps({"rows": len(result["rows"])}))


def run() -> None:
  """Entry point of ``python -m launch.bench_eval``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
