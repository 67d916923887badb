"""Multi-process (multi-host) flags shared by the ``cimjax`` run and ``launch.search``.

``--num_processes=P --process_id=I --coordinator_address=HOST:PORT`` start process ``I`` of a
``P``-process ``jax.distributed`` run by hand (two loopback processes on one machine, a GPU
cluster without a scheduler); ``--distributed`` calls ``jax.distributed.initialize()`` with the
environment's defaults (Cloud TPU pod slices, SLURM and Open MPI GPU clusters detect the rest).
"""

from __future__ import annotations

from absl import flags

from cimjax.errors import UsageError


def define_flags(fv: flags.FlagValues) -> None:
  """Declares ``--coordinator_address``, ``--num_processes``, ``--process_id`` and
  ``--distributed`` in ``fv``."""
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process runs: host:port of process 0 for jax.distributed.initialize (omit on Cloud "
    "TPU / SLURM, where it is detected).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_processes",
    1,
    "Multi-process runs: number of processes (1: single process).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "process_id", 0, "Multi-process runs: this process's index.", lower_bound=0, flag_values=fv
  )
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with the environment's defaults (Cloud TPU pods, SLURM "
    "GPU clusters).",
    flag_values=fv,
  )


def check_flags(fv: flags.FlagValues) -> None:
  """Raises UsageError for an inconsistent set of the multi-process flags."""
  if fv.process_id >= fv.num_processes:
    raise UsageError(
      f"--process_id={fv.process_id}: allowed values are an integer in 0..{fv.num_processes - 1}"
    )
  if fv.num_processes > 1 and not fv.coordinator_address:
    raise UsageError(
      "--num_processes > 1 needs --coordinator_address=HOST:PORT (or use "
      "--distributed where the cluster is detected)"
    )


def wanted(fv: flags.FlagValues) -> bool:
  """Whether the flags ask for a multi-process run."""
  return bool(fv.distributed or fv.num_processes > 1)


def initialize(fv: flags.FlagValues) -> None:
  """Calls ``jax.distributed.initialize`` as the flags say (before any backend is used).

  CPU collectives use gloo (tests, CPU clusters); accelerators use their own.
  """
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if fv.num_processes > 1:
    kw = {
      "coordinator_address": fv.coordinator_address,
      "num_processes": fv.num_processes,
      "process_id": fv.process_id,
    }
  jax.distributed.initialize(**kw)
