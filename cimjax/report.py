"""The end-to-end run's report: ``report.json`` (every figure), ``report.md`` (tables + plots).

Accuracies are top-1 in percent. Latency, energy and crossbar counts come from the cost model
of the run's hardware target (:func:`cimjax.cost.layer_report`); the compile stage checks that
the compiled program's schedule gives the same figures.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cimjax import io  # noqa: E402


@dataclasses.dataclass
class RunSummary:
  """The figures of a run that its report needs (built by the pipeline: ``Pipeline.summary``).

  Attributes:
    model: zoo model name.
    dataset: dataset name.
    hw: target name.
    hw_description: the target's description.
    latency_mode: the target's latency mode.
    train_images: images of the train split.
    val_images: images of the validation split.
    test_images: images of the test split.
    train_subset: whether training used a subset of the train file.
    epochs: epochs of each training stage.
    allowed_drop: allowed accuracy drop from INT8 (points).
    results: each stage's ``result.json`` by stage name, ``{}`` for a missing one (``fp32``,
      ``int8``, ``anyprec``, ``search``, ``finetune``, ``evaluate``, ``compile``, in run order).
    policy: the chosen policy ``[L, 2]``.
    cost_int8: :func:`cimjax.cost.layer_report` of 8/8 on the target.
    cost_mixed: :func:`cimjax.cost.layer_report` of the chosen policy.
    metrics: ``metrics.jsonl`` of each training stage (the training plot).
    search_dir: the search stage's folder (its plots).
    workdir: the run directory (the report is written there).
    data_info: the source's summary (:attr:`cimjax.data.Splits.info`): ``source``, ``path``,
      ``skipped`` (unreadable images left out) and ``skipped_paths`` (the first few).
  """

  model: str
  dataset: str
  hw: str
  hw_description: str
  latency_mode: str
  train_images: int
  val_images: int
  test_images: int
  train_subset: bool
  epochs: dict[str, float]
  allowed_drop: float
  results: dict[str, dict[str, Any]]
  policy: list[list[int]]
  cost_int8: dict[str, Any]
  cost_mixed: dict[str, Any]
  metrics: dict[str, Path]
  search_dir: Path
  workdir: Path
  data_info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _pct(v: Any) -> float | None:
  """An accuracy (already in percent) rounded for the report."""
  return None if v is None else round(float(v), 3)


def _metrics(path: Path) -> list[dict[str, Any]]:
  if not path.is_file():
    return []
  rows = []
  for line in path.read_text(errors="replace").splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by a kill (or a corrupt one): ignore
      continue
  return rows


def plot_training(metrics: dict[str, Path], path: Path) -> Path | None:
  """Training loss and accuracy of each training stage against steps (one PNG).

  Args:
    metrics: ``metrics.jsonl`` of each training stage, in run order.
    path: the PNG to write.

  Returns:
    ``path``, or None when no stage logged a training step.
  """
  curves = {}
  for stage, file in metrics.items():
    rows = [r for r in _metrics(file) if r.get("kind") == "train" and "loss" in r]
    if rows:
      curves[stage] = rows
  if not curves:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  offset = 0
  for stage, rows in curves.items():
    steps = np.asarray([r["step"] for r in rows]) + offset
    mk = "o" if len(rows) < 20 else None
    axes[0].plot(steps, [r["loss"] for r in rows], marker=mk, label=stage)
    axes[1].plot(steps, [100 * r["accuracy"] for r in rows], marker=mk, label=stage)
    offset = int(steps[-1])
  axes[0].set(xlabel="step (stages end to end)", ylabel="train loss", title="Training loss")
  axes[1].set(
    xlabel="step (stages end to end)",
    ylabel="train accuracy (%)",
    title="Training accuracy (batch)",
  )
  for a in axes:
    a.grid(alpha=0.3)
    a.legend()
  fig.tight_layout()
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)
  return path


def _tiles(cost: dict[str, Any]) -> int:
  return int(sum(l["tiles"] * l["repeat"] for l in cost["layers"]))


def _accuracy(ev: dict[str, Any], drop: float) -> dict[str, Any]:
  """The accuracy figures (percent) and the test drop of the mixed model against INT8."""
  acc = {
    k: {"val": _pct(ev.get(k, {}).get("val")), "test": _pct(ev.get(k, {}).get("test"))}
    for k in ("fp32", "int8", "anyprec_proxy", "mixed")
  }
  test_drop = (
    acc["int8"]["test"] - acc["mixed"]["test"]
    if acc["int8"]["test"] is not None and acc["mixed"]["test"] is not None
    else None
  )
  return {
    "accuracy": acc,
    "allowed_drop": drop,
    "test_drop_vs_int8": None if test_drop is None else round(test_drop, 3),
    "within_allowed_drop": None if test_drop is None else bool(test_drop <= drop + 1e-9),
  }


def _data(s: RunSummary) -> dict[str, Any]:
  return {
    "train_images": s.train_images,
    "val_images": s.val_images,
    "test_images": s.test_images,
    "subset_note": (
      f"training used {s.train_images} of the train file's images "
      "(a subset, to fit the default run's time budget)"
      if s.train_subset
      else ""
    ),
    "epochs": dict(s.epochs),
    "source": s.data_info.get("source"),
    "skipped_images": int(s.data_info.get("skipped", 0) or 0),
    "skipped_paths": list(s.data_info.get("skipped_paths", []))[:10],
  }


def _cost(s: RunSummary) -> dict[str, Any]:
  """Per-layer and total latency, energy and crossbar tiles: 8/8 against the chosen policy."""
  base, chosen = s.cost_int8, s.cost_mixed
  return {
    "policy": s.policy,
    "layers": [
      {
        "name": a["name"],
        "type": a["type"],
        "w_bits": b["w_bits"],
        "a_bits": b["a_bits"],
        "tiles_8_8": a["tiles"] * a["repeat"],
        "tiles": b["tiles"] * b["repeat"],
        "latency_us_8_8": a["latency_us"],
        "latency_us": b["latency_us"],
        "energy_pj_8_8": a["energy_pj"],
        "energy_pj": b["energy_pj"],
      }
      for a, b in zip(base["layers"], chosen["layers"])
    ],
    "latency_us": {"int8": base["total_latency_us"], "mixed": chosen["total_latency_us"]},
    "energy_pj": {"int8": base["total_energy_pj"], "mixed": chosen["total_energy_pj"]},
    "crossbar_tiles": {"int8": _tiles(base), "mixed": _tiles(chosen)},
    "speedup": base["total_latency_us"] / chosen["total_latency_us"],
    "energy_saving": 1.0 - chosen["total_energy_pj"] / base["total_energy_pj"],
  }


def _search(res: dict[str, Any]) -> dict[str, Any]:
  """The search figures from the search stage's result."""
  search = res.get("summary", {})
  return {
    "searched": res.get("searched"),
    "agent": search.get("agent"),
    "evaluations": search.get("evals_used"),
    "budget": search.get("budget"),
    "wall_s": search.get("wall_s"),
    "acc_ref_val": search.get("acc_ref"),
    "acc_target_val": search.get("acc_target"),
    "best_reward": search.get("best_reward"),
    "search_images": res.get("search_images"),
    "final_images": res.get("final_images"),
    "source": res.get("source"),
    "chosen": res.get("chosen"),
    "image_passes": search.get("image_passes"),
    "lazy": search.get("lazy"),
  }


