"""Configs shipped inside the package (the embedded default of ``cimjax`` / ``launch.run``)."""

from pathlib import Path

DEFAULT_RUN = str(Path(__file__).with_name("default_run.py"))
