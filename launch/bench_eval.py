from absl import app

from cimjax.cli import bench_eval

if __name__ == "__main__":
  app.run(bench_eval.main)
