"""cimjax.xla_env: the CPU convolution kernels XLA is told to use, and what they change."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimjax import xla_env
from cimjax.errors import UsageError

EIGEN = xla_env.EIGEN_CONV
# this machine gets the flag (x86-64, a checked jaxlib): the checks of its effect apply
KNOWN = jax.default_backend() == "cpu" and xla_env.xla_flags("") == EIGEN


def test_flags_appended_once_and_user_setting_kept():
  def flags(current: str, *a: str) -> str:
    return xla_env.xla_flags(current, *a, jaxlib_version="0.10.2", machine="x86_64")

  assert flags("") == EIGEN
  base = "--xla_force_host_platform_device_count=8"
  once = flags(base)
  assert once.split() == [base, EIGEN]
  assert flags(once) == once  # idempotent
  own = f"{base} {xla_env.YNN_FLAG}="
  assert flags(own) == own  # the user's own YNNPACK choice wins
  assert flags(base, "xla") == base
  # a flag that merely starts with the same letters is not the YNNPACK flag
  other = f"{xla_env.YNN_FLAG}_other=1"
  assert flags(other).split() == [other, EIGEN]


def test_flag_only_for_the_jaxlib_releases_it_was_checked_on():
  """XLA aborts on a flag it does not know: other jaxlib releases keep XLA_FLAGS as it is."""
  x86 = {"machine": "x86_64"}
  assert xla_env.xla_flags("--a=1", jaxlib_version="0.10.2", **x86) == f"--a=1 {EIGEN}"
  assert xla_env.xla_flags("", jaxlib_version="0.10.7.dev20261101", **x86) == EIGEN
  for version in ("0.9.9", "0.11.2", "0.12.0", "1.0.0", "", "unknown"):
    assert xla_env.xla_flags("--a=1", jaxlib_version=version, **x86) == "--a=1", version


def test_flag_only_on_x86_64_where_it_was_measured():
  for machine in ("x86_64", "AMD64"):
    assert xla_env.xla_flags("", jaxlib_version="0.10.2", machine=machine) == EIGEN
  for machine in ("aarch64", "arm64", "ppc64le"):
    assert xla_env.xla_flags("", jaxlib_version="0.10.2", machine=machine) == "", machine


def test_bad_choice_names_the_variable():
  with pytest.raises(UsageError, match=r"CIMJAX_CPU_CONV='ynn': allowed values are eigen, xla"):
    xla_env.xla_flags("", "ynn")
  with pytest.raises(UsageError, match="CIMJAX_CPU_CONV"):
    xla_env.prepare_process({"CIMJAX_CPU_CONV": "fast"})


@pytest.mark.skipif(not KNOWN, reason="a CPU setting, for the jaxlib releases it was checked on")
def test_prepare_process_on_a_given_environment():
  env = {"XLA_FLAGS": "--a=1"}
  assert xla_env.prepare_process(env) == f"--a=1 {EIGEN}"
  assert env["XLA_FLAGS"] == f"--a=1 {EIGEN}"
  env = {"CIMJAX_CPU_CONV": "xla"}
  assert xla_env.prepare_process(env) == ""
  assert "XLA_FLAGS" not in env  # nothing written where nothing changes


def _conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@pytest.mark.skipif(not KNOWN, reason="a CPU setting, for the jaxlib releases it was checked on")
def test_this_process_runs_convolutions_outside_ynnpack():
  """conftest applies prepare_process, as the console scripts do: no conv in a YNNPACK fusion."""
  assert EIGEN in os.environ["XLA_FLAGS"]
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
  hlo = jax.jit(_conv).lower(x, w).compile().as_text()
  assert "convolution(" in hlo
  assert "__ynn_fusion" not in hlo


@pytest.mark.skipif(not KNOWN, reason="a CPU setting, for the jaxlib releases it was checked on")
def test_integer_code_convolutions_identical_under_both_kernels():
  """Quantized products stay exact: on integer codes (|sum| < 2**24) Eigen's and YNNPACK's
  convolutions, forward and both gradients, equal an int64 NumPy reference bit for bit."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4, 10, 10, 16)).astype(np.float32)  # unsigned 8-bit activations
  w = rng.integers(-127, 128, (3, 3, 16, 24)).astype(np.float32)  # narrow-range 8-bit weights
  g = rng.integers(-3, 4, (4, 10, 10, 24)).astype(np.float32)

  def all_three(x, w, g):
    y, vjp = jax.vjp(_conv, x, w)
    return (y, *vjp(g))

  ynn = jax.jit(
    all_three,
    compiler_options={
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    },
  )
  eigen = jax.jit(all_three, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
  assert "__ynn_fusion" in ynn.lower(x, w, g).compile().as_text()
  assert "__ynn_fusion" not in eigen.lower(x, w, g).compile().as_text()
  # the int64 reference: SAME padding, stride 1
  xp = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  wi, gi = w.astype(np.int64), g.astype(np.int64)
  y_ref = sum(
    np.einsum("nhwc,cf->nhwf", xp[:, i : i + 10, j : j + 10], wi[i, j])
    for i in range(3)
    for j in range(3)
  )
  dw_ref = np.stack(
    [
      np.stack([np.einsum("nhwc,nhwf->cf", xp[:, i : i + 10, j : j + 10], gi) for j in range(3)])
      for i in range(3)
    ]
  )
  gp = np.pad(gi, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dx_ref = sum(
    np.einsum("nhwf,cf->nhwc", gp[:, 2 - i : 12 - i, 2 - j : 12 - j], wi[i, j])
    for i in range(3)
    for j in range(3)
  )
  for got in (ynn(x, w, g), eigen(x, w, g)):
    for a, ref in zip(got, (y_ref, dx_ref, dw_ref)):
      np.testing.assert_array_equal(np.asarray(a), ref.astype(np.float32))


def _python(cwd: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
  )


@pytest.mark.parametrize("module", ["cimjax.cli.cost", "cimjax.cli.run", "launch.bench_train"])
def test_every_console_entry_rejects_a_bad_choice_in_one_line(repo_root, module):
  """Every entry point prepares XLA_FLAGS (cimjax.cli.run_console), whatever its flag parser."""
  p = _python(repo_root, ["-m", module, "--help"], dict(os.environ, CIMJAX_CPU_CONV="fastest"))
  assert p.returncode == 2, p.stderr
  lines = p.stderr.strip().splitlines()
  assert lines == [f"{module}: error: CIMJAX_CPU_CONV='fastest': allowed values are eigen, xla"]
  assert p.stdout == ""


@pytest.mark.skipif(not KNOWN, reason="a CPU setting, for the jaxlib releases it was checked on")
def test_the_main_job_sets_the_flag_before_absl_runs(repo_root):
  """``cimjax``'s entry (its own flag parser, not ``flags_parser``) sets XLA_FLAGS in a clean
  environment before absl parses or runs anything (``absl.app.run`` stubbed out)."""
  code = (
    "import sys, os; sys.argv = ['cimjax', '--help'];"
    "from cimjax.cli import run as r; from cimjax import cli;"
    "import absl.app as app; app.run = lambda main, flags_parser: None;"
    "cli.run_console(r.main, r.parse_flags); print(os.environ.get('XLA_FLAGS', ''))"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CIMJAX_CPU_CONV")}
  p = _python(repo_root, ["-c", code], env)
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip().splitlines()[-1] == EIGEN
