"""Strict test configuration (equinox style): fake CPU devices, strict dtype promotion.

The XLA flags must be set before JAX starts a backend, so they are set here at import time:
8 host devices, and the CPU convolution kernels the console scripts use
(:func:`cimjax.xla_env.prepare_process`).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cimjax import xla_env  # noqa: E402  (imports no backend)

xla_env.prepare_process()  # the CPU convolution kernels the console scripts use

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def repo_root():
  """Absolute path of the repository root (for subprocess CLI tests)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def small_cnn_rram_64_c2():
  """``(model, specs, hw, tables)``: the small CNN on the small-array target (NumPy tables)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top
  from cimjax import models, trace  # pylint: disable=g-import-not-at-top

  m = models.get_model("small_cnn")
  specs = trace.trace_specs(m)
  hw = hw_lib.load_hw("rram_64_c2")
  return m, specs, hw, cost_lib.cost_tables(specs, hw, xp=np)


@pytest.fixture(scope="session")
def random_small_cnn():
  """``make(num) -> (model, variables, x, y)``: an untrained small CNN and ``num`` random images
  with random labels (seeded; a random model gets some of them right, not all)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cimjax import models, variables  # pylint: disable=g-import-not-at-top

  m = models.get_model("small_cnn")
  var = variables.init_variables(m, jax.random.PRNGKey(0))

  def make(num):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((num, *m.input_shape)).astype(np.float32)
    return m, var, x, rng.integers(0, 10, num)

  return make
