"""Command-line entry points of cimjax (absl flags); ``launch/*.py`` are thin wrappers.

Every CLI module defines its flags in its own ``flags.FlagValues`` (``FLAGS`` of that module),
not in absl's global registry, so that any set of CLI modules can be imported together (by
tests, notebooks or research code) without duplicate-flag errors. ``flags_parser`` adapts one
such registry to ``absl.app.run``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

from cimjax.errors import UsageError  # noqa: F401 (re-exported)

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def flags_parser(fv: flags.FlagValues, prog: str) -> Callable[[Sequence[str]], list[str]]:
  """An ``absl.app.run`` ``flags_parser`` for the module registry ``fv``.

  The module's flags are parsed first; what is left goes to absl's global ``FLAGS`` (logging
  flags and the like), which rejects unknown flags. A bad or unknown flag prints one line
  ``PROG: error: ...`` on stderr and exits with status 2; ``--help`` prints the module's flags.

  Args:
    fv: the module's flag registry.
    prog: program name used in messages.

  Returns:
    A function ``argv -> remaining positional arguments`` (argv[0] included).
  """

  def parse(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if any(a in _HELP for a in argv[1:]):
      print(f"usage: {prog} [flags]\n\n{fv.get_help()}")
      sys.exit(0)
    try:
      rest = fv(argv, known_only=True)
      return flags.FLAGS(rest)
    except flags.Error as e:
      print(f"{prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(2)

  return parse


def one_line(e: BaseException) -> str:
  """The first line of an exception's message (its type name when it has none)."""
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def parse_uniform(text: str, flag: str = "--uniform") -> tuple[int, int]:
  """``"W,A"`` -> ``(W, A)``; range checks happen in policy validation.

  Raises:
    UsageError: not two comma-separated integers.
  """
  parts = text.split(",")
  try:
    if len(parts) != 2:
      raise ValueError
    return int(parts[0]), int(parts[1])
  except ValueError:
    raise UsageError(f"{flag}={text!r}: expected two integers W,A such as 8,8") from None


def config_flag_values(argv: Sequence[str], config_help: str) -> flags.FlagValues:
  """A fresh flag registry holding the ml_collections ``--config`` file flag.

  ``--config.<field>=<value>`` overrides are found in ``argv`` (ml_collections defines them
  when the flag is defined), so pass the command line that will be parsed.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, config_help, flag_values=fv, sys_argv=list(argv))
  return fv


def _unknown_field(argv: Sequence[str], e: BaseException) -> str | None:
  """ml_collections reports an override of a missing field as a bare KeyError/AttributeError
  naming the field; turn it into one line naming the flag."""
  for err in (e, e.__cause__, e.__context__):
    if isinstance(err, (KeyError, AttributeError)):
      name = one_line(err).strip("'\"")
      for a in argv:
        if a.startswith("--config.") and name in a.split("=", 1)[0].split(".")[1:]:
          return f"{a.split('=', 1)[0]}: unknown config field {name!r}"
  return None


def _config_error(argv: Sequence[str], e: BaseException) -> str:
  """One line for a config file that does not load."""
  import pathlib  # pylint: disable=g-import-not-at-top

  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is not None:
    file = path.split(":", 1)[0]
    if not pathlib.Path(file).is_file():
      return f"config file not found: {file}"
  cause = e.__cause__ or e.__context__
  lines = [l.strip() for l in str(cause or e).splitlines() if l.strip()]
  return f"cannot load config file {path}: {lines[-1] if lines else type(e).__name__}"


def parse_config_args(
  fv: flags.FlagValues, argv: Sequence[str], required: Sequence[str] = ("workdir",)
) -> flags.FlagValues:
  """Parses ``argv`` (program name first) into ``fv`` and loads the ``--config`` file now.

  Raises:
    UsageError: unknown flag, unknown or badly typed config field, config file that does not
      load, positional arguments, a missing required flag.
  """
  import warnings  # pylint: disable=g-import-not-at-top

  argv = list(argv)
  try:
    with warnings.catch_warnings():
      # ml_collections loads config files with the deprecated importlib load_module().
      warnings.filterwarnings(
        "ignore", message=r".*load_module\(\) method is deprecated", category=DeprecationWarning
      )
      rest = fv(argv)
      if fv["config"].value is not None:
        fv.config.keys()  # the file is loaded lazily: surface its errors here
  except flags.Error as e:
    raise UsageError(one_line(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(_unknown_field(argv, e) or f"--config: {_config_error(argv, e)}") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
  for name in required:
    if fv[name].value is None:
      raise UsageError(f"--{name} is required")
  return fv


def usage_parser(
  parse_args: Callable[[Sequence[str]], flags.FlagValues], prog: str
) -> Callable[[Sequence[str]], flags.FlagValues]:
  """An ``absl.app.run`` flags parser around ``parse_args``: absl's own flags go to the global
  ``FLAGS``, the command's to its fresh registry; a :class:`UsageError` exits with status 2 and
  one line ``PROG: error: ...`` on stderr."""

  def parse(argv: Sequence[str]) -> flags.FlagValues:
    rest = flags.FLAGS(list(argv), known_only=True)
    try:
      return parse_args(rest)
    except UsageError as e:
      print(f"{prog}: error: {e}", file=sys.stderr)
      sys.exit(2)

  return parse
