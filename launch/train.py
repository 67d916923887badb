"""Train one stage: ``python -m launch.train --config=train/tiny.py --workdir=DIR --stage=fp32``.

See :mod:`cimjax.cli.train` for the flags, the stage layout and the exit codes.
"""

from cimjax.cli import train

if __name__ == "__main__":
  train.run()