def _verification(comp: dict[str, Any]) -> dict[str, Any]:
  """The verification figures from the compile stage's result."""
  verify = comp.get("verify", {})
  return {
    "bit_exact": verify.get("ok"),
    "layers_checked": len(verify.get("layers", [])),
    "mismatched_layers": [
      c.get("name", c.get("index"))
      for c in verify.get("layers", [])
      if not (c.get("exact") and c.get("weights_match", True))
    ],
    "logits_equal": verify.get("logits_equal"),
    "cost_model_mismatches": comp.get("cost_model_mismatches"),
    "program_latency_us": comp.get("total_latency_us"),
    "program_energy_pj": comp.get("total_energy_pj"),
    "crossbar_accuracy": comp.get("accuracy"),
    "eval_images": comp.get("eval_images"),
  }


def build_report(s: RunSummary) -> dict[str, Any]:
  """Collects every figure of a finished run into one JSON-ready dict."""
  res = s.results
  report = {
    "model": s.model,
    "dataset": s.dataset,
    "hw": s.hw,
    "hw_description": s.hw_description,
    "latency_mode": s.latency_mode,
    "data": _data(s),
    **_accuracy(res["evaluate"], s.allowed_drop),
    **_cost(s),
    "search": _search(res["search"]),
    "verification": _verification(res["compile"]),
    "stage_time_s": {k: r.get("stage_time_s") for k, r in res.items()},
  }
  report["total_time_s"] = round(sum(v for v in report["stage_time_s"].values() if v), 1)
  return report


