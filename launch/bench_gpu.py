"""The accelerator benchmark driver of ``launch/bench_gpu.sh``: one JSON and one table.

Sections (each timed; a failing section records its error and the others still run):

- ``env``: versions, devices, the int8 self-check and what ``int_mode="auto"`` resolves to;
- ``eval_small_cnn``, ``eval_resnet18``: :func:`launch.bench_eval.run_benchmark` with the
  float32 and int8 paths at N = 1, 64, 1024, 4096 (cand/s, % of each dtype's dot peak); the
  small CNN on Fashion-MNIST images, ResNet-18 on synthetic 224 x 224 images;
- ``train_resnet18``: training img/s of the zoo ResNet-18 on synthetic 224 x 224 batches through
  :func:`cimjax.train.steps.train_step` (QAT at 8/8), per int mode;
- ``search``: a PG search at budget 30,000 on the Fashion task: a tiny any-precision small CNN
  trained here first (no input files), its accuracy measured by :class:`cimjax.search.DataAccuracy`.

Data: Fashion-MNIST where :mod:`cimjax.data` finds it, else the committed subset, else a
generated stand-in (noted in the JSON). Needs only jax, flax, optax, chex, orbax, numpy, absl,
ml_collections. ``--dry`` runs every section at tiny sizes (CI, CPU, well under a minute).

Usage::

  python -m launch.bench_gpu --out_dir=OUT [--dry]
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cimjax import cli as cli_lib
from cimjax import data as data_lib
from cimjax import io, layers, models, trace
from launch import bench_eval

PROG = "launch.bench_gpu"
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "out_dir", None, "Where bench_gpu.json and bench_gpu.txt go.", flag_values=FLAGS
)
flags.DEFINE_bool("dry", False, "Tiny sizes (CI on CPU).", flag_values=FLAGS)
flags.DEFINE_integer("budget", 30000, "PG search budget (unique evaluations).", flag_values=FLAGS)
flags.DEFINE_float("max_seconds", 3.0, "Seconds per evaluator cell.", flag_values=FLAGS)

OPTIONAL = ("onnx", "torch", "grain", "matplotlib", "tensorflow")  # rich: flax imports it
MODES = ("float32", "int8")


def sizes(dry: bool) -> dict[str, Any]:
  """Every size of the run (full on an accelerator, tiny for ``--dry``)."""
  if dry:
    return {
      "ns": [1, 4],
      "r18_ns": [2],
      "strategies": ["vmap"],
      "cnn_images": 40,
      "cnn_chunk": 4,
      "r18_kw": {"image_size": 32, "num_classes": 10},
      "r18_images": 2,
      "r18_chunk": 2,
      "train_batch": 2,
      "train_steps": 2,
      "anyprec_steps": 3,
      "search_images": 40,
      "budget": 48,
      "max_seconds": 0.2,
      "peak_n": 256,
    }
  return {
    "ns": [1, 64, 1024, 4096],
    "r18_ns": [1, 64, 1024, 4096],
    "strategies": ["vmap"],
    "cnn_images": 1000,
    "cnn_chunk": 64,
    "r18_kw": {"image_size": 224},
    "r18_images": 16,
    "r18_chunk": 8,
    "train_batch": 128,
    "train_steps": 10,
    "anyprec_steps": 300,
    "search_images": 1000,
    "budget": None,
    "max_seconds": None,
    "peak_n": 8192,
  }


def fashion_data(num_train: int, num_val: int) -> tuple[Any, str]:
  """``(splits-like, note)``: Fashion-MNIST, its committed subset, or a generated stand-in."""
  for name in ("fashion_mnist", "fashion_mnist_subset"):
    try:
      s = data_lib.load_dataset(name, train_size=num_train, val_size=num_val, test_size=0)
      return (s.train.images, s.train.labels, s.val.images, s.val.labels), name
    except Exception as e:  # pylint: disable=broad-except
      note = f"{name}: {type(e).__name__}"
  rng = np.random.default_rng(0)
  protos = rng.standard_normal((10, 28, 28, 1)).astype(np.float32)

  def gen(n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 10, n).astype(np.int32)
    return protos[y] + 0.8 * rng.standard_normal((n, 28, 28, 1)).astype(np.float32), y

  (xt, yt), (xv, yv) = gen(num_train), gen(num_val)
  return (xt, yt, xv, yv), f"stand-in: 10 noisy class prototypes, 28x28x1 ({note}; NOT Fashion)"


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Runs a section; adds ``seconds`` and, on failure, ``error`` (the run goes on)."""
  t = time.perf_counter()
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    out = {"error": f"{type(e).__name__}: {e}"[:2000]}
  out["seconds"] = time.perf_counter() - t
  print(f"-- section done in {out['seconds']:.1f} s", flush=True)
  return out


