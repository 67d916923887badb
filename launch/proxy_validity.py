"""How well the any-precision proxy ranks bit policies: ``python -m launch.proxy_validity``.

The search scores candidates with the shared any-precision weights, without fine-tuning (the
proxy). The reference work fine-tunes every candidate instead. This measures the Spearman rank
correlation between the proxy accuracy and the accuracy after a real mixed-precision
fine-tune of each policy, over random policies.

Usage (after the fp32, int8 and anyprec stages of a training run in WORKDIR)::

  python -m launch.proxy_validity --config=train/small_cnn_fashion.py --workdir=W \
      --num_policies=20 --finetune_epochs=0.25 --out=proxy.json

Each fine-tune is a ``finetune`` stage in ``W/finetune/proxy_<i>`` (resumable; finished ones
are reused). Prints a table and the correlations; writes JSON with ``--out``. Bad input (any
:class:`cimjax.errors.CimjaxError`) prints one line ``launch.proxy_validity: error: ...`` on
stderr and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cimjax import cli as cli_lib
from cimjax.errors import CimjaxError, UsageError

PROG = "launch.proxy_validity"

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
config_flags.DEFINE_config_file("config", None, "Training config (train/*.py).", flag_values=FLAGS)
flags.DEFINE_string(
  "workdir", None, "Training workdir holding a finished anyprec stage.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "num_policies", 20, "Random policies to compare (at least 3).", flag_values=FLAGS
)
flags.DEFINE_float("finetune_epochs", 0.25, "Fine-tuning epochs per policy.", flag_values=FLAGS)
flags.DEFINE_string("constraint", "none", "Constraint of the random policies.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the random policies.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Write the results as JSON here.", flag_values=FLAGS)


def rankdata(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share the mean rank), as used by Spearman's rho."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(len(x), dtype=np.float64)
  for v in np.unique(x):
    tie = x == v
    ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (Pearson correlation of the average ranks)."""
  ra, rb = rankdata(a), rankdata(b)
  ra -= ra.mean()
  rb -= rb.mean()
  den = np.sqrt((ra**2).sum() * (rb**2).sum())
  return float((ra * rb).sum() / den) if den > 0 else float("nan")


def measure(
  config: Any, workdir: str, num_policies: int, finetune_epochs: float, constraint: str, seed: int
) -> dict[str, Any]:
  """Proxy vs fine-tuned accuracy of random policies; returns a JSON-able dict."""
  from cimjax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from cimjax import policy as policy_lib
  from cimjax import train as train_lib
  from cimjax.trace import trace_specs

  splits = train_lib.load_splits(config)
  model = train_lib.build_model(config, splits)
  specs = trace_specs(model)
  variables = train_lib.load_variables(train_lib.stage_dir(workdir, "anyprec"), model)
  cell = config.bits.cell_bits or 2
  mask = policy_lib.action_mask(len(specs), constraint, cell)
  pols = np.asarray(policy_lib.random_policies(jax.random.key(seed), mask, num_policies))
  proxy = eval_lib.make_evaluator(model, variables, splits.val.images, splits.val.labels)(pols)
  config = config.copy_and_resolve_references()
  config.finetune.epochs = float(finetune_epochs)
  config.finetune.steps = 0
  config.finetune.source = "anyprec"
  config.progress = False
  rows = []
  for i, p in enumerate(pols):
    r = train_lib.run_stage(
      config, "finetune", workdir, policy=p, policy_name=f"proxy_{i}", splits=splits
    )
    ev = r["eval"]["policy"]
    rows.append(
      {
        "policy": p.tolist(),
        "proxy_val": float(proxy.accuracy[i]),
        "finetuned_val": float(ev["val"]),
        "finetuned_test": float(ev["test"]),
      }
    )
    print(
      f"  {i:3d} proxy {proxy.accuracy[i]:6.2f}  fine-tuned val {ev['val']:6.2f}  "
      f"test {ev['test']:6.2f}  {p.tolist()}",
      flush=True,
    )
  pv = np.asarray([r["proxy_val"] for r in rows])
  fv = np.asarray([r["finetuned_val"] for r in rows])
  ft = np.asarray([r["finetuned_test"] for r in rows])
  return {
    "num_policies": num_policies,
    "finetune_epochs": finetune_epochs,
    "constraint": constraint,
    "seed": seed,
    "val_images": len(splits.val),
    "spearman_proxy_vs_finetuned_val": spearman(pv, fv),
    "spearman_proxy_vs_finetuned_test": spearman(pv, ft),
    "mean_gain_from_finetune": float(np.mean(fv - pv)),
    "rows": rows,
  }


def main(argv: Sequence[str]) -> None:
  """absl entry point."""
  del argv
  from cimjax import io  # pylint: disable=g-import-not-at-top

  try:
    if FLAGS.config is None or not FLAGS.workdir:
      raise UsageError("--config and --workdir are required")
    if FLAGS.num_policies < 3:
      raise UsageError(f"--num_policies = {FLAGS.num_policies}; allowed: >= 3")
    res = measure(
      FLAGS.config.train,
      FLAGS.workdir,
      FLAGS.num_policies,
      FLAGS.finetune_epochs,
      FLAGS.constraint,
      FLAGS.seed,
    )
  except CimjaxError as e:
    cli_lib.fail(PROG, e)
  print(
    f"Spearman(proxy, fine-tuned val) = {res['spearman_proxy_vs_finetuned_val']:.3f}; "
    f"Spearman(proxy, fine-tuned test) = {res['spearman_proxy_vs_finetuned_test']:.3f}; "
    f"mean gain from fine-tuning {res['mean_gain_from_finetune']:.2f} points "
    f"({res['num_policies']} policies)"
  )
  if FLAGS.out:
    io.write_json(FLAGS.out, res)


def run() -> None:
  """Entry point of ``python -m launch.proxy_validity``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
