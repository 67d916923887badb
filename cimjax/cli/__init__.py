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