def env_section() -> dict[str, Any]:
  """Versions, devices, the int8 self-check and the auto resolution."""
  import flax  # pylint: disable=g-import-not-at-top

  platform = jax.default_backend()
  return {
    "jax": jax.__version__,
    "flax": flax.__version__,
    "backend": platform,
    "devices": [str(d) for d in jax.devices()],
    "int8_self_check": bool(layers.int8_self_check(platform)),
    "auto_int_dtype": str(layers.resolve_int_dtype("auto")),
  }


def eval_section(
  name: str, x: np.ndarray, y: np.ndarray, s: dict[str, Any], chunk: int, kw: dict[str, Any]
) -> dict[str, Any]:
  """The evaluator table of one model (vmapped chunks: the accelerator strategy)."""
  return bench_eval.run_benchmark(
    name,
    x,
    y,
    s["r18_ns"] if name == "resnet18" else s["ns"],
    s["strategies"],
    chunk=chunk,
    batch_size=len(x),
    max_seconds=s["max_seconds"],
    int_modes=MODES,
    model_kw=kw,
    peak_n=s["peak_n"],
  )


def train_section(s: dict[str, Any]) -> dict[str, Any]:
  """Training img/s of the zoo ResNet-18 (QAT 8/8) on synthetic batches, per int mode."""
  from cimjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from cimjax.train import steps  # pylint: disable=g-import-not-at-top

  md = models.get_model("resnet18", **s["r18_kw"])
  v = models.init(md, jax.random.key(0))
  n = len(trace.trace_specs(md))
  pol = jnp.full((n, 2), 8, jnp.int32)
  b = s["train_batch"]
  x, y = bench_eval.synthetic_images(md.input_shape, b, md.num_classes)
  batch = (jnp.asarray(x), jnp.asarray(y))
  tx = optax.sgd(0.01, momentum=0.9)
  out: dict[str, Any] = {"model": "resnet18", "model_kw": s["r18_kw"], "batch": b}
  for mode in MODES:
    cfg = steps.StepConfig.create(md, tx, int_mode=mode)
    st = state_lib.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(0))
    step = steps.JITTED[bool(s["dry"])]["train"]  # dry: fast compiles
    t = time.perf_counter()
    st, m = step(st, batch, pol, config=cfg)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(s["train_steps"]):
      st, m = step(st, batch, pol, config=cfg)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t
    out[mode] = {
      "images_per_s": b * s["train_steps"] / dt,
      "step_ms": 1000 * dt / s["train_steps"],
      "compile_s": compile_s,
      "final_loss": float(m["loss"]),
    }
    print(f"  train resnet18 {mode}: {out[mode]['images_per_s']:.1f} img/s", flush=True)
  return out


def search_section(s: dict[str, Any], budget: int) -> dict[str, Any]:
  """Trains a tiny any-precision small CNN, then a PG search at ``budget`` on its accuracy."""
  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import search  # pylint: disable=g-import-not-at-top
  from cimjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from cimjax.train import steps  # pylint: disable=g-import-not-at-top

  (xt, yt, xv, yv), source = fashion_data(max(2000, 64 * 4), s["search_images"])
  md = models.get_model("small_cnn")
  specs = trace.trace_specs(md)
  v = models.init(md, jax.random.key(0))
  tx = optax.adam(2e-3)
  trainer = steps.Trainer(md, tx)
  st = state_lib.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for i in range(s["anyprec_steps"]):
    idx = rng.integers(0, len(xt), 64)
    pols = jax.random.randint(jax.random.key(i), (2, len(specs), 2), 2, 9)
    st, m = trainer.anyprec_step(st, (jnp.asarray(xt[idx]), jnp.asarray(yt[idx])), pols)
  jax.block_until_ready(st.params)
  train_s = time.perf_counter() - t
  variables = state_lib.as_variables(st)
  hw = hw_lib.load_hw("rram_256_c4")
  tables = cost_lib.cost_tables(specs, hw, xp=np)
  acc = search.DataAccuracy(md, variables, xv, yv, batch_size=len(xv), chunk=64, name="val")
  cfg = search.SearchConfig(agent="pg", budget=budget, constraint="io", acc_drop=1.0)
  t = time.perf_counter()
  r = search.run_search(md, specs, tables, acc, cfg, hw=hw, plots=False)
  wall = time.perf_counter() - t
  return {
    "data": source,
    "anyprec_steps": s["anyprec_steps"],
    "anyprec_train_s": train_s,
    "search_images": len(xv),
    "target": hw.name,
    "constraint": cfg.constraint,
    "budget": budget,
    "evals_used": int(r.evals_used),
    "iterations": int(r.iterations),
    "wall_s": wall,
    "eval_s": float(r.eval_s),
    "evals_per_s": r.evals_used / wall,
    "acc_ref": float(r.acc_ref),
    "best_accuracy": float(r.best_accuracy),
    "best_speedup": float(r.best_speedup),
    "feasible": bool(r.feasible),
    "mode": str(r.mode),
    "int_dtype": str(layers.resolve_int_dtype("auto")),  # what DataAccuracy's evaluator used
  }


