"""The XLA process environment cimjax runs in: which CPU convolution kernels XLA uses.

XLA:CPU (jaxlib 0.10) hands every convolution to YNNPACK by default. On the 2-core AVX-512 CPU
cimjax is measured on, XLA's own (Eigen) convolution kernels are about 2x faster for the
convolutions of a CNN's training step (forward, input and filter gradients) and for the
evaluator's convolutions (BUILD_NOTES.md, "Training throughput"); dots stay on YNNPACK, which is
as fast as Eigen there or faster. :func:`xla_flags` adds
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to an ``XLA_FLAGS`` string,
and :func:`prepare_process` applies it to the process environment; the console scripts call
it before JAX starts a backend (XLA reads ``XLA_FLAGS`` once, when the first backend starts),
and research code that wants the same kernels calls it first thing::

  import cimjax
  cimjax.xla_env.prepare_process()   # before the first JAX computation
  ...

The choice changes float rounding (the kernels sum in another order), not results on integer
codes: quantized products stay exact. It is a CPU setting only; other backends ignore it.

Environment variable ``CIMJAX_CPU_CONV`` (read by :func:`prepare_process`): ``eigen`` (the
default) or ``xla`` (leave XLA's own choice, YNNPACK). A ``XLA_FLAGS`` that already sets
``xla_cpu_experimental_ynn_fusion_type`` is left as it is. The flag is experimental, and XLA
aborts the process on a flag value it cannot parse, so it is only added for the jaxlib releases
it was checked on (:data:`CHECKED_JAXLIB`: 0.10), and only on x86-64, where it was measured
(YNNPACK's ARM kernels may well be the faster ones); elsewhere ``XLA_FLAGS`` is left unchanged.
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping

from absl import logging

from cimjax.errors import UsageError

ENV_VAR = "CIMJAX_CPU_CONV"
CHOICES = ("eigen", "xla")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONV = f"{YNN_FLAG}=-individual_convolution"  # convolutions leave YNNPACK; dots stay
CHECKED_JAXLIB = ((0, 10),)  # (major, minor) releases checked to parse the flag
X86_64 = ("x86_64", "amd64")  # platform.machine(), lower case, where the flag was measured


def _jaxlib_version() -> str:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top

    return str(jaxlib.__version__)
  except (ImportError, AttributeError):
    return ""


def xla_flags(
  current: str,
  cpu_conv: str = "eigen",
  jaxlib_version: str | None = None,
  machine: str | None = None,
) -> str:
  """``XLA_FLAGS`` with cimjax's CPU convolution choice added.

  Args:
    current: the ``XLA_FLAGS`` value now (``""`` if unset).
    cpu_conv: ``"eigen"`` (XLA's own convolution kernels) or ``"xla"`` (XLA's default).
    jaxlib_version: e.g. ``"0.10.2"``; default: the installed jaxlib's.
    machine: e.g. ``"x86_64"``; default: ``platform.machine()``.

  Returns:
    ``current`` with :data:`EIGEN_CONV` appended, or ``current`` unchanged where
    ``cpu_conv == "xla"``, ``current`` already sets the YNNPACK fusion flag, the jaxlib
    release is not one of :data:`CHECKED_JAXLIB`, or the machine is not x86-64.

  Raises:
    UsageError: ``cpu_conv`` is not one of :data:`CHOICES`.
  """
  if cpu_conv not in CHOICES:
    raise UsageError(f"{ENV_VAR}={cpu_conv!r}: allowed values are {', '.join(CHOICES)}")
  if cpu_conv == "xla" or any(f.split("=")[0] == YNN_FLAG for f in current.split()):
    return current
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) not in CHECKED_JAXLIB:
    return current
  if (platform.machine() if machine is None else machine).lower() not in X86_64:
    return current
  return f"{current} {EIGEN_CONV}".strip()


def prepare_process(environ: MutableMapping[str, str] | None = None) -> str:
  """Sets ``XLA_FLAGS`` in ``environ`` (default ``os.environ``) by :func:`xla_flags`, with
  the choice read from ``CIMJAX_CPU_CONV``; call it before the first JAX computation.

  Returns:
    The ``XLA_FLAGS`` value now in effect for backends started from here on.

  Raises:
    UsageError: ``CIMJAX_CPU_CONV`` holds another value than :data:`CHOICES`.
  """
  env = os.environ if environ is None else environ
  before = env.get("XLA_FLAGS", "")
  after = xla_flags(before, env.get(ENV_VAR, "eigen") or "eigen")
  if after != before:
    env["XLA_FLAGS"] = after
    if environ is None and _backends_started():
      logging.warning(
        "cimjax.xla_env.prepare_process: a JAX backend has already started, so XLA_FLAGS "
        "(%s) takes effect only in processes started from here on",
        after,
      )
  return after


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without the private helper
    return False
