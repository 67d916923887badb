"""Progress a person can follow: one live bar per long stage on a terminal, plain lines in logs.

A :class:`Progress` (one per run or command) makes a :class:`Task` per stage. On a terminal
(its rich console, stderr by default, is a TTY) a task is a live bar with the stage's figures
and an ETA; library log lines (python ``logging`` and absl) are printed above the bar through
the same console while it is live, so they do not break it. Elsewhere (CI logs, files) a task
prints a plain line every ``interval_s`` seconds, at every ``every_pct`` percent and at the end::

  [fp32] step 600/1290 (47%): loss 0.4012, acc 85.9%, 5120 img/s, ETA 0:00:39

The pipeline's own ``[stage] running`` / ``[stage] done in N s`` lines stay as they are, so a
log still ends each stage with the ``done in`` line. The adapters: :meth:`Progress.training`
(the fit loop of :mod:`cimjax.train.loop`), :meth:`Progress.search` (a
:data:`cimjax.search.runner.ProgressFn`), :meth:`Progress.phases` (the compile stage's
``progress(phase, done, total)`` callback of :func:`cimjax.compiler.compile_and_verify`).

:class:`ScalarLog` writes scalars to TensorBoard event files when ``tensorboardX`` is installed
(the ``tensorboard`` extra; imported lazily) and does nothing otherwise.

:func:`default_verbosity` / :func:`quiet_main` set the console scripts' logging: ``cimjax``
and ``cimjax-compile`` at WARNING unless ``--verbosity`` (``-v``, absl's flag) is given, and no
start-up chatter such as jax's backend probe ("Unable to initialize backend 'tpu'") below
``-v 1``.

Nothing here holds module-level mutable state: the objects are made by the caller and passed to
the loops; the clock is injectable (tests drive a task with a fake one).
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import logging

MODES = ("auto", "bar", "lines", "off")
Clock = Callable[[], float]
# (metric name, format of its value): the figures a task shows after its count.
Fields = Sequence[tuple[str, str]]

TRAIN_FIELDS: Fields = (
  ("loss", "loss {:.4f}"),
  ("accuracy", "acc {:.1f}%"),
  ("images_per_s", "{:.0f} img/s"),
)
SEARCH_FIELDS: Fields = (
  ("best_reward", "best reward {:.3f}"),
  ("best_speedup", "speedup {:.2f}x"),
)
# The compile stage's phases (cimjax.compiler.compile_and_verify) and what each one counts.
COMPILE_PHASES: Mapping[str, str] = types.MappingProxyType(
  {"lower": "lower: layers", "verify": "verify: layers", "accuracy": "accuracy: batches"}
)


def format_duration(seconds: float) -> str:
  """``H:MM:SS`` (as rich's time columns)."""
  s = max(0, int(round(seconds)))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _finite(x: Any) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


class Task:
  """The progress display of one stage: a live bar, periodic plain lines, or nothing.

  Made by :meth:`Progress.task`; use it as a context manager (or call :meth:`close`).

  Args:
    progress: the :class:`Progress` it belongs to (mode, console, clock, cadence).
    name: the stage (the bar's label, the ``[name]`` of a line).
    total: units of work of the stage (or of its current phase).
    completed: units already done (a resumed stage).
    unit: what is counted (``"step"``, ``"evaluations"``), shown before the count.
    fields: the metrics shown after the count, in order (missing or non-finite ones are left
      out).
    rate_unit: also show the task's own rate in units a second with this label
      (``"cand/s"``), measured from the first update (which is usually after compilation).
  """

  def __init__(
    self,
    progress: Progress,
    name: str,
    total: int,
    *,
    completed: int = 0,
    unit: str = "step",
    fields: Fields = (),
    rate_unit: str | None = None,
  ):
    self.name, self.unit, self.fields, self.rate_unit = name, unit, tuple(fields), rate_unit
    self.total, self.completed = max(int(total), 0), int(completed)
    self.metrics: dict[str, float] = {}
    self._progress = progress
    self._clock = progress.clock
    self._start = self._clock()
    self._reset_phase(self._start)
    self._bar: Any = None
    self._route: contextlib.ExitStack | None = None
    self._closed = False
    if progress.mode == "bar":
      self._start_bar()

  @property
  def shown(self) -> bool:
    """Whether this task prints anything (a bar or lines; False when the progress is off)."""
    return self._progress.mode != "off"

  # -- state ---------------------------------------------------------------------------------
  def _reset_phase(self, now: float) -> None:
    self._first: tuple[float, int] | None = None  # (time, completed) of the first update
    self._last_line_t = now
    self._last_mark = self._mark()
    self._printed: tuple[str, int, int] | None = None  # (unit, completed, total) last printed

  def _mark(self) -> int:
    pct = self._progress.every_pct
    if not pct or pct <= 0 or not self.total:
      return 0
    return int(100.0 * self.completed / self.total // pct)

  def rate(self, now: float | None = None) -> float | None:
    """Units a second since the first update of this phase (None before a second one)."""
    if self._first is None:
      return None
    t0, c0 = self._first
    dt = (self._clock() if now is None else now) - t0
    dc = self.completed - c0
    return dc / dt if dt > 0 and dc > 0 else None

  def eta(self, now: float | None = None) -> float | None:
    """Seconds left at the current rate (0 when done, None while unknown)."""
    if self.total and self.completed >= self.total:
      return 0.0
    r = self.rate(now)
    return None if r is None or not self.total else (self.total - self.completed) / r

  def figures(self, now: float | None = None) -> str:
    """The metrics, the rate and the ETA as ``"loss 0.4012, acc 85.9%, ETA 0:00:39"``."""
    parts = [fmt.format(self.metrics[k]) for k, fmt in self.fields if _finite(self.metrics.get(k))]
    r = self.rate(now)
    if self.rate_unit and r is not None:
      parts.append(f"{r:.1f} {self.rate_unit}")
    eta = self.eta(now)
    if eta is not None and self.completed < self.total:
      parts.append(f"ETA {format_duration(eta)}")
    return ", ".join(parts)

  def line(self, now: float | None = None) -> str:
    """The plain progress line: ``[name] unit done/total (pct%): figures``."""
    pct = f" ({100.0 * self.completed / self.total:.0f}%)" if self.total else ""
    figs = self.figures(now)
    return f"[{self.name}] {self.unit} {self.completed}/{self.total}{pct}" + (
      f": {figs}" if figs else ""
    )

  # -- updates -------------------------------------------------------------------------------
  def update(
    self, completed: int, *, total: int | None = None, unit: str | None = None, **metrics: float
  ) -> None:
    """Reports ``completed`` units done and the latest ``metrics``.

    Args:
      completed: units done so far (of the current phase).
      total: a new total (a new phase: the rate, the ETA and the line cadence restart).
      unit: a new unit (also a new phase).
      **metrics: figures named in ``fields`` (others are kept but not shown).
    """
    if self._closed:
      return
    now = self._clock()
    if (total is not None and int(total) != self.total) or (unit is not None and unit != self.unit):
      self._maybe_final_line(now)
      self.total = self.total if total is None else max(int(total), 0)
      self.unit = self.unit if unit is None else unit
      self.completed = int(completed)
      self._reset_phase(now)
    self.completed = int(completed)
    self.metrics.update({k: float(v) for k, v in metrics.items() if _finite(v)})
    if self._first is None:
      self._first = (now, self.completed)
    mode = self._progress.mode
    if mode == "bar":
      self._bar_update(now)
    elif mode == "lines" and self._line_due(now):
      self._print_line(now)

  def _line_due(self, now: float) -> bool:
    if self.total and self.completed >= self.total:
      return self._printed != (self.unit, self.completed, self.total)
    since = now - self._last_line_t
    if self._mark() > self._last_mark and since >= self._progress.interval_s / 5:
      return True  # a new multiple of every_pct (not twice within a fifth of the interval)
    return since >= self._progress.interval_s

  def _print_line(self, now: float) -> None:
    self._last_line_t, self._last_mark = now, self._mark()
    self._printed = (self.unit, self.completed, self.total)
    self._progress.print(self.line(now))

  def _maybe_final_line(self, now: float) -> None:
    """In lines mode, the line of a phase that ends without its last update printed."""
    if self._progress.mode != "lines" or self._first is None:
      return
    if self._printed != (self.unit, self.completed, self.total):
      self._print_line(now)

  # -- the bar -------------------------------------------------------------------------------
  def _start_bar(self) -> None:
    from rich import progress as rp  # local: rich is only needed on terminals

    console = self._progress.console
    self._bar = rp.Progress(
      rp.TextColumn("[bold]{task.description}"),
      rp.BarColumn(bar_width=24),
      rp.TextColumn("{task.fields[unit]}"),
      rp.MofNCompleteColumn(),
      rp.TaskProgressColumn(),
      rp.TimeElapsedColumn(),
      rp.TextColumn("{task.fields[info]}"),
      console=console,
      get_time=self._clock,
      refresh_per_second=4,
      redirect_stdout=_is_tty(sys.stdout),  # never move a redirected stdout into the console
      redirect_stderr=True,
      transient=False,
    )
    self._route = contextlib.ExitStack()
    self._route.enter_context(logging_through(console))
    self._bar.start()
    self._bar_id = self._bar.add_task(
      self.name, total=self.total or None, completed=self.completed, unit=self.unit, info=""
    )

  def _bar_update(self, now: float) -> None:
    self._bar.update(
      self._bar_id,
      completed=self.completed,
      total=self.total or None,
      unit=self.unit,
      info=self.figures(now),
    )

  # -- the end -------------------------------------------------------------------------------
  def close(self) -> None:
    """Ends the display: stops the bar (it stays on screen) or prints the last line."""
    if self._closed:
      return
    now = self._clock()
    if self._bar is not None:
      self._bar_update(now)
      self._bar.refresh()
      self._bar.stop()
      self._bar = None
    if self._route is not None:
      self._route.close()
      self._route = None
    self._maybe_final_line(now)
    self._closed = True

  def __enter__(self) -> Task:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class SearchProgress:
  """A :data:`cimjax.search.runner.ProgressFn` showing a search and logging it to TensorBoard.

  Call it as ``(iteration, used, budget, best_reward, best_speedup)``; :meth:`close` it after
  the search.

  Args:
    task: the display (evaluations out of the budget, best reward and speedup, cand/s, ETA).
    scalars: TensorBoard sink (``search/best_reward``, ``search/best_speedup``,
      ``search/candidates_per_s``, ``search/iteration`` at step = evaluations used), or None.
  """

  def __init__(self, task: Task, scalars: ScalarLog | None = None):
    self.task, self.scalars = task, scalars
    self._logged = -1

  def __call__(
    self, iteration: int, used: int, budget: int, best_reward: float, best_speedup: float = math.nan
  ) -> None:
    self.task.update(
      int(used), total=int(budget), best_reward=best_reward, best_speedup=best_speedup
    )
    if self.scalars is not None and used > self._logged:
      self._logged = int(used)
      values = {
        "search/best_reward": best_reward,
        "search/best_speedup": best_speedup,
        "search/iteration": iteration,
      }
      rate = self.task.rate()
      if rate is not None:
        values["search/candidates_per_s"] = rate
      self.scalars.add(int(used), values)

  def close(self) -> None:
    self.task.close()
    if self.scalars is not None:
      self.scalars.close()

  def __enter__(self) -> SearchProgress:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class PhaseProgress:
  """The compile stage's ``progress(phase, done, total)`` callback over one :class:`Task`.

  Phases (:data:`COMPILE_PHASES`): ``lower`` and ``verify`` count layers, ``accuracy`` counts
  evaluation batches; each phase restarts the count (and the ETA).
  """

  def __init__(self, task: Task):
    self.task = task

  def __call__(self, phase: str, done: int, total: int) -> None:
    self.task.update(int(done), total=int(total), unit=COMPILE_PHASES.get(phase, phase))

  def close(self) -> None:
    self.task.close()

  def __enter__(self) -> PhaseProgress:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class Progress:
  """Makes the progress displays of a run's stages (one object per run or command).

  Args:
    mode: ``"auto"`` (a bar when the console is a terminal, else plain lines), ``"bar"``,
      ``"lines"`` or ``"off"``.
    console: the rich console (default: one on stderr).
    interval_s: in lines mode, at most this long between two lines of a task.
    every_pct: in lines mode, also a line whenever the task crosses a multiple of this
      percentage, unless the last line is less than ``interval_s / 5`` old (0: only by time).
    clock: seconds, monotonic (tests pass a fake one).
  """

  def __init__(
    self,
    mode: str = "auto",
    *,
    console: Any = None,
    interval_s: float = 10.0,
    every_pct: float = 25.0,
    clock: Clock = time.monotonic,
  ):
    if mode not in MODES:
      raise ValueError(f"progress mode {mode!r}; allowed: {', '.join(MODES)}")
    if console is None and mode != "off":
      from rich.console import Console  # local: only when something is shown

      console = Console(stderr=True)
    self.console = console
    if mode == "auto":
      mode = "bar" if console.is_terminal else "lines"
    self.mode, self.interval_s, self.every_pct, self.clock = mode, interval_s, every_pct, clock

  @classmethod
  def of(cls, progress: bool | str | Progress | None) -> Progress:
    """``progress`` itself, or one made from a flag: True/None ``"auto"``, False ``"off"``."""
    if isinstance(progress, Progress):
      return progress
    if isinstance(progress, str):
      return cls(progress)
    return cls("auto" if progress is None or progress else "off")

  def print(self, line: str) -> None:
    """Prints one plain line on the console (no markup, never wrapped)."""
    if self.console is not None:
      self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

  def task(self, name: str, total: int, **kwargs: Any) -> Task:
    """A :class:`Task` (see its arguments)."""
    return Task(self, name, total, **kwargs)

  def training(self, name: str, total: int, completed: int = 0) -> Task:
    """A training stage: ``step done/total``, loss, accuracy (percent), img/s, ETA.

    Update it with ``loss``, ``accuracy`` (percent) and ``images_per_s``.
    """
    return Task(self, name, total, completed=completed, unit="step", fields=TRAIN_FIELDS)

  def search(
    self, name: str, budget: int, tb_dir: str | os.PathLike[str] | None = None
  ) -> SearchProgress:
    """A search: ``evaluations used/budget``, best reward and speedup, cand/s, ETA.

    Args:
      name: the stage.
      budget: the evaluation budget.
      tb_dir: TensorBoard directory of the search's scalars (None: none).
    """
    task = Task(self, name, budget, unit="evaluations", fields=SEARCH_FIELDS, rate_unit="cand/s")
    return SearchProgress(task, None if tb_dir is None else ScalarLog(tb_dir))

  def phases(self, name: str, total: int = 0) -> PhaseProgress:
    """The compile stage: ``lower``/``verify`` layers, ``accuracy`` batches, one after another."""
    return PhaseProgress(Task(self, name, total, unit=COMPILE_PHASES["lower"]))


# ----------------------------------------------------------------------------------------------
# TensorBoard


class ScalarLog:
  """Scalars in TensorBoard event files under ``logdir`` (``tensorboardX``, when installed).

  Without ``tensorboardX`` every method does nothing; one INFO-level note says so.

  Args:
    logdir: the event files' directory (created).
    purge_step: a resumed run: TensorBoard drops the older files' events from this step on.
  """

  def __init__(self, logdir: str | os.PathLike[str], *, purge_step: int | None = None):
    self.logdir = Path(logdir)
    self._writer: Any = None
    try:
      writer_cls = _summary_writer_class()
    except ImportError:
      logging.log_first_n(
        logging.INFO, "tensorboardX is not installed: no TensorBoard event files (%s)", 1, logdir
      )
      return
    self.logdir.mkdir(parents=True, exist_ok=True)
    self._writer = writer_cls(str(self.logdir), purge_step=purge_step, flush_secs=10)

  @property
  def enabled(self) -> bool:
    """Whether event files are written."""
    return self._writer is not None

  def add(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes the finite numbers of ``values`` (nested dicts joined with ``/``) at ``step``."""
    if self._writer is None:
      return
    for tag, v in _flat_numbers(values):
      self._writer.add_scalar(tag, v, int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _summary_writer_class() -> Any:
  """tensorboardX's ``SummaryWriter`` (the optional ``tensorboard`` extra).

  tensorboardX imports torch when it is installed (about 2 s) only to recognise torch tensors;
  scalars need none, so unless torch is already loaded the import runs with torch hidden.

  Raises:
    ImportError: tensorboardX is not installed.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", False) is None:
      del sys.modules["torch"]
  return SummaryWriter


def _flat_numbers(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
  for k, v in values.items():
    tag = f"{prefix}{k}"
    if isinstance(v, Mapping):
      yield from _flat_numbers(v, tag + "/")
    elif not isinstance(v, (bool, str)) and _finite(v):
      yield tag, float(v)


# ----------------------------------------------------------------------------------------------
# Logging


def _is_tty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


class _ThroughConsole(py_logging.Filter):
  """Prints a handler's records through a rich console (above a live bar) instead."""

  def __init__(self, console: Any, handler: py_logging.Handler):
    super().__init__()
    self.console, self.handler = console, handler

  def filter(self, record: py_logging.LogRecord) -> bool:
    try:
      text = self.handler.format(record)
    except Exception:  # pylint: disable=broad-except
      return True  # let the handler report its own formatting error
    self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
    return False


def _terminal_handlers() -> list[py_logging.Handler]:
  """The handlers of the root and absl loggers that write to the process's stdout/stderr."""
  streams = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)}
  out = []
  for logger in (py_logging.getLogger(), py_logging.getLogger("absl")):
    for h in logger.handlers:
      inner = getattr(h, "python_handler", h)  # absl's ABSLHandler wraps a StreamHandler
      if id(getattr(inner, "stream", None)) in streams and h not in out:
        out.append(h)
  return out


@contextlib.contextmanager
def logging_through(console: Any) -> Iterator[None]:
  """While active, log records of terminal-bound handlers print through ``console``.

  A live rich bar redraws itself below whatever the console prints, so absl and python log
  lines appear above the bar, each on its own line, formatted as usual.
  """
  filters = [(h, _ThroughConsole(console, h)) for h in _terminal_handlers()]
  for h, f in filters:
    h.addFilter(f)
  try:
    yield
  finally:
    for h, f in filters:
      h.removeFilter(f)


# Loggers of library start-up chatter shown only at DEBUG (``-v 1``): jax's backend probe logs
# "Unable to initialize backend 'tpu': ... libtpu.so ..." at INFO on every machine without one.
PROBE_LOGGERS = ("jax._src.xla_bridge",)


def default_verbosity(level: int = logging.WARNING) -> None:
  """The console scripts' logging: ``level`` unless ``--verbosity``/``-v`` (absl's) was given.

  absl raises an unset verbosity to INFO once flags are parsed. ``cimjax`` and
  ``cimjax-compile`` pass WARNING (their own lines say what happens; ``-v 0`` shows INFO),
  ``cimjax-train`` / ``cimjax-search`` / ``cimjax-cost`` INFO (their notes, e.g. "resuming from
  step N"). Below DEBUG (``-v 1``) the start-up chatter of :data:`PROBE_LOGGERS` is silenced.

  Args:
    level: absl verbosity when the flag was not given (``logging.WARNING``, ``logging.INFO``).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(level)
  quiet = logging.get_verbosity() < logging.DEBUG
  for name in PROBE_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.WARNING if quiet else py_logging.NOTSET)


def quiet_main(main: Callable[[Any], Any], level: int = logging.INFO) -> Callable[[Any], Any]:
  """``main`` for ``absl.app.run``, calling :func:`default_verbosity` (``level``) first."""

  def wrapped(argv: Any) -> Any:
    default_verbosity(level)
    return main(argv)

  return wrapped


__all__ = [
  "COMPILE_PHASES",
  "MODES",
  "PROBE_LOGGERS",
  "SEARCH_FIELDS",
  "TRAIN_FIELDS",
  "PhaseProgress",
  "Progress",
  "ScalarLog",
  "SearchProgress",
  "Task",
  "default_verbosity",
  "format_duration",
  "logging_through",
  "quiet_main",
]
