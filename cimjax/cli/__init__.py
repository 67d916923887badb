"""Command-line entry points of cimjax (the console scripts), and their shared flag helpers.

Every CLI module, here and in the repository's ``launch/`` (benchmarks and experiments, which
import cimjax; nothing here imports them), declares typed absl flags (``DEFINE_integer``,
``DEFINE_enum``, ``DEFINE_list``, ...) in its own ``FLAGS = flags.FlagValues()``, not in absl's
global registry, so that any set of CLI modules can be imported together (by tests, notebooks
or research code) without duplicate-flag errors. :func:`flags_parser` adapts one such registry
to ``absl.app.run``. Every entry point's ``main`` runs its work through :func:`run_main`: a
:class:`cimjax.errors.CimjaxError` (bad input) or an ``OSError`` (a workdir that cannot be
created, a full disk) is one line ``PROG: error: ...`` on stderr and exit status 2; anything else
is a bug: its traceback between two lines saying so, exit status 1. :func:`run_console` is the
console scripts' ``absl.app.run``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from absl import flags

from cimjax import io
from cimjax.errors import CimjaxError, UsageError  # noqa: F401 (re-exported)

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")
EXIT_USAGE = 2  # bad input: one line on stderr
EXIT_BUG = 1  # an internal error: a traceback between two lines saying so


def flags_parser(fv: flags.FlagValues, prog: str) -> Callable[[Sequence[str]], list[str]]:
  """An ``absl.app.run`` ``flags_parser`` for the module registry ``fv``.

  The module's flags are parsed first; what is left goes to absl's global ``FLAGS`` (logging
  flags and the like), which rejects unknown flags. A bad or unknown flag, or a ``--config``
  file (ml_collections) that does not load, prints one line ``PROG: error: ...`` on stderr and
  exits with status 2; ``--help`` prints the module's flags and exits with status 0.

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
      rest = flags.FLAGS(_parse_and_load(fv, argv, known_only=True))
    except flags.Error as e:
      fail(prog, e)
    except Exception as e:  # pylint: disable=broad-except
      if "config" not in fv:
        raise
      # ml_collections: a --config.<field> override or a config file that does not load
      fail(prog, _unknown_field(argv, e) or f"--config: {_config_error(argv, e)}")
    return rest

  return parse


def fail(prog: str, error: BaseException | str, *, hard: bool = False) -> NoReturn:
  """Prints one line ``PROG: error: ...`` on stderr and exits with status 2.

  Args:
    prog: program name.
    error: the message, or an exception (its first line is printed).
    hard: exit with ``os._exit`` (skips interpreter teardown, e.g. the tracebacks of background
      coroutines that a failed orbax restore leaves behind).
  """
  msg = error_line(error) if isinstance(error, BaseException) else error
  print(f"{prog}: error: {msg}", file=sys.stderr)
  sys.stderr.flush()
  if hard:
    os._exit(EXIT_USAGE)
  sys.exit(EXIT_USAGE)


def error_line(e: BaseException) -> str:
  """The one line that reports a user error: ``<path>: <strerror>`` for an ``OSError`` that
  names a file (a workdir that cannot be created, a full disk), else the message's first line."""
  if isinstance(e, OSError) and e.strerror:
    path = e.filename if e.filename is not None else e.filename2
    return f"{path}: {e.strerror}" if path is not None else e.strerror
  return one_line(e)


def run_main(prog: str, body: Callable[[], int | None]) -> int:
  """Runs a console script's work and returns its exit status; the one error policy of cimjax.

  * a :class:`CimjaxError` (bad input, a corrupt file, a busy workdir) or an ``OSError`` (a
    workdir that cannot be created or written, a full disk): one line ``PROG: error: ...`` on
    stderr, status 2;
  * ``KeyboardInterrupt``: one line ``PROG: interrupted``, status 130;
  * anything else is a bug: its traceback between two lines saying so, status 1.

  Args:
    prog: program name used in messages.
    body: the work; returns the exit status (None: 0).

  Returns:
    The exit status.
  """
  try:
    return int(body() or 0)
  except (CimjaxError, OSError) as e:
    print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
  except Exception:  # pylint: disable=broad-except
    bug = f"{prog}: internal error (a bug in cimjax, not in your input)"
    print(f"{bug}; please report it with the traceback below", file=sys.stderr)
    traceback.print_exc()
    print(f"{bug}: see the traceback above", file=sys.stderr)
    return EXIT_BUG
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def run_console(
  main: Callable[[Any], int | None], flags_parser: Callable[[Sequence[str]], Any]
) -> None:
  """``absl.app.run(main, flags_parser=...)`` for a console script whose ``main`` returns its
  exit status (:func:`run_main`).

  A failing run exits with ``os._exit`` once its line is printed: the interpreter's teardown
  is skipped, so nothing left running in the background (the reads of a failed orbax restore,
  say) can print after the error line. Before anything else (flags included), the process's
  ``XLA_FLAGS`` is set by :func:`cimjax.xla_env.prepare_process` (XLA's own CPU convolution
  kernels; ``CIMJAX_CPU_CONV``): XLA reads it once, when JAX starts a backend.
  """
  from absl import app  # pylint: disable=g-import-not-at-top

  from cimjax import xla_env  # pylint: disable=g-import-not-at-top

  try:
    xla_env.prepare_process()
  except CimjaxError as e:
    fail(_program_name(), e)

  def wrapped(argv: Any) -> int:
    status = int(main(argv) or 0)
    if status:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
    return status

  app.run(wrapped, flags_parser=flags_parser)


