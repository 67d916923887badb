"""All benchmarks, one table: ``python -m launch.bench [--quick]`` (see cimjax.cli.bench)."""

from cimjax.cli import bench

if __name__ == "__main__":
  bench.run()
