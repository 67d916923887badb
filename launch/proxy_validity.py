"""Proxy validity: ``python -m launch.proxy_validity`` (see cimjax.cli.proxy_validity)."""

from cimjax.cli import proxy_validity

if __name__ == "__main__":
  proxy_validity.run()
