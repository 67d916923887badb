"""``cimjax`` / ``python -m launch.run``: the whole flow on the embedded default, or your setup.

Stages: FP32 pretraining, INT8 QAT, any-precision QAT, bit-width search, mixed-precision
fine-tuning of the chosen policy, final test evaluation, compilation with bit-exact
verification, and the report (``WORKDIR/report.md``, ``WORKDIR/report.json``). Finished stages
are skipped on a re-run and an interrupted one resumes from its checkpoint.

Examples::

  cimjax                                        # the default, into runs/default
  cimjax --workdir=runs/c4 --hw=rram_256_c4     # the reference work's target
  cimjax --stages=search,finetune,evaluate,compile,report --config.search.budget=3000
  cimjax --from_policy=policy.npy --workdir=runs/given   # skip the search
  cimjax --config=train/run_tiny.py --workdir=runs/tiny      # a config file (about a minute)
  cimjax --config=train/resnet20_fashion.py --workdir=runs/r20 --stages=fp32,int8,anyprec

``--config`` is a run config (``get_config()`` file; see :mod:`cimjax.configs`), default the
embedded one (``cimjax/configs/default_run.py``); any field can be overridden with
``--config.<field>=<value>`` (e.g. ``--config.train.fp32.epochs=1``).

Exit status 0 on success; 2 with one line ``error: ...`` on stderr for bad input (flag, config
field, data, policy file, hardware target: any :class:`cimjax.errors.CimjaxError`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cimjax import cli as cli_lib
from cimjax.configs import DEFAULT_RUN
from cimjax.errors import CimjaxError

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
config_flags.DEFINE_config_file(
  "config",
  DEFAULT_RUN,
  "Run config (a get_config() file, default: the embedded default); "
  "override fields with --config.<field>=<value>.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "workdir", "runs/default", "Run directory (checkpoints, outputs, report).", flag_values=FLAGS
)
flags.DEFINE_list(
  "stages",
  None,
  "Stages to run (default all): fp32, int8, anyprec, search, finetune, evaluate, compile, report.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "from_policy",
  None,
  "Use this CIM-AQ-format .npy policy instead of searching (sets config.from_policy).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "hw", None, "Hardware target name or .toml path (sets config.hw).", flag_values=FLAGS
)
flags.DEFINE_integer(
  "budget",
  None,
  "Search budget in evaluated policies (sets config.search.budget).",
  flag_values=FLAGS,
)


def run_config() -> ml_collections.ConfigDict:
  """``--config`` with ``--from_policy``, ``--hw`` and ``--budget`` applied."""
  config = FLAGS.config
  if FLAGS.from_policy:
    config.from_policy = FLAGS.from_policy
  if FLAGS.hw:
    config.hw = FLAGS.hw
  if FLAGS.budget is not None:
    if FLAGS.budget < 1:
      _fail(f"--budget = {FLAGS.budget}; allowed: an integer >= 1")
    config.search.budget = FLAGS.budget
  return config


def main(argv: Sequence[str]) -> None:
  """absl entry point: runs the pipeline (:class:`cimjax.pipeline.Pipeline`) the flags describe."""
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from cimjax import pipeline  # pylint: disable=g-import-not-at-top

  config = run_config()
  logging.set_verbosity(logging.WARNING)
  try:
    pipe = pipeline.Pipeline(config, FLAGS.workdir)
    print(pipe.describe(), flush=True)
    report = pipe.run(FLAGS.stages or pipeline.STAGES)
  except CimjaxError as e:
    _fail(cli_lib.one_line(e))
  if report is not None:
    print(f"report: {FLAGS.workdir}/report.md")


def _fail(msg: str) -> NoReturn:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def run() -> None:
  """Console-script entry point (``cimjax``)."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, "cimjax"))


if __name__ == "__main__":
  run()