def run(dry: bool, budget: int, max_seconds: float) -> dict[str, Any]:
  """All sections; returns the JSON-able result."""
  s = sizes(dry)
  s["dry"] = dry
  s["max_seconds"] = s["max_seconds"] or max_seconds
  budget = s["budget"] or budget
  out: dict[str, Any] = {"dry": dry, "date": time.strftime("%Y-%m-%d %H:%M"), "sizes": s}
  out["env"] = timed(env_section)
  (_, _, xv, yv), source = fashion_data(100, s["cnn_images"])
  out["eval_small_cnn"] = timed(
    lambda: {"data": source, **eval_section("small_cnn", xv, yv, s, s["cnn_chunk"], {})}
  )
  md18 = models.get_model("resnet18", **s["r18_kw"])
  x18, y18 = bench_eval.synthetic_images(md18.input_shape, s["r18_images"], md18.num_classes)
  out["eval_resnet18"] = timed(
    lambda: {
      "data": "synthetic",
      **eval_section("resnet18", x18, y18, s, s["r18_chunk"], s["r18_kw"]),
    }
  )
  out["train_resnet18"] = timed(lambda: train_section(s))
  out["search"] = timed(lambda: search_section(s, budget))
  out["optional_modules_loaded"] = sorted(m for m in OPTIONAL if m in sys.modules)
  return out


def format_table(r: dict[str, Any]) -> str:
  """The plain-text summary of :func:`run`'s result."""
  e = r["env"]
  lines = [
    f"bench_gpu {r['date']} dry={r['dry']}: jax {e.get('jax')} on {e.get('backend')} "
    f"{e.get('devices')}; int8 self-check {e.get('int8_self_check')}, auto -> "
    f"{e.get('auto_int_dtype')}",
  ]
  for key in ("eval_small_cnn", "eval_resnet18"):
    sec = r[key]
    lines.append("")
    lines.append(f"[{key}] data {sec.get('data')} ({sec['seconds']:.0f} s)")
    lines.append(bench_eval.format_table(sec) if "rows" in sec else f"  ERROR {sec.get('error')}")
  t = r["train_resnet18"]
  lines.append("")
  head = f"[train_resnet18] batch {t.get('batch')} {t.get('model_kw')}"
  lines.append(f"{head} ({t['seconds']:.0f} s)")
  for mode in MODES:
    if mode in t:
      m = t[mode]
      lines.append(
        f"  {mode:7s} {m['images_per_s']:9.1f} img/s  {m['step_ms']:8.1f} ms/step  "
        f"compile {m['compile_s']:.1f} s"
      )
  if "error" in t:
    lines.append(f"  ERROR {t['error']}")
  q = r["search"]
  lines.append("")
  if "error" in q:
    lines.append(f"[search] ERROR {q['error']}")
  else:
    lines.append(
      f"[search] PG budget {q['budget']} on {q['data']}, {q['search_images']} images, "
      f"{q['target']}/{q['constraint']}: {q['evals_used']} evals in {q['wall_s']:.1f} s "
      f"({q['evals_per_s']:.0f}/s, mode {q['mode']}, {q['int_dtype']}); acc_ref "
      f"{q['acc_ref']:.2f}, best {q['best_accuracy']:.2f} at {q['best_speedup']:.2f}x "
      f"(feasible {q['feasible']}); any-precision training {q['anyprec_train_s']:.1f} s"
    )
  lines.append(f"optional modules loaded: {r['optional_modules_loaded'] or 'none'}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """absl entry point."""
  del argv
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required")
  out_dir = Path(FLAGS.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result = run(FLAGS.dry, FLAGS.budget, FLAGS.max_seconds)
  table = format_table(result)
  io.write_json(out_dir / "bench_gpu.json", result)
  (out_dir / "bench_gpu.txt").write_text(table + "\n")
  print(table)


def run_main() -> None:
  """Entry point of ``python -m launch.bench_gpu``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run_main()
