"""Candidates evaluated per second, per evaluator strategy: ``python -m launch.bench_eval``.

For N = 1, 64, 1024 (and 4096 on accelerators) candidate policies, times every strategy of
:mod:`cimjax.evaluate` against the Python loop over a jitted single-policy evaluator, in the
same run, and reports the achieved FLOP/s against a plain ``jnp.dot`` FLOP/s measured in the
same run (the machine's practical peak). Each cell runs whole chunks until ``--max_seconds``
is spent (at least one chunk) and reports the measured throughput, so slow strategies at large
N do not take hours; the table says how many candidates each figure was measured on.

Example::

  python -m launch.bench_eval --quick
  python -m launch.bench_eval --model=small_cnn --images=1000 --out=bench_eval.json
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
from cimjax import evaluate, io, models, trace
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
  data_lib.DATASET_NAMES,
  "Dataset for the evaluation split.",
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
  "strategies",
  lambda v: v is None or all(x in STRATEGIES for x in v),
  f"allowed values are {', '.join(STRATEGIES)}",
  flag_values=FLAGS,
)


def dot_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """Practical float32 matmul peak: FLOP/s of a jitted ``jnp.dot`` of two ``n x n`` matrices."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda u, v: jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST))
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
) -> dict[str, Any]:
  """Runs the benchmark grid and returns a JSON-able dict of results."""
  md = models.get_model(model_name)
  specs = trace.trace_specs(md)
  variables = models.init(md, jax.random.key(seed))
  flops_per_cand = 2.0 * sum(s.macs for s in specs) * len(x)
  peak = dot_peak_flops()
  rows = []
  for n in ns:
    pols = np.asarray(jax.random.randint(jax.random.key(n), (n, len(specs), 2), 2, 9), np.int32)
    for strategy in strategies:
      ev = evaluate.make_evaluator(
        md, variables, x, y, strategy=strategy, chunk=chunk, batch_size=batch_size
      )
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
          "measured_candidates": done,
          "seconds": spent,
          "candidates_per_s": rate,
          "ms_per_candidate": 1000.0 / rate,
          "gflops": rate * flops_per_cand / 1e9,
          "fraction_of_dot_peak": rate * flops_per_cand / peak,
        }
      )
      print(
        f"  n={n:5d} {strategy:6s} {rate:9.2f} cand/s  ({done} measured in {spent:.1f} s)",
        flush=True,
      )
  for n in ns:
    cells = [r for r in rows if r["n"] == n]
    best = max(cells, key=lambda r: r["candidates_per_s"])
    loop = next((r for r in cells if r["strategy"] == "loop"), None)
    for r in cells:
      r["fastest"] = r is best
      r["speedup_vs_loop"] = (r["candidates_per_s"] / loop["candidates_per_s"]) if loop else None
  return {
    "model": model_name,
    "images": int(len(x)),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "auto_strategy": evaluate.default_strategy(),
    "flops_per_candidate": flops_per_cand,
    "dot_peak_gflops": peak / 1e9,
    "chunk": chunk,
    "batch_size": batch_size,
    "max_seconds": max_seconds,
    "rows": rows,
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }


def format_table(result: dict[str, Any]) -> str:
  """Plain-text table of :func:`run_benchmark`'s result."""
  lines = [
    f"bench_eval: {result['model']}, {result['images']} images/candidate, backend "
    f"{result['backend']} ({len(result['devices'])} devices), auto = "
    f"{result['auto_strategy']}, dot peak {result['dot_peak_gflops']:.1f} GFLOP/s",
    f"{'N':>6} {'strategy':8} {'cand/s':>9} {'ms/cand':>9} {'GFLOP/s':>8} {'%peak':>6} "
    f"{'vs loop':>8} {'measured':>8}",
  ]
  for r in result["rows"]:
    mark = " *" if r["fastest"] else ""
    vs = r["speedup_vs_loop"]
    vs_loop = f"{vs:7.2f}x" if vs is not None else f"{'-':>8s}"
    lines.append(
      f"{r['n']:6d} {r['strategy']:8} {r['candidates_per_s']:9.2f} "
      f"{r['ms_per_candidate']:9.2f} {r['gflops']:8.2f} "
      f"{100 * r['fraction_of_dot_peak']:5.1f}% {vs_loop} "
      f"{r['measured_candidates']:8d}{mark}"
    )
  lines.append("* fastest strategy for that N")
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
  try:
    splits = data_lib.load_dataset(
      FLAGS.dataset,
      val_size=images,
      train_size=1000,
      test_size=0 if FLAGS.dataset != "digits" else None,
    )
    val = splits.val
    print(f"bench_eval: {FLAGS.model} on {len(val)} {FLAGS.dataset} images; N = {ns}", flush=True)
    result = run_benchmark(
      FLAGS.model,
      val.images,
      val.labels,
      ns,
      strategies,
      chunk=FLAGS.chunk,
      batch_size=FLAGS.batch_size,
      max_seconds=max_seconds,
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
