"""Train one stage: ``python -m launch.train --config=train/tiny.py --workdir=DIR --stage=fp32``.

See :mod:`cimjax.cli.train` for the flags, the stage layout and the exit codes.
"""

from absl import app

import cimjax.cli.train

if __name__ == "__main__":
  app.run(cimjax.cli.train.main, flags_parser=cimjax.cli.train.parse_flags)
