"""Cost report of a model on a CIM target: ``python -m launch.cost --model=vgg16 --hw=rram_256_c4``."""
from absl import app
import cimjax.cli.cost
if __name__ == "__main__":
  app.run(cimjax.cli.cost.main)
