"""Search-agent comparison benchmark: ``python -m launch.bench_search --workdir=DIR [--quick]``.

See :mod:`cimjax.cli.bench_search` for the tasks, the flags and the outputs.
"""

from absl import app

import cimjax.cli.bench_search

if __name__ == "__main__":
  app.run(cimjax.cli.bench_search.main, flags_parser=cimjax.cli.bench_search.parse_flags)
