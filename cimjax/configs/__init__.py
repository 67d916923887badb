"""The run config: the embedded default file, and the ``--config`` flag of the console scripts.

There is one config schema, the run config of :func:`cimjax.pipeline.default_config`: the
hardware target (``hw``), the search (``search``), the compilation (``compile``), a given policy
(``from_policy``) and, in ``train``, the training config of :func:`cimjax.train.default_config`.
Every ``get_config()`` file (``train/*.py``, :data:`DEFAULT_RUN`) returns a run config;
``launch.train`` and ``launch.search`` use its ``train`` part (model, data, schedules).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from absl import flags

DEFAULT_RUN = str(Path(__file__).with_name("default_run.py"))

_OVERRIDE = re.compile(r"^(-{1,2}(?:no)?config\.)([^.=]+)(.*)$", re.DOTALL)


def define_config_flag(
  fv: flags.FlagValues, help_string: str, argv: Sequence[str] = (), default: str | None = None
) -> None:
  """(Re)defines the ml_collections ``--config`` file flag in ``fv`` for the command ``argv``.

  ml_collections defines one override flag per ``--config.<field>=<value>`` it finds in the
  command line when the flag is parsed, so the flag is defined again, with the overrides of
  ``argv``, before each parse of a module's registry (a command can then be parsed more than
  once in one process, as the tests do). Every other flag of ``fv`` returns to its default.

  Args:
    fv: the module's flag registry.
    help_string: the flag's help.
    argv: the command line that will be parsed (program name first).
    default: the default config file (None: no config).
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  for name in [n for n in fv if n == "config" or n.startswith("config.")]:
    delattr(fv, name)
  fv.unparse_flags()
  config_flags.DEFINE_config_file(
    "config", default, help_string, flag_values=fv, sys_argv=list(argv)
  )


def expand_train_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """Reads ``--config.<field>`` of a training field as ``--config.train.<field>``.

  ``launch.train`` and ``launch.search`` use the ``train`` part of a run config, so there a
  field of the run config's top level (``train``, ``hw``, ``search``, ...) is addressed as
  usual and any other field as one of ``config.train``: ``--config.fp32.lr=1e-3`` is
  ``--config.train.fp32.lr=1e-3``.

  Args:
    argv: the command line (program name first).

  Returns:
    ``(argv with the shorthands expanded, {expanded flag name: name as given})``; pass the
    mapping to :func:`restore_names` to word a message in the names the user typed.
  """
  from cimjax.pipeline import default_config  # pylint: disable=g-import-not-at-top

  out, renamed = [], {}
  run_fields = None
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if m:
      run_fields = run_fields or set(default_config().keys())
      if m.group(2) not in run_fields:
        new = f"{m.group(1)}train.{m.group(2)}{m.group(3)}"
        renamed[new.split("=", 1)[0].lstrip("-")] = arg.split("=", 1)[0].lstrip("-")
        arg = new
    out.append(arg)
  return out, renamed


def restore_names(message: str, renamed: dict[str, str]) -> str:
  """``message`` with the flag names that :func:`expand_train_overrides` expanded as given."""
  for new in sorted(renamed, key=len, reverse=True):
    message = message.replace(new, renamed[new])
  return message
