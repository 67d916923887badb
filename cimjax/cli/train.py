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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

PROG = "launch.train"


class UsageError(Exception):
  """Bad command-line input; one line on stderr, exit status 2."""


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (train/*.py with get_config()); override fields "
      "with --config.<field>=<value>.", flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Experiment directory (one subdirectory per stage).",
                      flag_values=fv)
  flags.DEFINE_enum("stage", None, ["fp32", "int8", "anyprec", "finetune"], "Stage to run.",
                    flag_values=fv)
  flags.DEFINE_string("policy", None, "Policy .npy (int [L, 2] weight/activation bits) for "
                      "--stage=finetune.", flag_values=fv)
  return fv


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def _unknown_field(argv: Sequence[str], e: BaseException) -> str | None:
  """ml_collections reports an override of a missing field as a bare KeyError/AttributeError
  naming the field; turn it into one line naming the flag."""
  for err in (e, e.__cause__, e.__context__):
    if isinstance(err, (KeyError, AttributeError)):
      name = _one_line(err).strip("'\"")
      for a in argv:
        if a.startswith("--config.") and name in a.split("=", 1)[0].split(".")[1:]:
          return f"{a.split('=', 1)[0]}: unknown config field {name!r}"
  return None


def _config_error(argv: Sequence[str], e: BaseException) -> str:
  """One line for a config file that does not load."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is not None:
    file = path.split(":", 1)[0]
    if not Path(file).is_file():
      return f"config file not found: {file}"
  cause = e.__cause__ or e.__context__
  lines = [l.strip() for l in str(cause or e).splitlines() if l.strip()]
  return f"cannot load config file {path}: {lines[-1] if lines else type(e).__name__}"


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into a fresh ``FlagValues``.

  Raises:
    UsageError: unknown flag, unknown or badly typed config field, config file that does not
      load, missing required flag.
  """
  argv = list(argv)
  fv = _define_flags(argv)
  try:
    with warnings.catch_warnings():
      # ml_collections loads config files with the deprecated importlib load_module().
      warnings.filterwarnings("ignore", message=r".*load_module\(\) method is deprecated",
                              category=DeprecationWarning)
      rest = fv(argv)
      if fv["config"].value is not None:
        fv.config.keys()  # the file is loaded lazily: surface its errors here
  except flags.Error as e:
    raise UsageError(_one_line(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    unknown = _unknown_field(argv, e)
    if unknown:
      raise UsageError(unknown) from None
    raise UsageError(f"--config: {_config_error(argv, e)}") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
  for name in ("config", "workdir", "stage"):
    if fv[name].value is None:
      raise UsageError(f"--{name} is required")
  return fv


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """``absl.app.run`` flags parser: absl's own flags on the global FLAGS, ours on a fresh set;
  a usage error exits with status 2 and one line on stderr."""
  rest = flags.FLAGS(list(argv), known_only=True)
  try:
    return parse_args(rest)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    sys.exit(2)


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
      raise UsageError(f"--policy: {_one_line(e)}") from None
    policy_name = Path(fv.policy).stem
  elif fv.policy:
    raise UsageError(f"--policy is only used by --stage=finetune, not --stage={stage}")
  try:
    return train_lib.run_stage(config, stage, fv.workdir, policy=policy, policy_name=policy_name)
  except (train_lib.ConfigError, train_lib.StageError, data_lib.DataError) as e:
    raise UsageError(_one_line(e)) from None


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