def _program_name() -> str:
  """The running command as its user typed it: the console script's name, or the module of
  ``python -m``."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name not in ("__main__", ""):
    return str(spec.name).removesuffix(".__main__")
  return os.path.basename(sys.argv[0]) or "cimjax"


@contextlib.contextmanager
def _quiet_config_loading() -> Iterator[None]:
  """Silences ml_collections' use of the deprecated importlib ``load_module()``."""
  with warnings.catch_warnings():
    warnings.filterwarnings(
      "ignore", message=r".*load_module\(\) method is deprecated", category=DeprecationWarning
    )
    yield


def _parse_and_load(fv: flags.FlagValues, argv: list[str], known_only: bool) -> list[str]:
  """Parses ``argv`` into ``fv``, then loads a ``--config`` file now (ml_collections loads it
  lazily) to surface its errors here; returns the arguments left."""
  # ml_collections loads every config file as the module ``config_config``; a module of that
  # name left by an earlier parse in this process would lend its get_config() to a file that
  # defines none (the deprecated load_module() runs the file in the existing module).
  sys.modules.pop("config_config", None)
  with _quiet_config_loading():
    rest = fv(argv, known_only=known_only)
    if "config" in fv and fv["config"].value is not None:
      fv["config"].value.keys()
  return rest


def one_line(e: BaseException) -> str:
  """The first line of an exception's message (its type name when it has none)."""
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def parse_uniform(value: str | Sequence[str], flag: str = "--uniform") -> tuple[int, int]:
  """``"W,A"`` (or the list flag's ``["W", "A"]``) -> ``(W, A)``; ranges are checked later.

  Raises:
    UsageError: not two comma-separated integers.
  """
  parts = value.split(",") if isinstance(value, str) else list(value)
  text = ",".join(parts)
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


def no_positional(argv: Sequence[str]) -> None:
  """Refuses positional arguments (``argv`` is absl's: the program name first).

  Raises:
    UsageError: ``argv`` has more than the program name.
  """
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def emit_result(
  result: Any, table: str, out: str | None, summary: dict[str, Any] | None = None
) -> None:
  """A benchmark's ending: prints ``table``, then writes ``result`` to ``out`` as JSON
  (atomically, :func:`cimjax.io.write_json`) and says so, or without ``out`` prints
  ``summary`` as one JSON line (if given)."""
  print(table)
  if out:
    io.write_json(out, result)
    print(f"wrote {out}")
  elif summary is not None:
    print(json.dumps(summary))


def parse_config_args(
  fv: flags.FlagValues, argv: Sequence[str], required: Sequence[str] = ("workdir",)
) -> flags.FlagValues:
  """Parses ``argv`` (program name first) into ``fv`` and loads the ``--config`` file now.

  Raises:
    UsageError: unknown flag, unknown or badly typed config field, config file that does not
      load, positional arguments, a missing required flag.
  """
  argv = list(argv)
  try:
    rest = _parse_and_load(fv, argv, known_only=False)
  except flags.Error as e:
    raise UsageError(one_line(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(_unknown_field(argv, e) or f"--config: {_config_error(argv, e)}") from None
  no_positional(rest)
  for name in required:
    if fv[name].value is None:
      raise UsageError(f"--{name} is required")
  return fv


def usage_parser(
  parse_args: Callable[[Sequence[str]], flags.FlagValues], prog: str
) -> Callable[[Sequence[str]], flags.FlagValues]:
  """An ``absl.app.run`` flags parser around ``parse_args``: absl's own flags go to the global
  ``FLAGS``, the command's to its fresh registry; a :class:`CimjaxError` exits with status 2
  and one line ``PROG: error: ...`` on stderr."""

  def parse(argv: Sequence[str]) -> flags.FlagValues:
    rest = flags.FLAGS(list(argv), known_only=True)
    try:
      return parse_args(rest)
    except CimjaxError as e:
      fail(prog, e)

  return parse
