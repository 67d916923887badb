"""Proxy validity: ``python -m launch.proxy_validity`` (see cimjax.cli.proxy_validity)."""
from absl import app

from cimjax.cli import proxy_validity

if __name__ == "__main__":
  app.run(proxy_validity.main)
