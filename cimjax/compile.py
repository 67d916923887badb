"""The old name of :mod:`cimjax.compiler` (kept so existing imports keep working).

``from cimjax import compile as cc`` gives the same names as ``from cimjax import compiler``;
new code should import :mod:`cimjax.compiler` (see docs/architecture.md).
"""

from cimjax.compiler import *  # noqa: F403 (the whole public API, unchanged)
from cimjax.compiler import __all__  # noqa: F401
