"""The progress display (cimjax.progress): plain lines in logs, a live bar on terminals, the
adapters of the fit loop, the search and the compiler, and the TensorBoard scalars."""

import io
import logging
import re
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console

from cimjax import data as data_lib
from cimjax import progress as progress_lib
from cimjax.train import loop


class FakeClock:
  """A clock the test moves by hand (``tick`` seconds on every read when ``tick`` > 0)."""

  def __init__(self, tick: float = 0.0):
    self.t, self.tick = 0.0, tick

  def __call__(self) -> float:
    self.t += self.tick
    return self.t


def _plain(clock, **kw):
  """A lines-mode Progress printing into a string, and the function reading its lines."""
  out = io.StringIO()
  prog = progress_lib.Progress("auto", console=Console(file=out, width=80), clock=clock, **kw)
  return prog, lambda: [l for l in out.getvalue().splitlines() if l]


def test_a_non_terminal_console_gets_plain_lines_at_every_quarter_and_the_end():
  clock = FakeClock()
  prog, lines = _plain(clock, interval_s=50.0, every_pct=25.0)  # marks >= 10 s apart
  assert prog.mode == "lines"
  task = prog.training("fp32", 400)
  for step in range(10, 401, 10):
    clock.t = step / 10.0  # 10 steps a second
    task.update(step, loss=1.0 / step, accuracy=90.0 + step / 100, images_per_s=1280.0)
  task.close()
  got = lines()
  assert [re.match(r"\[fp32\] step (\d+)/400", l).group(1) for l in got] == [
    "100",
    "200",
    "300",
    "400",
  ]
  assert got[0] == "[fp32] step 100/400 (25%): loss 0.0100, acc 91.0%, 1280 img/s, ETA 0:00:30"
  assert got[1].endswith("(50%): loss 0.0050, acc 92.0%, 1280 img/s, ETA 0:00:20")
  assert got[-1] == "[fp32] step 400/400 (100%): loss 0.0025, acc 94.0%, 1280 img/s"  # no ETA


def test_plain_lines_come_every_interval_without_percent_marks():
  clock = FakeClock()
  prog, lines = _plain(clock, interval_s=10.0, every_pct=0)
  task = prog.task("search", 1000, unit="evaluations", rate_unit="cand/s")
  for t in range(1, 36):
    clock.t = float(t)
    task.update(20 * t)
  assert [l.split()[2] for l in lines()] == ["200/1000", "400/1000", "600/1000"]  # t = 10, 20, 30
  task.close()  # stopped before the budget: the last state is printed once
  assert lines()[-1].startswith("[search] evaluations 700/1000 (70%): 20.0 cand/s, ETA 0:00:15")
  task.close()
  assert len(lines()) == 4


def test_percent_marks_close_together_wait_for_a_fifth_of_the_interval():
  clock = FakeClock()
  prog, lines = _plain(clock, interval_s=10.0, every_pct=25.0)
  task = prog.training("int8", 10)
  for step in range(1, 11):
    clock.t = step * 0.1  # a 1-second stage: only the last line
    task.update(step)
  task.close()
  assert lines() == ["[int8] step 10/10 (100%)"]


def test_search_lines_show_budget_best_reward_speedup_rate_and_eta():
  clock = FakeClock()
  prog, lines = _plain(clock, interval_s=5.0, every_pct=0)
  fn = prog.search("search", 100)
  clock.t = 1.0
  fn(1, 10, 100, float("-inf"), float("nan"))  # no finite best yet: left out
  clock.t = 7.0
  fn(2, 40, 100, 12.3456, 2.5)  # 30 evaluations in 6 s: 5 cand/s, 60 left: 12 s
  fn.close()
  assert lines() == [
    "[search] evaluations 40/100 (40%): best reward 12.346, speedup 2.50x, 5.0 cand/s, ETA 0:00:12"
  ]


def test_compile_phases_each_end_with_their_line():
  clock = FakeClock(tick=1.0)
  prog, lines = _plain(clock, interval_s=1000.0, every_pct=0)
  with prog.phases("compile") as fn:
    fn("lower", 0, 5)
    fn("lower", 5, 5)
    fn("verify", 0, 5)
    for d in range(1, 4):
      fn("verify", d, 5)
    fn("accuracy", 1, 4)  # verify ended at 3/5 (a new phase prints the old one's last state)
    fn("accuracy", 4, 4)
  got = lines()
  assert got[0] == "[compile] lower: layers 5/5 (100%)"
  assert got[1].startswith("[compile] verify: layers 3/5 (60%)")
  assert got[2] == "[compile] accuracy: batches 4/4 (100%)"
  assert len(got) == 3


