"""Train one stage of the FP32 -> INT8 -> any-precision -> fine-tune pipeline.

Usage (from the repository root)::

  python -m launch.train --config=train/small_cnn_fashion.py --workdir=/tmp/w --stage=fp32
  python -m launch.train --config=train/tiny.py --workdir=/tmp/w --stage=int8 \
      --config.int8.lr=1e-4 --config.batch_size=64
  python -m launch.train --config=train/tiny.py --workdir=/tmp/w --stage=finetune \
      --policy=best.npy

``--config`` is a run config, a big_vision-style Python file with ``get_config()`` (see
``train/`` and :mod:`cimjax.configs`); this command trains with its ``train`` part. A field of
that part can be overridden with ``--config.<field>=<value>`` (short for
``--config.train.<field>=<value>``; the run config's own fields keep their names). Each stage
lives in ``WORKDIR/<stage>/`` (fine-tuning in ``WORKDIR/finetune/<policy file stem>/``) and
starts from the previous stage's final variables. An interrupted stage resumes from its last
checkpoint; a finished stage is detected (``result.json``) and not redone. The result JSON is
printed on stdout at the end. ``cimjax --stages=fp32,int8,anyprec`` runs the same stages in one
command.

Everything is checked before anything is written (the config's fields, the policy's length, the
prerequisite stage, the dataset's files; the data is loaded too), then the workdir is created
and locked (:mod:`cimjax.lock`: a workdir another live run holds is refused). A corrupt newest
checkpoint is skipped for the newest intact one (one warning line); with none intact the stage
restarts from its beginning.

Exit status 0 on success; 2 with one line ``launch.train: error: ...`` on stderr for bad input
(any :class:`cimjax.errors.CimjaxError`): a missing prerequisite stage, a bad policy file, an
unknown or badly typed config field, a config file that does not load, missing data files, a
busy workdir, a corrupt file; and for an ``OSError`` (``PATH: REASON``: a workdir that cannot be
created, a full disk). 1 for an internal error (a bug: its traceback between two lines).
"""

from __future__ import annotations

import json
import logging as py_logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags, logging

from cimjax import cli as cli_lib
from cimjax import configs
from cimjax import progress as progress_lib
from cimjax.errors import UsageError
from cimjax.train import STAGES

PROG = "launch.train"
_CONFIG_HELP = (
  "Run config file (train/*.py with get_config()); trains its train part. Override a field "
  "of that part with --config.<field>=<value>."
)

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
configs.define_config_flag(FLAGS, _CONFIG_HELP)
flags.DEFINE_string(
  "workdir", None, "Experiment directory (one subdirectory per stage).", flag_values=FLAGS
)
flags.DEFINE_enum("stage", None, list(STAGES), "Stage to run.", flag_values=FLAGS)
flags.DEFINE_string(
  "policy",
  None,
  "Policy .npy (int [L, 2] weight/activation bits) for --stage=finetune.",
  flag_values=FLAGS,
)


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into :data:`FLAGS` and loads the config.

  Raises:
    UsageError: unknown flag, unknown or badly typed config field, config file that does not
      load, missing required flag.
  """
  argv, renamed = configs.expand_train_overrides(argv)
  configs.define_config_flag(FLAGS, _CONFIG_HELP, argv)
  try:
    return cli_lib.parse_config_args(FLAGS, argv, required=("config", "workdir", "stage"))
  except UsageError as e:
    raise UsageError(configs.restore_names(str(e), renamed)) from None


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """An ``absl.app.run`` flags parser: ``--help`` lists the flags; bad input exits with 2."""
  if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
    print(f"usage: {PROG} [flags]\n\n{FLAGS.get_help()}")
    sys.exit(0)
  return cli_lib.usage_parser(parse_args, PROG)(argv)


class _NoOrbaxInfo(py_logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines a checkpoint); keeps its warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def _quiet_orbax() -> None:
  for logger in (py_logging.getLogger(), py_logging.getLogger("absl")):
    for h in logger.handlers:
      if not any(isinstance(f, _NoOrbaxInfo) for f in h.filters):
        h.addFilter(_NoOrbaxInfo())
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _NoOrbaxInfo) for f in handler.filters):
    handler.addFilter(_NoOrbaxInfo())


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config of a run config: its ``train`` part.

  Cell bits left at 0 under a constraint that needs them come from the run's target (as the
  pipeline fills them); the other fields are used as they are.
  """
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top

  t = config.train
  if t.bits.constraint in ("weight", "both") and not t.bits.cell_bits:
    try:
      t.bits.cell_bits = hw_lib.load_hw(config.hw).cell_bits
    except hw_lib.HwError as e:
      raise UsageError(f"config.hw = {config.hw!r}: {cli_lib.one_line(e)}") from None
  return t


def run_from_flags(fv: flags.FlagValues = FLAGS) -> dict[str, Any]:
  """Runs the stage the flags ask for (:func:`cimjax.train.run_stage`) and returns its result.

  Raises:
    CimjaxError: anything the user can fix (exit status 2).
  """
  from cimjax import lock as lock_lib  # pylint: disable=g-import-not-at-top
  from cimjax import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top
  from cimjax.train import config as train_config  # pylint: disable=g-import-not-at-top
  from cimjax.train import runner  # pylint: disable=g-import-not-at-top

  policy = policy_name = None
  if fv.stage == "finetune":
    if not fv.policy:
      raise UsageError("--stage=finetune needs --policy=FILE.npy")
    try:
      policy = policy_lib.load_policy(fv.policy)
    except policy_lib.PolicyError as e:
      raise UsageError(f"--policy: {cli_lib.one_line(e)}") from None
    policy_name = Path(fv.policy).stem
  elif fv.policy:
    raise UsageError(f"--policy is only used by --stage=finetune, not --stage={fv.stage}")
  config = training_config(fv.config)
  kw = dict(policy=policy, policy_name=policy_name)
  # Everything is checked and the data loaded before the workdir is created and locked.
  sdir = runner.check_stage(config, fv.stage, fv.workdir, **kw)
  if runner.read_result(sdir) is not None:  # finished: its result, nothing written
    return train_lib.run_stage(config, fv.stage, fv.workdir, **kw)
  splits = train_config.check_data(config) or train_lib.load_splits(config)
  with lock_lib.workdir_lock(fv.workdir):
    return train_lib.run_stage(config, fv.stage, fv.workdir, splits=splits, **kw)


def main(argv: Sequence[str] | flags.FlagValues) -> int:
  """Entry point: ``argv`` (program name first) or flags parsed by :func:`parse_flags`.

  Returns:
    The exit status (:func:`cimjax.cli.run_main`): 0, 2 after one line on stderr, 1 on a bug.
  """

  def body() -> None:
    fv = argv if isinstance(argv, flags.FlagValues) else parse_args(argv)
    _quiet_orbax()
    result = run_from_flags(fv)
    print(json.dumps(result, sort_keys=True))

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Console-script entry point (``cimjax-train``)."""
  cli_lib.run_console(progress_lib.quiet_main(main), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
