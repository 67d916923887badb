"""Command-line entry points of cimjax (absl flags); ``launch/*.py`` are thin wrappers."""
