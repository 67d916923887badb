"""All benchmarks, one table: ``python -m launch.bench [--quick]``.

Runs ``launch.bench_eval``, ``launch.bench_search``, ``launch.bench_xbar`` and
``launch.bench_train`` (the img/s of every training stage's step of the default run) as
subprocesses (in quick mode with ``--quick``), each writing its JSON into ``--workdir``, then
prints one summary table and writes ``WORKDIR/bench_summary.json`` and
``WORKDIR/bench_summary.md`` with the date and the machine. The search benchmark includes the
Fashion-MNIST part when ``--checkpoint`` names a trained any-precision model (e.g.
``runs/default/anyprec`` after the default run), else only its synthetic latency-side part.

Example::

  python -m launch.bench --quick
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

from cimjax import cli as cli_lib
from cimjax.errors import CimjaxError

PROG = "launch.bench"
PARTS = ("eval", "search", "xbar", "train")

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_string(
  "workdir", "runs/bench", "Where the benchmarks write their JSON.", flag_values=FLAGS
)
flags.DEFINE_bool(
  "quick", False, "Quick mode of every benchmark (a few minutes in all).", flag_values=FLAGS
)
flags.DEFINE_string(
  "checkpoint",
  "runs/default/anyprec",
  "Any-precision small CNN for the Fashion-MNIST search benchmark (skipped if missing).",
  flag_values=FLAGS,
)
flags.DEFINE_list("only", None, f"Subset of: {', '.join(PARTS)}.", flag_values=FLAGS)
flags.register_validator(
  "only",
  lambda v: v is None or all(p in PARTS for p in v),
  f"allowed values are {', '.join(PARTS)}",
  flag_values=FLAGS,
)


def _commands(workdir: Path, quick: bool, checkpoint: str) -> dict[str, list[str]]:
  py = [sys.executable, "-m"]
  search = [*py, "launch.bench_search", f"--workdir={workdir / 'search'}"]
  if Path(checkpoint).is_dir():
    search += [f"--checkpoint={checkpoint}", "--part=fashion,synthetic"]
  else:
    search += ["--part=synthetic"]
  if quick:
    search += ["--quick"]
  return {
    "eval": [*py, "launch.bench_eval", f"--out={workdir / 'bench_eval.json'}"]
    + (["--quick"] if quick else []),
    "search": search,
    "xbar": [*py, "launch.bench_xbar", f"--out={workdir / 'bench_xbar.json'}"]
    + (["--tokens=1024", "--repeats=3", "--batch=8"] if quick else []),
    "train": [
      *py,
      "launch.bench_train",
      "--parts=stages",
      "--arch=default",
      f"--out={workdir / 'bench_train.json'}",
    ]
    + (["--repeats=1", "--steps=4", "--warmup=1"] if quick else []),
  }


def _json_of(part: str, workdir: Path) -> Path:
  return {
    "eval": workdir / "bench_eval.json",
    "search": workdir / "search" / "bench_search.json",
    "xbar": workdir / "bench_xbar.json",
    "train": workdir / "bench_train.json",
  }[part]


def summarize(results: dict[str, Any]) -> list[tuple[str, str, str]]:
  """Rows (benchmark, case, figure) of the headline numbers."""
  rows: list[tuple[str, str, str]] = []
  ev = results.get("eval")
  if ev:
    for n in sorted({r["n"] for r in ev["rows"]}):
      cells = [r for r in ev["rows"] if r["n"] == n]
      best = max(cells, key=lambda r: r["candidates_per_s"])
      loop = next(r for r in cells if r["strategy"] == "loop")
      rows.append(
        (
          "evaluator",
          f"N={n}, fastest = {best['strategy']}",
          f"{best['candidates_per_s']:.1f} cand/s (loop {loop['candidates_per_s']:.1f}; "
          f"{100 * best['fraction_of_dot_peak']:.0f}% of dot peak)",
        )
      )
  se = results.get("search")
  if se:
    for task in se.get("tasks", []):
      budgets = sorted({int(b) for a in task["agents"].values() for b in a if b.isdigit()})
      top = str(budgets[-1])
      cells = [
        f"{name} {100 * a[top]['median_frac_ref_speedup']:.1f}%"
        for name, a in task["agents"].items()
        if top in a
      ]
      rows.append(
        (
          "search",
          f"{task['task']} @ {top} evals",
          f"median speedup / {task['reference']} ({task['reference_speedup']:.3f}x): "
          + ", ".join(cells),
        )
      )
  xb = results.get("xbar")
  if xb:
    for r in xb.get("results", []):
      thr = f"{r['mvm_per_s']:.3g} MVM/s" if "mvm_per_s" in r else f"{r['images_per_s']:.3g} img/s"
      rows.append(("crossbar", f"{r['bench']}: {r['case']}", thr))
  tr = results.get("train")
  if tr:
    for stage, v in tr.get("stages", {}).items():
      rows.append(
        (
          "training",
          f"{stage} step, {tr['model']}, batch {tr['batch_size']}",
          f"{v['img_s']:.1f} img/s",
        )
      )
  return rows


def run_parts(
  parts: Sequence[str], workdir: Path, quick: bool, checkpoint: str
) -> tuple[dict[str, Any], dict[str, float]]:
  """Runs each benchmark part in a subprocess; returns ``(results, seconds)`` per part.

  A part that fails prints one line on stderr and exits with status 1.
  """
  cmds = _commands(workdir, quick, checkpoint)
  results, seconds = {}, {}
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  for part in parts:
    print(f"== {part}: {' '.join(cmds[part][2:])}", flush=True)
    t = time.time()
    proc = subprocess.run(cmds[part], env=env, check=False)
    seconds[part] = round(time.time() - t, 1)
    if proc.returncode != 0:
      print(
        f"{PROG}: error: benchmark {part} failed with status {proc.returncode}", file=sys.stderr
      )
      sys.exit(1)
    results[part] = json.loads(_json_of(part, workdir).read_text())
  return results, seconds


def machine_info(quick: bool, seconds: dict[str, float]) -> dict[str, Any]:
  """Date, machine, CPUs and JAX backend of this run."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "machine": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpus": os.cpu_count(),
    "backend": jax.default_backend(),
    "quick": quick,
    "seconds": seconds,
  }