def _choice_text(c: dict[str, Any] | None) -> str:
  if not c or "final_accuracy" not in c:
    return ""
  text = (
    f": the chosen policy is number {c['rank_in_search'] + 1} of {c['pool']} by search "
    f"reward, {_fmt(c['final_accuracy'])}% there against a target of "
    f"{_fmt(c['final_target'])}% (the search's own winner scored "
    f"{_fmt(c['search_winner_final_accuracy'])}% there)"
  )
  if "lower_bound" not in c:
    return text
  passed = c.get("passed", 0)
  return text + (
    f". Paired with INT8 on the same images its difference is {c['acc_diff']:+.2f} points, "
    f"standard error {_fmt(c['diff_se'])}: lower bound at {_fmt(c['margin_se'], 1)} SE "
    f"{c['lower_bound']:+.2f} points; {passed} of {c['pool']} candidates clear the allowed "
    f"drop by that margin"
    + ("" if passed else " (none does, so the fastest that clears the target was taken)")
  )


def _fmt(v: Any, nd: int = 2) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:,.{nd}f}"
  return str(v)


def _intro_lines(r: dict[str, Any]) -> list[str]:
  """The title, the target and the data and training lengths."""
  lines = [
    f"# cimjax run: {r['model']} on {r['dataset']}, target {r['hw']}",
    "",
    f"Target: {r['hw_description']} (latency mode `{r['latency_mode']}`).",
    "",
  ]
  if r["data"]["subset_note"]:
    lines += [
      f"Note: {r['data']['subset_note']}; the test figures use "
      f"{r['data']['test_images']} test images.",
      "",
    ]
  skipped = r["data"].get("skipped_images", 0)
  if skipped:
    shown = ", ".join(f"`{p}`" for p in r["data"].get("skipped_paths", []))
    lines += [
      f"Data: {skipped:,} unreadable image{'s' if skipped != 1 else ''} skipped"
      + (f" (first: {shown})" if shown else "")
      + " (`train.data.on_bad_image=error` refuses them instead).",
      "",
    ]
  ep = r["data"].get("epochs")
  if ep:
    lines += [
      f"Training: {r['data']['train_images']:,} train images, "
      + ", ".join(f"{k} {v:g} epoch{'s' if v != 1 else ''}" for k, v in ep.items())
      + f"; {r['data']['val_images']:,} validation images (search and selection), "
      f"{r['data']['test_images']:,} test images (final figures only). Short "
      "schedules keep the run within minutes on a CPU; longer ones "
      "(`train/small_cnn_fashion.py`) gain about a point of FP32 accuracy.",
      "",
    ]
  return lines


