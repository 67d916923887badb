"""The embedded default run: small CNN, Fashion-MNIST, rram_64_c2, 0.5 points, both constraints.

Run::

  cimjax                                   # or: python -m launch.run
  cimjax --config.hw=rram_256_c4           # the reference work's target
  cimjax --config.search.budget=3000 --workdir=runs/big

See :func:`cimjax.pipeline.default_config` for the fields.
"""

from cimjax.pipeline import default_config


def get_config():
  return default_config()