def write_summary(workdir: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
  """Prints the summary table; writes ``bench_summary.json`` and ``bench_summary.md``."""
  from cimjax import io  # pylint: disable=g-import-not-at-top

  rows = summarize(results)
  width = max((len(r[1]) for r in rows), default=10)
  lines = [
    f"cimjax benchmarks, {meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, backend "
    f"{meta['backend']}{' (quick)' if meta['quick'] else ''}"
  ]
  lines += [f"{b:10s} {c:{width}s}  {f}" for b, c, f in rows]
  print("\n".join(lines))
  io.write_json(workdir / "bench_summary.json", {"meta": meta, "rows": rows, "results": results})
  md = [
    "# cimjax benchmark summary",
    "",
    f"{lines[0]}",
    "",
    "| benchmark | case | figure |",
    "|---|---|---|",
  ] + [f"| {b} | {c} | {f} |" for b, c, f in rows]
  io.write_text(workdir / "bench_summary.md", "\n".join(md) + "\n")
  print(f"wrote {workdir / 'bench_summary.md'}")


def main(argv: Sequence[str]) -> None:
  """absl entry point."""
  del argv
  try:
    parts = FLAGS.only or list(PARTS)
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results, seconds = run_parts(parts, workdir, FLAGS.quick, FLAGS.checkpoint)
    write_summary(workdir, machine_info(FLAGS.quick, seconds), results)
  except CimjaxError as e:
    cli_lib.fail(PROG, e)


def run() -> None:
  """Entry point of ``python -m launch.bench``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
