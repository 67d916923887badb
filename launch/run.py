"""The main job: ``python -m launch.run`` (see cimjax.cli.run)."""

from cimjax.cli import run

if __name__ == "__main__":
  run.run()
