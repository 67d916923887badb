"""Strict test configuration (equinox style): fake CPU devices, strict dtype promotion.

The XLA flag must be set before jax is imported, so it lives here at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def repo_root():
  """Absolute path of the repository root (for subprocess CLI tests)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
