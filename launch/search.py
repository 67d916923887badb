"""Bit-width search: ``python -m launch.search --workdir=DIR --hw=NAME --agent=pg ...``.

See :mod:`cimjax.cli.search` for the flags, the outputs and the exit codes.
"""

from cimjax.cli import search

if __name__ == "__main__":
  search.run()
