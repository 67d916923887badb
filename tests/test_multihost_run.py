"""Multi-process ``cimjax`` runs (``jax.distributed`` on two loopback CPU processes) and real
kill -9 of a streamed run mid-epoch.

Two processes with one CPU device each form a 2-device data mesh; the same run in one process
with two host devices (``--xla_force_host_platform_device_count=2``,
``train.data.data_parallel``) splits every batch the same way, so the parameters must be
bit-identical. Process 0 alone writes the plain files (metrics, results, the report).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cimjax import checkpoint
from cimjax import variables as variables_lib

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "run_tiny.py"
# Short training stages: the point is the data split across processes, not the accuracy.
SHORT = [
  "--config.train.fp32.steps=8",
  "--config.train.int8.steps=4",
  "--config.train.checkpoint_every=4",
  "--config.train.log_every=4",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int = 1) -> dict[str, str]:
  flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": str(REPO)}


def _cimjax(*args: str) -> list[str]:
  return [sys.executable, "-m", "launch.run", f"--config={TINY}", *args]


def _two_processes(wd: Path, *args: str, logs: Path, **popen: object) -> list[subprocess.Popen]:
  port = _free_port()
  procs = []
  for p in range(2):
    log = open(logs / f"proc{p}.log", "w")  # noqa: SIM115 (closed with the process)
    procs.append(
      subprocess.Popen(
        _cimjax(
          f"--workdir={wd}",
          "--num_processes=2",
          f"--process_id={p}",
          f"--coordinator_address=127.0.0.1:{port}",
          *args,
        ),
        cwd=REPO,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        **popen,
      )
    )
  return procs


def _one_process(wd: Path, *args: str, timeout: float = 400) -> None:
  """The reference of a two-process run: one process, two host devices, data parallel."""
  one = subprocess.run(
    _cimjax(f"--workdir={wd}", "--config.train.data.data_parallel=True", *args),
    cwd=REPO,
    env=_env(devices=2),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert one.returncode == 0, one.stderr[-3000:]


def _wait_ok(procs: list[subprocess.Popen], logs: Path, timeout: float = 400) -> None:
  codes = [p.wait(timeout=timeout) for p in procs]
  text = "\n".join((logs / f"proc{i}.log").read_text()[-3000:] for i in range(len(procs)))
  assert codes == [0] * len(procs), text


def _params(stage_dir: Path) -> list[np.ndarray]:
  return [np.asarray(a) for a in jax.tree.leaves(variables_lib.load_variables(stage_dir))]


def _assert_same_params(a: Path, b: Path) -> None:
  pa, pb = _params(a), _params(b)
  assert len(pa) == len(pb) > 0
  for x, y in zip(pa, pb, strict=True):
    np.testing.assert_array_equal(x, y)


def test_two_processes_train_fp32_like_one_process_with_two_devices(tmp_path):
  """fp32 on a 2-process mesh: the parameters of a 1-process 2-device run, bit for bit; one
  metrics file, written by process 0, with one record per logging window (every stage: the
  slow whole-flow test)."""
  names = ("fp32",)
  stages = "--stages=fp32"
  _wait_ok(_two_processes(tmp_path / "mp", stages, *SHORT, logs=tmp_path), tmp_path)
  _one_process(tmp_path / "sp", stages, *SHORT)
  for stage in names:
    _assert_same_params(tmp_path / "mp" / stage, tmp_path / "sp" / stage)
    res = json.loads((tmp_path / "mp" / stage / "result.json").read_text())
    ref = json.loads((tmp_path / "sp" / stage / "result.json").read_text())
    assert res["steps"] == ref["steps"] and res["eval"].keys() == ref["eval"].keys()
    for pol, figures in res["eval"].items():  # final evals: 1 device a process vs 2 sharded
      for k, v in figures.items():
        want = ref["eval"][pol][k]
        assert v == want if not k.endswith("loss") else v == pytest.approx(want, rel=1e-6), k
  steps = [
    json.loads(line)["step"]
    for line in (tmp_path / "mp" / "fp32" / "metrics.jsonl").read_text().splitlines()
    if json.loads(line).get("kind") == "train"
  ]
  assert steps == [4, 8]  # written once, not once per process
  log0, log1 = ((tmp_path / f"proc{p}.log").read_text() for p in range(2))
  assert "[fp32] done" in log0 and "[fp32]" not in log1  # process 0 alone prints
  assert "devices cpu x2" in log0


def test_multiprocess_flags_are_checked():
  p = subprocess.run(
    _cimjax("--num_processes=2", "--workdir=/nonexistent/never"),
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
    "cimjax: error: --num_processes > 1 needs --coordinator_address=HOST:PORT (or use "
    "--distributed where the cluster is detected)"
  )
  assert not Path("/nonexistent/never").exists()


@pytest.mark.slow
def test_two_processes_run_the_whole_flow(tmp_path):
  """Every stage on two processes: the report of the 1-process 2-device run."""
  _wait_ok(_two_processes(tmp_path / "mp", logs=tmp_path), tmp_path, timeout=900)
  _one_process(tmp_path / "sp", timeout=900)
  a, b = (json.loads((tmp_path / w / "report.json").read_text()) for w in ("mp", "sp"))
  timing = ("stage_time_s", "total_time_s")
  for r in (a, b):
    for k in timing:
      r.pop(k)
    r["search"].pop("wall_s")
  assert a == b  # every figure: accuracies, policy, costs, search, verification
  ft = Path("finetune") / "chosen"
  _assert_same_params(tmp_path / "mp" / ft, tmp_path / "sp" / ft)


# ---------------------------------------------------------------------------- kill -9, streamed


def _folder(root: Path, n_per_class: int = 24, seed: int = 0) -> Path:
  """Three class folders of PNGs of varying sizes (a class colour signal)."""
  rng = np.random.default_rng(seed)
  for c in range(3):
    d = root / f"c{c}"
    d.mkdir(parents=True)
    for i in range(n_per_class):
      h, w = (int(v) for v in rng.integers(14, 22, 2))
      img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
      img[..., c] = 220
      Image.fromarray(img).save(d / f"{i:03d}.png")
  return root


def _stream_args(root: Path) -> list[str]:
  return [
    "--stages=fp32",
    "--config.train.data.source=folder",
    f"--config.train.data.path={root}",
    "--config.train.data.stream=True",
    "--config.train.data.crop_size=12",
    "--config.train.data.resize_size=14",
    "--config.train.data.stats_images=16",
    "--config.train.data.workers=1",
    "--config.train.data.val_fraction=0.1",
    "--config.train.data.test_fraction=0.1",
    "--config.train.batch_size=8",
    "--config.train.calib_images=16",
    "--config.train.bn_recal_batches=1",
    "--config.train.fp32.steps=24",
    "--config.train.checkpoint_every=5",
    "--config.train.log_every=5",
  ]


def _kill_at_checkpoint(procs: list[subprocess.Popen], ckpt: Path, step: int) -> None:
  """SIGKILLs the process groups once checkpoint ``step`` is complete on disk."""
  deadline = time.time() + 400
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if (ckpt / str(step) / "_CHECKPOINT_METADATA").is_file():
      break
    time.sleep(0.1)
  assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_streamed_run_killed_mid_epoch_resumes_bit_identically(tmp_path, processes):
  """kill -9 of the whole process group (grain's worker processes too) after checkpoint 10
  (mid-epoch: 57 training images, 8 a batch), then a re-run: the parameters of an uninterrupted
  run, bit for bit; with two processes the checkpoint holds each host's iterator state."""
  root = _folder(tmp_path / "imgs")
  args = _stream_args(root)
  throttled = [*args, "--config.train.throttle_s=0.25"]
  logs = tmp_path

  def start(wd: Path, extra: list[str]) -> list[subprocess.Popen]:
    if processes == 2:
      return _two_processes(wd, *extra, logs=logs, start_new_session=True)
    log = open(logs / "proc0.log", "w")  # noqa: SIM115
    return [
      subprocess.Popen(
        _cimjax(f"--workdir={wd}", *extra),
        cwd=REPO,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    ]

  _wait_ok(start(tmp_path / "ref", args), logs)
  wd = tmp_path / "killed"
  ckpt = wd / "fp32" / "checkpoints"
  _kill_at_checkpoint(start(wd, throttled), ckpt, 10)
  assert not (wd / "fp32" / "result.json").exists()
  with checkpoint.Checkpointer(ckpt) as cp:
    assert cp.has_data(10)
  data = json.loads((ckpt / "10" / "data" / "metadata").read_text())
  if processes == 2:
    assert len(data["hosts"]) == 2  # one iterator state a host (grain's: its shard's position)
    assert [h["next_step"] for h in data["hosts"]] == [10, 10]
  else:
    assert data["next_step"] == 10
  _wait_ok(start(wd, [*throttled, "--verbosity=0"]), logs)
  assert "resuming from step 10" in (logs / "proc0.log").read_text()
  _assert_same_params(wd / "fp32", tmp_path / "ref" / "fp32")
  a, b = (json.loads((w / "fp32" / "result.json").read_text()) for w in (wd, tmp_path / "ref"))
  assert a["eval"] == b["eval"] and a["steps"] == b["steps"] == 24
