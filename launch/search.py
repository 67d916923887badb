"""Bit-width search: ``python -m launch.search --workdir=DIR --hw=NAME --agent=pg ...``.

See :mod:`cimjax.cli.search` for the flags, the outputs and the exit codes.
"""

from absl import app

import cimjax.cli.search

if __name__ == "__main__":
  app.run(cimjax.cli.search.main, flags_parser=cimjax.cli.search.parse_flags)