def _accuracy_lines(r: dict[str, Any]) -> list[str]:
  a = r["accuracy"]
  return [
    "## Accuracy (top-1 %)",
    "",
    "| model | val | test |",
    "|---|---|---|",
    f"| FP32 | {_fmt(a['fp32']['val'])} | {_fmt(a['fp32']['test'])} |",
    f"| INT8 (8/8 QAT) | {_fmt(a['int8']['val'])} | {_fmt(a['int8']['test'])} |",
    f"| any-precision weights at the chosen policy (search proxy) | "
    f"{_fmt(a['anyprec_proxy']['val'])} | {_fmt(a['anyprec_proxy']['test'])} |",
    f"| mixed precision, fine-tuned | {_fmt(a['mixed']['val'])} | {_fmt(a['mixed']['test'])} |",
    "",
    f"Allowed drop: {r['allowed_drop']} points; test drop vs INT8: "
    f"{_fmt(r['test_drop_vs_int8'])} points "
    f"({'within' if r['within_allowed_drop'] else 'NOT within'} the allowed drop).",
    "",
  ]


def _cost_lines(r: dict[str, Any]) -> list[str]:
  lines = [
    "## CIM cost",
    "",
    "| | INT8 (8/8) | mixed | ratio |",
    "|---|---|---|---|",
    f"| latency (us / image) | {_fmt(r['latency_us']['int8'])} | {_fmt(r['latency_us']['mixed'])}"
    f" | speedup {r['speedup']:.3f}x |",
    f"| energy (pJ / image) | {_fmt(r['energy_pj']['int8'], 0)} | "
    f"{_fmt(r['energy_pj']['mixed'], 0)} | saving {100 * r['energy_saving']:.1f}% |",
    f"| crossbar tiles | {r['crossbar_tiles']['int8']} | {r['crossbar_tiles']['mixed']} | |",
    "",
    "### Per layer",
    "",
    "| layer | type | w/a bits | tiles 8/8 -> mixed | latency us 8/8 -> mixed | "
    "energy pJ 8/8 -> mixed |",
    "|---|---|---|---|---|---|",
  ]
  for l in r["layers"]:
    lines.append(
      f"| {l['name']} | {l['type']} | {l['w_bits']}/{l['a_bits']} | "
      f"{l['tiles_8_8']} -> {l['tiles']} | {_fmt(l['latency_us_8_8'])} -> "
      f"{_fmt(l['latency_us'])} | {_fmt(l['energy_pj_8_8'], 0)} -> "
      f"{_fmt(l['energy_pj'], 0)} |"
    )
  return lines


def _passes_text(s: dict[str, Any]) -> str:
  """The search's image-forward passes (and what lazy evaluation saved)."""
  passes, lazy = s.get("image_passes"), s.get("lazy")
  if not passes:
    return ""
  text = f" Image-forward passes: {passes:,}"
  if lazy and lazy.get("image_passes_full"):
    full = lazy["image_passes_full"]
    text += (
      f" (lazy evaluation, chunks of {lazy['chunk']}: {full / passes:.2f}x fewer than the "
      f"{full:,} of scoring every candidate on every image; stopped by the bound "
      f"{lazy['stopped_by_bound']}, by the sequential test {lazy['stopped_by_test']})"
    )
  return text + "."


def _search_lines(s: dict[str, Any]) -> list[str]:
  return [
    "",
    "## Search",
    "",
    (
      f"Agent `{s['agent']}`: {s['evaluations']} unique policies evaluated (budget "
      f"{s['budget']}) on {s['search_images']} held-out validation images in "
      f"{_fmt(s['wall_s'], 1)} s. Reference (the search proxy at 8/8) on that split "
      f"{_fmt(s['acc_ref_val'])}%, target {_fmt(s['acc_target_val'])}%. The best candidates "
      f"were re-evaluated on "
      f"{s['final_images']} other validation images before choosing"
      f"{_choice_text(s.get('chosen'))}.{_passes_text(s)}"
      if s["searched"]
      else f"No search: the policy was given ({s['source']})."
    ),
    "",
  ]