def test_off_prints_nothing_and_flags_map_to_modes():
  assert progress_lib.Progress.of(False).mode == "off"
  assert progress_lib.Progress.of(None).mode in ("bar", "lines")
  prog = progress_lib.Progress("lines", console=Console(file=io.StringIO()))
  assert progress_lib.Progress.of(prog) is prog
  with pytest.raises(ValueError, match="allowed"):
    progress_lib.Progress("fancy")
  off = progress_lib.Progress("off")
  with off.training("fp32", 10) as task:
    task.update(10, loss=0.5)
  assert task.line() == "[fp32] step 10/10 (100%): loss 0.5000"  # tracked, never printed


def test_a_terminal_renders_a_live_bar_and_logs_above_it(capsys):
  out = io.StringIO()
  console = Console(file=out, force_terminal=True, width=140, color_system=None)
  clock = FakeClock()
  prog = progress_lib.Progress("auto", console=console, clock=clock)
  assert prog.mode == "bar"
  handler = logging.StreamHandler(sys.stderr)  # what absl's handler is: a stream on stderr
  handler.setFormatter(logging.Formatter("LOG %(message)s"))
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    task = prog.training("fp32", 100)
    clock.t = 1.0
    task.update(10, loss=0.5, accuracy=80.0, images_per_s=1000.0)
    logging.getLogger("some.library").warning("a library line")
    clock.t = 3.0
    task.update(40, loss=0.25, accuracy=90.0, images_per_s=2000.0)
    task.close()
  finally:
    root.removeHandler(handler)
  text = out.getvalue()
  assert "\x1b[" in text and "━" in text  # a redrawn bar
  final = text.split("\r")[-1]
  assert "fp32" in final and "step" in final and "40/100" in final and "40%" in final
  assert "loss 0.2500, acc 90.0%, 2000 img/s, ETA 0:00:04" in final
  assert "LOG a library line" in text  # printed through the console, above the bar
  assert "a library line" not in capsys.readouterr().err  # not onto the bar's line
  assert not any(isinstance(f, progress_lib._ThroughConsole) for f in handler.filters)


def test_fit_reports_through_the_shared_progress(tmp_path):
  class State(NamedTuple):
    step: int

  def step_fn(state, batch):
    s = state.step + 1
    clock.t = float(s)  # a step a second
    return State(s), {"loss": jnp.float32(1.0 / s), "accuracy": jnp.float32(0.5)}

  n = 32
  train = data_lib.Dataset(
    np.zeros((n, 2, 2, 1), np.float32), np.zeros((n,), np.int32), np.arange(n)
  )
  clock = FakeClock()
  prog, lines = _plain(clock, interval_s=20.0, every_pct=25.0)
  writer = loop.MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False)
  state, last = loop.fit(
    step_fn,
    State(0),
    train,
    num_steps=40,
    batch_size=8,
    data_seed=0,
    writer=writer,
    log_every=10,
    progress=prog,
    description="fp32",
  )
  writer.close()
  got = lines()
  assert state.step == 40 and last["step"] == 40
  assert [l.split()[2] for l in got] == ["10/40", "20/40", "30/40", "40/40"]
  first = r"\[fp32\] step 10/40 \(25%\): loss 0\.\d{4}, acc 50\.0%, \d+ img/s, ETA 0:00:30"
  assert re.fullmatch(first, got[0]), got[0]
  assert "loss 0.0284" in got[-1]  # the mean of 1/s over steps 31-40
  assert not (tmp_path / "tb").exists()


# ----------------------------------------------------------------------------------------------
# TensorBoard


