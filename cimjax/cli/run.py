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

Progress: a live bar per long stage on a terminal, a plain line every 10 s or 25% otherwise
(stderr; ``--config.train.progress=False``: none). Library INFO logging is off unless
``--verbosity=0`` (absl's ``-v``) is given.

Everything the run will need is checked before the first stage starts
(:func:`cimjax.pipeline.validate_run`): a bad field, target, model, policy file or dataset is
reported and nothing is written, not even the workdir. A workdir that another live run holds is
refused (its lock, :mod:`cimjax.lock`).

Exit status 0 on success; 2 with one line ``cimjax: error: ...`` on stderr for bad input (flag,
config field, data, policy file, hardware target, a busy workdir, a corrupt file: any
:class:`cimjax.errors.CimjaxError`) and for a workdir that cannot be created or written (an
``OSError``: ``cimjax: error: PATH: REASON``); 1 for an internal error (a bug: its traceback
between two lines saying so).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from cimjax import cli as cli_lib
from cimjax import configs
from cimjax import progress as progress_lib
from cimjax.cli import distributed as distributed_lib
from cimjax.configs import DEFAULT_RUN
from cimjax.errors import UsageError

PROG = "cimjax"
_CONFIG_HELP = (
  "Run config (a get_config() file, default: the embedded default); "
  "override fields with --config.<field>=<value>."
)

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
configs.define_config_flag(FLAGS, _CONFIG_HELP, default=DEFAULT_RUN)
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
distributed_lib.define_flags(FLAGS)


def run_config(fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
  """``--config`` with ``--from_policy``, ``--hw`` and ``--budget`` applied.

  Raises:
    UsageError: ``--budget`` below 1.
  """
  config = fv.config
  if fv.from_policy:
    config.from_policy = fv.from_policy
  if fv.hw:
    config.hw = fv.hw
  if fv.budget is not None:
    if fv.budget < 1:
      raise UsageError(f"--budget={fv.budget}: allowed values are integers >= 1")
    config.search.budget = fv.budget
  return config


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into :data:`FLAGS` and loads the config.

  Raises:
    UsageError: unknown flag, unknown or badly typed config field, a config file that does not
      load, positional arguments.
  """
  configs.define_config_flag(FLAGS, _CONFIG_HELP, argv, default=DEFAULT_RUN)
  return cli_lib.parse_config_args(FLAGS, argv, required=())


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """An ``absl.app.run`` flags parser: ``--help`` lists the flags; bad input exits with 2."""
  if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
    print(f"usage: {PROG} [flags]\n\n{FLAGS.get_help()}")
    sys.exit(0)
  return cli_lib.usage_parser(parse_args, PROG)(argv)


def run_from_flags(fv: flags.FlagValues = FLAGS) -> None:
  """Checks everything, then runs the pipeline (:class:`cimjax.pipeline.Pipeline`) the flags
  describe.

  Raises:
    CimjaxError: bad input (nothing written), a busy workdir, a stage that cannot run.
    OSError: the workdir cannot be created or written.
  """
  from cimjax import multihost, pipeline  # pylint: disable=g-import-not-at-top

  distributed_lib.check_flags(fv)
  if distributed_lib.wanted(fv):
    distributed_lib.initialize(fv)
  config = run_config(fv)
  progress_lib.default_verbosity()  # WARNING unless --verbosity/-v is given (-v 0: INFO)
  leader = multihost.is_leader()  # multi-process: process 0 prints and shows progress
  if not leader:
    config.train.progress = False
  pipe = pipeline.Pipeline(config, fv.workdir, log=print_line if leader else lambda line: None)
  stages = pipe.validate(fv.stages or pipeline.STAGES)  # before anything is written
  pipe.log(pipe.describe())
  report = pipe.run(stages)
  if report is not None and leader:
    print(f"report: {fv.workdir}/report.md")


def print_line(line: str) -> None:
  """Prints one progress line of the run (flushed)."""
  print(line, flush=True)


def main(argv: Sequence[str] | flags.FlagValues) -> int:
  """Entry point: ``argv`` (program name first) or flags parsed by :func:`parse_flags`.

  Returns:
    The exit status (:func:`cimjax.cli.run_main`): 0, 2 after one line on stderr, 1 on a bug.
  """

  def body() -> None:
    fv = argv if isinstance(argv, flags.FlagValues) else parse_args(argv)
    run_from_flags(fv)

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Console-script entry point (``cimjax``)."""
  cli_lib.run_console(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
