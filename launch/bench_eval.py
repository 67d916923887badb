from cimjax.cli import bench_eval

if __name__ == "__main__":
  bench_eval.run()