def _verification_lines(v: dict[str, Any]) -> list[str]:
  return [
    "## Compilation and verification",
    "",
    f"- Bit-exact (ideal ADC, no noise) on every layer: **{v['bit_exact']}** "
    f"({v['layers_checked']} layers; mismatched: {v['mismatched_layers'] or 'none'}; "
    f"logits equal: {v['logits_equal']}).",
    f"- Schedule-derived cost equals the cost model: "
    f"{'yes' if not v['cost_model_mismatches'] else v['cost_model_mismatches']} "
    f"(program latency {_fmt(v['program_latency_us'])} us, energy "
    f"{_fmt(v['program_energy_pj'], 0)} pJ).",
    _xbar_line(v),
    "",
  ]


def _plots_and_time_lines(r: dict[str, Any], plots: dict[str, str]) -> list[str]:
  lines = ["## Plots", ""]
  for title, rel in plots.items():
    lines += [f"### {title}", "", f"![{title}]({rel})", ""]
  lines += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
  for k, sec in r["stage_time_s"].items():
    lines.append(f"| {k} | {_fmt(sec, 1)} |")
  lines += [f"| total | {_fmt(r['total_time_s'], 1)} |", ""]
  return lines


def render_markdown(r: dict[str, Any], plots: dict[str, str]) -> str:
  """``report.md``: the report's figures as tables, with the plots embedded."""
  lines = [
    *_intro_lines(r),
    *_accuracy_lines(r),
    *_cost_lines(r),
    *_search_lines(r["search"]),
    *_verification_lines(r["verification"]),
    *_plots_and_time_lines(r, plots),
  ]
  return "\n".join(lines)


def _xbar_line(v: dict[str, Any]) -> str:
  acc = v.get("crossbar_accuracy") or {}
  if not acc:
    return "- Crossbar-simulated accuracy: not measured."
  return (
    f"- Test accuracy on {v['eval_images']} images: fake-quantised model "
    f"{100 * acc['fake_quant']:.2f}%, crossbar simulator with the target's ADC "
    f"{100 * acc['crossbar']:.2f}%."
  )


def write_report(summary: RunSummary, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes ``report.json``, ``report.md`` and the training plot; logs a short summary.

  Args:
    summary: the run's figures.
    log: a function printing one line (the summary).

  Returns:
    The report (the contents of ``report.json``).
  """
  r = build_report(summary)
  wd = summary.workdir
  plots = {}
  for title, name in (
    ("Pareto front (search)", "pareto.png"),
    ("Per-layer bits", "bits.png"),
    ("Per-layer latency, 8/8 vs chosen", "latency.png"),
  ):
    if (summary.search_dir / name).is_file():
      plots[title] = f"search/{name}"
  if plot_training(summary.metrics, wd / "plots" / "training.png"):
    plots["Training curves"] = "plots/training.png"
  r["plots"] = plots
  io.write_json(wd / "report.json", r)
  io.write_text(wd / "report.md", render_markdown(r, plots))
  log(summary_line(r))
  return r


def summary_line(r: dict[str, Any]) -> str:
  """The short summary printed at the end of a run."""
  a = r["accuracy"]
  v = r["verification"]
  return (
    f"{r['model']} on {r['hw']}: speedup {r['speedup']:.2f}x over INT8, energy "
    f"-{100 * r['energy_saving']:.1f}%, tiles {r['crossbar_tiles']['int8']} -> "
    f"{r['crossbar_tiles']['mixed']}; test accuracy FP32 {_fmt(a['fp32']['test'])}%, INT8 "
    f"{_fmt(a['int8']['test'])}%, mixed {_fmt(a['mixed']['test'])}% (drop "
    f"{_fmt(r['test_drop_vs_int8'])} <= {r['allowed_drop']}: {r['within_allowed_drop']}); "
    f"bit-exact: {v['bit_exact']}; policy {r['policy']}"
  )
