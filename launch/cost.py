"""Cost report of a model on a CIM target.

``python -m launch.cost --model=vgg16 --hw=rram_256_c4``.
"""

import cimjax.cli.cost

if __name__ == "__main__":
  cimjax.cli.cost.run()
