"""The main job: ``python -m launch.run`` (see cimjax.cli.run)."""
from absl import app

from cimjax.cli import run

if __name__ == "__main__":
  app.run(run.main)
