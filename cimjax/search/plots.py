"""PNG plots of a search (matplotlib, Agg backend), written atomically.

- ``pareto.png``: every evaluated candidate (speedup vs accuracy), the Pareto front, the INT8
  reference, the accuracy target and the chosen policy;
- ``bits.png``: per-layer weight and activation bits of the best policy;
- ``latency.png``: per-layer latency at 8/8 and with the best policy (needs the target).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cimjax import io
from cimjax.search import env as env_lib
from cimjax.spec import LayerSpec


def _figure():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save(fig: Any, path: Path) -> Path:
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
  return path


def plot_pareto(result: Any, path: str | os.PathLike[str]) -> Path:
  """Speedup vs accuracy of all evaluated candidates with the Pareto front."""
  plt = _figure()
  n = result.evals_used
  h = result.history
  sp = 1.0 / np.asarray(h.cost_ratio[:n], np.float64)
  acc = np.asarray(h.accuracy[:n], np.float64)
  front = env_lib.pareto_front(h.cost_ratio[:n], acc)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  ax.scatter(sp, acc, s=6, alpha=0.35, color="tab:gray", label=f"evaluated ({n})")
  ax.plot(sp[front], acc[front], "-o", ms=3, color="tab:blue", label="Pareto front")
  ax.axhline(result.acc_ref, color="tab:green", lw=0.8, ls="--", label="INT8 reference")
  ax.axhline(result.acc_target, color="tab:red", lw=0.8, ls="--", label="accuracy target")
  ax.scatter(
    [result.best_speedup],
    [result.best_accuracy],
    marker="*",
    s=140,
    color="tab:orange",
    zorder=5,
    label="best reward",
  )
  lo = min(result.acc_target - 5.0, float(np.min(acc[front])) if len(front) else 0.0)
  ax.set_ylim(max(lo, float(np.min(acc)) - 0.5), max(result.acc_ref, float(np.max(acc))) + 0.5)
  ax.set_xlabel("speedup over 8/8")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{result.agent}: {n} evaluations")
  ax.legend(fontsize=7, loc="lower left")
  ax.grid(alpha=0.3)
  out = _save(fig, Path(path))
  plt.close(fig)
  return out


def plot_bits(
  result: Any, path: str | os.PathLike[str], names: Sequence[str] | None = None
) -> Path:
  """Per-layer weight/activation bits of the best policy."""
  plt = _figure()
  pol = np.asarray(result.best_policy)
  num = pol.shape[0]
  x = np.arange(num)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * num + 3), 3.6))
  ax.bar(x - 0.2, pol[:, 0], width=0.4, label="weight bits")
  ax.bar(x + 0.2, pol[:, 1], width=0.4, label="activation bits")
  ax.set_ylim(0, 8.8)
  ax.set_xticks(x)
  ax.set_xticklabels(
    names if names is not None and num <= 40 else [str(i) for i in x], rotation=90, fontsize=6
  )
  ax.set_ylabel("bits")
  ax.set_title(
    f"best policy: speedup {result.best_speedup:.3f}x, accuracy {result.best_accuracy:.2f}%"
  )
  ax.legend(fontsize=7)
  out = _save(fig, Path(path))
  plt.close(fig)
  return out


def plot_latency(
  result: Any, path: str | os.PathLike[str], report: dict[str, Any], baseline: Sequence[float]
) -> Path:
  """Per-layer latency at 8/8 and with the best policy (log scale)."""
  plt = _figure()
  after = np.asarray([r["latency_us"] for r in report["layers"]])
  before = np.asarray(baseline, np.float64)
  num = after.shape[0]
  x = np.arange(num)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * num + 3), 3.6))
  ax.bar(x - 0.2, before, width=0.4, label="8/8")
  ax.bar(x + 0.2, after, width=0.4, label="best policy")
  ax.set_yscale("log")
  ax.set_xticks(x)
  ax.set_xticklabels(
    [r["name"] for r in report["layers"]] if num <= 40 else [str(i) for i in x],
    rotation=90,
    fontsize=6,
  )
  ax.set_ylabel("latency (us)")
  ax.set_title(f"total {before.sum() / 1e3:.1f} ms -> {after.sum() / 1e3:.1f} ms")
  ax.legend(fontsize=7)
  out = _save(fig, Path(path))
  plt.close(fig)
  return out


def write_plots(
  result: Any,
  workdir: str | os.PathLike[str],
  *,
  specs: Sequence[LayerSpec] | None = None,
  hw: Any = None,
) -> dict[str, Path]:
  """Writes ``pareto.png``, ``bits.png`` and (with ``specs`` and ``hw``) ``latency.png``."""
  wd = Path(workdir)
  names = [s.name for s in specs] if specs is not None else None
  out = {
    "pareto_png": plot_pareto(result, wd / "pareto.png"),
    "bits_png": plot_bits(result, wd / "bits.png", names),
  }
  if specs is not None and hw is not None:
    from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
    from cimjax import policy as policy_lib  # pylint: disable=g-import-not-at-top

    report = result.report or cost_lib.layer_report(specs, hw, result.best_policy)
    base = cost_lib.layer_report(specs, hw, policy_lib.uniform_policy(len(specs), 8, 8))
    out["latency_png"] = plot_latency(
      result, wd / "latency.png", report, [r["latency_us"] for r in base["layers"]]
    )
  return out


__all__ = ["plot_bits", "plot_latency", "plot_pareto", "write_plots"]
