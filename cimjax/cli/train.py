"""Train one stage of the FP32 -> INT8 -> any-precision -> fine-tune pipeline.

Usage (from the repository root)::

  python -m launch.train --config=train/small_cnn_fashion.py --workdir=/tmp/w --stage=fp32
  python -m launch.train --config=train/tiny.py --workdir=/tmp/w --stage=int8 \
      --config.int8.lr=1e-4 --config.batch_size=64
  python -m launch.train --config=train/tiny.py --workdir=/tmp/w --stage=finetune \
      --policy=best.npy

``--config`` is a big_vision-style Python file with ``get_config()`` (see ``train/``); any field
can be overridden with ``--config.<field>=<value>``. Each stage lives in ``WORKDIR/<stage>/``
(fine-tuning in ``WORKDIR/finetune/<policy file stem>/``) and starts from the previous stage's
final variables. An interrupted stage resumes from its last checkpoint; a finished stage is
detected (``result.json``) and not redone. The result JSON is printed on stdout at the end.

Exit status 0 on success; 2 with one line on stderr for a usage error: a missing
prerequisite stage, a bad policy file, an unknown or badly typed config field, a config file
that does not load, missing data files.
"""

from __future__ import annotations

import json
import logging as py_logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from cimjax import cli as cli_lib
from cimjax.cli import UsageError

PROG = "launch.train"


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  fv = cli_lib.config_flag_values(
    argv,
    "Experiment config file (train/*.py with get_config()); override fields "
    "with --config.<field>=<value>.",
  )
  flags.DEFINE_string(
    "workdir", None, "Experiment directory (one subdirectory per stage).", flag_values=fv
  )
  flags.DEFINE_enum(
    "stage", None, ["fp32", "int8", "anyprec", "finetune"], "Stage to run.", flag_values=fv
  )
  flags.DEFINE_string(
    "policy",
    None,
    "Policy .npy (int [L, 2] weight/activation bits) for --stage=finetune.",
    flag_values=fv,
  )
  return fv


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into a fresh ``FlagValues``.

  Raises:
    UsageError: unknown flag, unknown or badly typed config field, config file that does not
      load, missing required flag.
  """
  return cli_lib.parse_config_args(
    _define_flags(argv), argv, required=("config", "workdir", "stage")
  )


parse_flags = cli_lib.usage_parser(parse_args, PROG)


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


def run_from_flags(fv: flags.FlagValues) -> dict[str, Any]:
  """Runs the stage the flags ask for and returns its result.

  Raises:
    UsageError: anything the user can fix (exit status 2).
  """
  # Heavy imports here, so that --help and usage errors are fast.
  from cimjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from cimjax import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top

  config = fv.config
  stage = fv.stage
  policy = policy_name = None
  if stage == "finetune":
    if not fv.policy:
      raise UsageError("--stage=finetune needs --policy=FILE.npy")
    try:
      policy = policy_lib.load_policy(fv.policy)
    except policy_lib.PolicyError as e:
      raise UsageError(f"--policy: {cli_lib.one_line(e)}") from None
    policy_name = Path(fv.policy).stem
  elif fv.policy:
    raise UsageError(f"--policy is only used by --stage=finetune, not --stage={stage}")
  try:
    return train_lib.run_stage(config, stage, fv.workdir, policy=policy, policy_name=policy_name)
  except (train_lib.ConfigError, train_lib.StageError, data_lib.DataError) as e:
    raise UsageError(cli_lib.one_line(e)) from None


def main(argv: Sequence[str] | flags.FlagValues) -> int:
  """Entry point: ``argv`` (program name first) or flags parsed by :func:`parse_flags`.

  Returns:
    The exit status: 0, or 2 after printing one line on stderr.
  """
  try:
    fv = argv if isinstance(argv, flags.FlagValues) else parse_args(argv)
    _quiet_orbax()
    result = run_from_flags(fv)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, sort_keys=True))
  return 0


def run() -> None:
  """Console-script style entry point."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
