"""The end-to-end run's report: ``report.json`` (every figure), ``report.md`` (tables + plots).

Accuracies are top-1 in percent. Latency, energy and crossbar counts come from the cost model
of the run's hardware target (:func:`cimjax.cost.layer_report`); the compile stage checks that
the compiled program's schedule gives the same figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cimjax import cost as cost_lib  # noqa: E402
from cimjax import io  # noqa: E402
from cimjax import policy as policy_lib  # noqa: E402

TRAIN_STAGES = ("fp32", "int8", "anyprec", "finetune")


def _read(path: Path) -> dict[str, Any]:
  return json.loads(path.read_text()) if path.is_file() else {}


def _pct(v: Any) -> float | None:
  return None if v is None else round(100.0 * float(v), 3)


def _metrics(path: Path) -> list[dict[str, Any]]:
  if not path.is_file():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by a kill: ignore
      continue
  return rows


def plot_training(pipe: Any, path: Path) -> Path | None:
  """Training loss and accuracy of each training stage against steps (one PNG)."""
  curves = {}
  for stage in TRAIN_STAGES:
    rows = [
      r
      for r in _metrics(pipe.stage_dir(stage) / "metrics.jsonl")
      if r.get("kind") == "train" and "loss" in r
    ]
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


def build_report(pipe: Any) -> dict[str, Any]:
  """Collects every figure of a finished run into one JSON-ready dict."""
  cfg = pipe.config
  t = cfg.train
  res = {
    s: _read(pipe.stage_dir(s) / "result.json")
    for s in ("fp32", "int8", "anyprec", "search", "finetune", "evaluate", "compile")
  }
  ev = res["evaluate"]
  specs, _ = pipe.specs_and_tables()
  n = len(specs)
  policy = np.asarray(ev.get("policy") or res["search"]["chosen_policy"], np.int32)
  base = cost_lib.layer_report(specs, pipe.hw, policy_lib.uniform_policy(n, 8, 8))
  chosen = cost_lib.layer_report(specs, pipe.hw, policy)
  tiles8 = int(sum(l["tiles"] * l["repeat"] for l in base["layers"]))
  tiles_c = int(sum(l["tiles"] * l["repeat"] for l in chosen["layers"]))
  acc = {
    k: {"val": _pct(ev.get(k, {}).get("val")), "test": _pct(ev.get(k, {}).get("test"))}
    for k in ("fp32", "int8", "anyprec_proxy", "mixed")
  }
  drop = float(cfg.search.acc_drop)
  test_drop = (
    acc["int8"]["test"] - acc["mixed"]["test"]
    if acc["int8"]["test"] is not None and acc["mixed"]["test"] is not None
    else None
  )
  search = res["search"].get("summary", {})
  comp = res["compile"]
  verify = comp.get("verify", {})
  splits = pipe.splits
  report = {
    "model": t.model,
    "dataset": t.data.name,
    "hw": pipe.hw.name,
    "hw_description": pipe.hw.description,
    "latency_mode": pipe.hw.latency_mode,
    "data": {
      "train_images": len(splits.train),
      "val_images": len(splits.val),
      "test_images": len(splits.test),
      "subset_note": (
        f"training used {len(splits.train)} of the train file's images "
        "(a subset, to fit the default run's time budget)"
        if t.data.train_size and t.data.train_size > 0
        else ""
      ),
      "epochs": {st: float(t[st].epochs) for st in ("fp32", "int8", "anyprec", "finetune")},
    },
    "accuracy": acc,
    "allowed_drop": drop,
    "test_drop_vs_int8": None if test_drop is None else round(test_drop, 3),
    "within_allowed_drop": None if test_drop is None else bool(test_drop <= drop + 1e-9),
    "policy": policy.tolist(),
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
    "crossbar_tiles": {"int8": tiles8, "mixed": tiles_c},
    "speedup": base["total_latency_us"] / chosen["total_latency_us"],
    "energy_saving": 1.0 - chosen["total_energy_pj"] / base["total_energy_pj"],
    "search": {
      "searched": res["search"].get("searched"),
      "agent": search.get("agent"),
      "evaluations": search.get("evals_used"),
      "budget": search.get("budget"),
      "wall_s": search.get("wall_s"),
      "acc_ref_val": search.get("acc_ref"),
      "acc_target_val": search.get("acc_target"),
      "best_reward": search.get("best_reward"),
      "search_images": res["search"].get("search_images"),
      "final_images": res["search"].get("final_images"),
      "source": res["search"].get("source"),
      "chosen": res["search"].get("chosen"),
    },
    "verification": {
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
    },
    "stage_time_s": {s: res[s].get("stage_time_s") for s in res},
  }
  report["total_time_s"] = round(sum(v for v in report["stage_time_s"].values() if v), 1)
  return report


def _choice_text(c: dict[str, Any] | None) -> str:
  if not c or "final_accuracy" not in c:
    return ""
  return (
    f": the chosen policy is number {c['rank_in_search'] + 1} of {c['pool']} by search "
    f"reward, {_fmt(c['final_accuracy'])}% there against a target of "
    f"{_fmt(c['final_target'])}% (the search's own winner scored "
    f"{_fmt(c['search_winner_final_accuracy'])}% there)"
  )


def _fmt(v: Any, nd: int = 2) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:,.{nd}f}"
  return str(v)


def render_markdown(r: dict[str, Any], plots: dict[str, str]) -> str:
  """``report.md``: the report's figures as tables, with the plots embedded."""
  a = r["accuracy"]
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
  lines += [
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
  s = r["search"]
  v = r["verification"]
  lines += [
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
      f"{_choice_text(s.get('chosen'))}."
      if s["searched"]
      else f"No search: the policy was given ({s['source']})."
    ),
    "",
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
    "## Plots",
    "",
  ]
  for title, rel in plots.items():
    lines += [f"### {title}", "", f"![{title}]({rel})", ""]
  lines += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
  for k, sec in r["stage_time_s"].items():
    lines.append(f"| {k} | {_fmt(sec, 1)} |")
  lines += [f"| total | {_fmt(r['total_time_s'], 1)} |", ""]
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


def write_report(pipe: Any) -> dict[str, Any]:
  """Writes ``report.json``, ``report.md`` and the training plot; prints a short summary."""
  r = build_report(pipe)
  wd = pipe.workdir
  plots = {}
  for title, name in (
    ("Pareto front (search)", "pareto.png"),
    ("Per-layer bits", "bits.png"),
    ("Per-layer latency, 8/8 vs chosen", "latency.png"),
  ):
    if (pipe.stage_dir("search") / name).is_file():
      plots[title] = f"search/{name}"
  if plot_training(pipe, wd / "plots" / "training.png"):
    plots["Training curves"] = "plots/training.png"
  r["plots"] = plots
  io.write_json(wd / "report.json", r)
  io.write_text(wd / "report.md", render_markdown(r, plots))
  pipe.log(summary_line(r))
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