def _scalars(logdir: Path) -> dict[tuple[str, int], float]:
  """``{(tag, step): value}`` of the event files in ``logdir`` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  out = {}
  for f in sorted(logdir.glob("events.out.tfevents.*")):
    data, i = f.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i : i + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[i + 12 : i + 12 + n])  # length, its crc, data, its crc
      i += 12 + n + 4
      for v in ev.summary.value:
        out[(v.tag, ev.step)] = v.simple_value
  return out


def test_metrics_and_search_scalars_are_read_back_from_event_files(tmp_path):
  pytest.importorskip("tensorboardX")
  w = loop.MetricsWriter(tmp_path / "fp32" / "metrics.jsonl")
  w.write({"kind": "train", "step": 50, "loss": 0.75, "accuracy": 0.5, "epoch": 0.1})
  w.write({"kind": "eval", "step": 50, "val_accuracy_float": 81.5})
  w.write({"step": 100, "final": True, "eval": {"float": {"test": 88.25, "val": 89.0}}})
  w.close()
  got = _scalars(tmp_path / "fp32" / "tb")
  assert got[("train/loss", 50)] == pytest.approx(0.75)
  assert got[("train/accuracy", 50)] == pytest.approx(0.5)
  assert got[("eval/val_accuracy_float", 50)] == pytest.approx(81.5)
  assert got[("final/float/test", 100)] == pytest.approx(88.25)
  assert ("train/epoch", 50) not in got

  prog = progress_lib.Progress("off", clock=FakeClock(tick=1.0))
  fn = prog.search("search", 100, tmp_path / "search" / "tb")
  fn(1, 20, 100, 5.0, 1.5)
  fn(2, 20, 100, 5.0, 1.5)  # no new evaluation: nothing new written
  fn(3, 60, 100, 7.5, 2.25)
  fn.close()
  got = _scalars(tmp_path / "search" / "tb")
  assert got[("search/best_reward", 60)] == pytest.approx(7.5)
  assert got[("search/best_speedup", 60)] == pytest.approx(2.25)
  assert got[("search/iteration", 20)] == 1.0
  assert ("search/candidates_per_s", 60) in got


def test_without_tensorboardx_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  log = progress_lib.ScalarLog(tmp_path / "tb")
  log.add(1, {"a": 1.0})
  log.close()
  assert not log.enabled and not (tmp_path / "tb").exists()
  w = loop.MetricsWriter(tmp_path / "metrics.jsonl")
  w.write({"kind": "train", "step": 1, "loss": 1.0})
  w.close()
  assert not (tmp_path / "tb").exists() and (tmp_path / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------------------------
# The search's and the compiler's callbacks


@pytest.mark.parametrize("mode", ["loop", "scan"])
def test_search_progress_reports_the_best_reward_and_its_speedup(small_cnn_rram_64_c2, mode):
  from cimjax.search import accuracy as acc_lib
  from cimjax.search import runner

  m, specs, hw, tables = small_cnn_rram_64_c2
  src = acc_lib.SyntheticAccuracy(specs, seed=5, drop44=3.0)
  calls = []
  cfg = runner.SearchConfig(agent="random", budget=60, constraint="io", seed=4, mode=mode)
  res = runner.run_search(m, specs, tables, src, cfg, hw=hw, progress=lambda *a: calls.append(a))
  it, used, budget, best, speedup = calls[-1]
  assert (it, used, budget) == (res.iterations, res.evals_used, 60)
  assert best == pytest.approx(res.best_reward, rel=1e-5)
  assert speedup == pytest.approx(res.best_speedup, rel=1e-5) and speedup > 1.0
  assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def test_compile_and_verify_reports_its_phases():
  import jax

  import cimjax
  from cimjax import compile as cc
  from cimjax import models

  md = models.get_model("small_cnn", channels=(4, 8, 8), hidden=16)
  v = cimjax.init(md, jax.random.key(2))
  calls = []
  images = np.asarray(jax.random.normal(jax.random.key(0), (6, *md.input_shape)), np.float32)
  res = cc.compile_and_verify(
    md,
    v,
    np.full((5, 2), 4, np.int32),
    "rram_256_c4",
    num_verify=2,
    eval_data=(images, np.zeros((6,), np.int32)),
    eval_batch=4,
    progress=lambda *a: calls.append(a),
  )
  assert res.report.ok
  assert calls[:2] == [("lower", 0, 5), ("lower", 5, 5)]
  assert [c for c in calls if c[0] == "verify"] == [("verify", d, 5) for d in range(6)]
  assert [c for c in calls if c[0] == "accuracy"] == [("accuracy", d, 4) for d in range(5)]


def test_default_verbosity_and_the_backend_probe():
  from absl import flags
  from absl import logging as absl_logging

  probe = logging.getLogger("jax._src.xla_bridge")
  flag = flags.FLAGS["verbosity"]
  before, present = absl_logging.get_verbosity(), flag.present
  try:
    assert not flag.present
    absl_logging.set_verbosity(absl_logging.INFO)
    progress_lib.default_verbosity()  # cimjax, cimjax-compile
    assert absl_logging.get_verbosity() == absl_logging.WARNING
    assert probe.level == logging.WARNING
    probe.setLevel(logging.NOTSET)
    seen = []
    wrapped = progress_lib.quiet_main(lambda argv: seen.append(argv) or 3)  # train, search
    assert wrapped(["prog"]) == 3 and seen == [["prog"]]
    assert absl_logging.get_verbosity() == absl_logging.INFO
    assert probe.level == logging.WARNING  # no "Unable to initialize backend 'tpu'" at INFO
    flag.present = 1  # -v 1 on the command line
    absl_logging.set_verbosity(absl_logging.DEBUG)
    progress_lib.default_verbosity()
    assert absl_logging.get_verbosity() == absl_logging.DEBUG
    assert probe.level == logging.NOTSET  # as the other loggers
  finally:
    flag.present = present
    absl_logging.set_verbosity(before)
    probe.setLevel(logging.NOTSET)


def test_format_duration():
  assert progress_lib.format_duration(0) == "0:00:00"
  assert progress_lib.format_duration(3725.4) == "1:02:05"
