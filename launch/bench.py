"""All benchmarks, one table: ``python -m launch.bench [--quick]`` (see cimjax.cli.bench)."""
from absl import app

from cimjax.cli import bench

if __name__ == "__main__":
  app.run(bench.main)
