"""Compile, verify and run a model on CIM crossbars: ``python -m launch.compile --help``."""
from absl import app
import cimjax.cli.compile
if __name__ == "__main__":
  app.run(cimjax.cli.compile.main)
