"""Compile, verify and run a model on CIM crossbars: ``python -m launch.compile --help``."""

import cimjax.cli.compile

if __name__ == "__main__":
  cimjax.cli.compile.run()
