"""The main job end to end: FP32 -> INT8 -> any-precision QAT -> search -> fine-tune -> test ->
compile + verify -> report, each stage checkpointed and skipped when already finished.

Workdir layout (``DIR``)::

  DIR/config.json                  the run's config (a re-run must use the same one)
  DIR/fp32|int8|anyprec/           training stages (cimjax.train.run_stage: checkpoints,
                                   variables/, metrics.jsonl, result.json)
  DIR/search/                      search state checkpoints and outputs (best_policy.npy,
                                   report.json, pareto.json, *.png), result.json
  DIR/finetune/chosen/             mixed-precision fine-tuning of the chosen policy
  DIR/evaluate/result.json         final test accuracies
  DIR/compile/                     program/ (manifest + arrays), compile_report.json, result.json
  DIR/report.json, DIR/report.md   the report (plots under DIR/plots/)

The stages are the table :data:`STAGE_TABLE` (names :data:`STAGES`): the training stages of
:mod:`cimjax.train` with the search between any-precision QAT and fine-tuning, then the stages
that evaluate, compile and report. A stage is finished when its ``result.json`` exists
(:func:`cimjax.train.is_done`; written atomically, last) and is then skipped; the report writes
none and is rebuilt on every run. Training and search stages resume from their checkpoints when
interrupted; the later stages are short and simply rerun. See docs/architecture.md.

Before the first stage starts, everything the run will need is checked (:func:`validate_run`:
every config field the stages read, the hardware target, the model and a given policy's length,
the dataset's files, the finished stages the others start from) and the data is loaded; only
then is the workdir created and locked (:mod:`cimjax.lock`, process 0: a second run on the same
workdir is refused). A bad input is one :class:`cimjax.errors.CimjaxError` naming the field,
and nothing is written. A ``result.json`` that does not read back makes its stage run again
(from its checkpoints); corrupt checkpoints are skipped for the newest intact one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from cimjax import compiler as compile_lib
from cimjax import cost as cost_lib
from cimjax import hw as hw_lib
from cimjax import io, multihost
from cimjax import lock as lock_lib
from cimjax import policy as policy_lib
from cimjax import progress as progress_lib
from cimjax import stages as stages_lib
from cimjax import train as train_lib
from cimjax.errors import ConfigError, DataError, HwError, PipelineError, PolicyError
from cimjax.models import ModelDef
from cimjax.stages import choose_policy  # noqa: F401 (re-exported)
from cimjax.trace import trace_specs
from cimjax.train import config as train_config
from cimjax.train import runner as train_runner
from cimjax.variables import VariablesError

if TYPE_CHECKING:
  from cimjax import data as data_lib
  from cimjax import report as report_lib

FINETUNE_NAME = "chosen"
*_PRETRAIN, _FINETUNE = train_lib.STAGES  # fp32, int8, anyprec; finetune


def default_config() -> ml_collections.ConfigDict:
  """The embedded default: small CNN on Fashion-MNIST, rram_64_c2, 0.5 points, both constraints.

  This is the run config, the one config schema of cimjax: ``train`` (the training config,
  :func:`cimjax.train.default_config`), ``hw``, ``search``, ``compile``, ``from_policy``.
  Sized to finish in well under 10 minutes on a 2-core CPU: short stages on the full train
  split (fewer epochs on all 55,000 images beat more epochs on a subset at equal time,
  BUILD_NOTES.md), the search on 2,000 held-out validation images (the re-evaluation and the
  choice on the 3,000 others), the final numbers on the full 10,000-image test file.
  """
  c = ml_collections.ConfigDict()
  t = train_lib.default_config()
  t.model = "small_cnn"
  t.data.name = "fashion_mnist"
  t.data.val_size = 5000
  t.batch_size = 128
  t.checkpoint_every = 100
  t.eval_every = -1
  t.log_every = 50
  t.fp32.epochs = 3
  t.fp32.lr = 3e-3
  t.fp32.warmup_epochs = 0.3
  t.int8.epochs = 0.25
  t.int8.lr = 2e-4
  t.anyprec.epochs = 0.5
  t.anyprec.lr = 5e-4
  t.finetune.epochs = 0.5
  t.finetune.lr = 2e-4
  t.bits.constraint = "both"
  t.bits.cell_bits = 0  # filled from the hardware target
  c.train = t
  c.hw = "rram_64_c2"
  c.search = ml_collections.ConfigDict(
    dict(
      agent="pg",
      budget=1000,
      acc_drop=0.5,
      constraint="both",
      seed=0,
      mode="auto",
      population=0,
      search_images=2000,
      final_top_k=64,
      choose_margin=1.0,
      lazy=False,
      lazy_chunk=250,
      lazy_alpha=1e-3,
      data_parallel=1,
    )
  )
  c.compile = ml_collections.ConfigDict(dict(num_verify=16, eval_images=2000, input_scheme="twos"))
  c.from_policy = ""
  return c


def _json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def _read(d: Path) -> dict[str, Any]:
  """A stage's ``result.json`` (``{}`` when the stage has not finished).

  Raises:
    PipelineError: the file exists but does not read back (corrupt).
  """
  if not train_lib.is_done(d):
    return {}
  result = train_runner.read_result(d)
  if result is None:
    raise PipelineError(
      f"{d / 'result.json'} does not read back (corrupt); run its stage again (--stages)"
    )
  return result


@contextlib.contextmanager
def _train_fields() -> Iterator[None]:
  """Errors of the training config name their field as the run config does (``config.train.``)."""
  try:
    yield
  except (ConfigError, DataError) as e:
    msg = str(e)
    if not msg.startswith("config.") or msg.startswith("config.train."):
      raise
    kind = DataError if isinstance(e, DataError) else ConfigError
    raise kind("config.train." + msg[len("config.") :]) from None


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills derived fields (cell bits from the target) and validates the training config.

  Raises:
    ConfigError: a bad field (the target included), named as in the run config.
  """
  config = ml_collections.ConfigDict(_json(config))
  try:
    hw = hw_lib.load_hw(config.hw)
  except HwError as e:
    raise ConfigError(f"config.hw = {config.hw!r}: {e}") from None
  if not config.train.bits.cell_bits:
    config.train.bits.cell_bits = hw.cell_bits
  try:
    policy_lib.normalize_constraint(config.search.constraint)
  except PolicyError:
    allowed = ", ".join(policy_lib.CONSTRAINTS)
    raise ConfigError(
      f"config.search.constraint = {config.search.constraint!r}; allowed: {allowed}"
    ) from None
  config.train.bits.constraint = config.search.constraint
  with _train_fields():
    train_lib.validate_config(config.train)
  return config


@dataclasses.dataclass(frozen=True)
class _Checked:
  """What the checks common to every stage found (see :func:`validate_run`)."""

  config: ml_collections.ConfigDict
  hw: hw_lib.HardwareTarget
  num_layers: int
  given_policy: np.ndarray | None
  splits: Any = None  # the data, when checking it meant loading it


def _check_common(config: ml_collections.ConfigDict) -> _Checked:
  """The checks every run makes: the config, the target, the dataset's files, the model (its
  options, its layers) and a given policy (its file, its length)."""
  config = prepare(config)
  hw = hw_lib.load_hw(config.hw)
  with _train_fields():
    splits = train_config.check_data(config.train)
    specs = train_config.static_specs(config.train, splits)
  given = None
  if config.from_policy:
    try:
      given = policy_lib.load_policy(
        config.from_policy, len(specs), layer_names=[s.name for s in specs]
      )
    except PolicyError as e:
      raise ConfigError(f"config.from_policy = {config.from_policy!r}: {e}") from None
  return _Checked(config, hw, len(specs), given, splits)


def _needs(stage: str, config: ml_collections.ConfigDict, ready: Callable[[str], bool]) -> tuple:
  """The stages whose results ``stage`` reads (``ready``: finished or run before it)."""
  if stage in _PRETRAIN:
    source = train_lib.stages.get_stage(stage).source(config.train, Path())
    return () if source is None else (source,)
  if stage == "search":
    return () if config.from_policy else ("anyprec",)
  if stage == _FINETUNE:
    source = config.train.finetune.source
    if source == "auto":
      source = "anyprec" if ready("anyprec") else "int8"
    return ("search", source)
  if stage == "evaluate":
    return (*_PRETRAIN, "search", _FINETUNE)
  if stage == "compile":
    return ("search", _FINETUNE)
  return ("search",)  # the report: the chosen policy


def _check_stages(
  checked: _Checked, stages: Sequence[str], workdir: str | Path | None
) -> tuple[str, ...]:
  """The checks of the stages that will run: their config sections and, with a workdir, that
  every stage they start from has finished there or runs first. Reads, writes nothing."""
  if isinstance(stages, str):
    stages = [stages]
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise PipelineError(f"--stages has {bad}; allowed: {', '.join(STAGES)}")
  config = checked.config
  if "search" in stages and not config.from_policy:
    stages_lib.validate_search(config, checked.num_layers, checked.hw.cell_bits)
  if "compile" in stages:
    stages_lib.validate_compile(config)
  if config.train.get("pretrained", "") and any(
    train_lib.stages.get_stage(s).source(config.train, Path()) is None
    for s in stages
    if s in _PRETRAIN
  ):  # the keys and shapes of the weights file, before any stage starts (reads headers only)
    from cimjax.models import pretrained  # pylint: disable=g-import-not-at-top

    with _train_fields():
      model = train_config.static_model(config.train, checked.splits)
    pretrained.check_weights_file(model, config.train.pretrained)
  if workdir is not None:
    wd = Path(workdir)

    def finished(stage: str) -> bool:
      d = train_lib.stage_dir(wd, stage, FINETUNE_NAME if stage == _FINETUNE else None)
      return train_runner.read_result(d) is not None

    for stage in STAGES:
      if stage not in stages or (stage != "report" and finished(stage)):
        continue
      before = STAGES[: STAGES.index(stage)]

      def ready(s: str, before: tuple[str, ...] = before) -> bool:
        return finished(s) or (s in stages and s in before)

      for need in _needs(stage, config, ready):
        if not ready(need):
          raise PipelineError(
            f"stage {stage} needs the finished {need} stage in {wd / need}; add {need} to "
            f"--stages (--stages={','.join(s for s in STAGES if s in (*stages, need))})"
          )
  return tuple(s for s in STAGES if s in stages)


def validate_run(
  config: ml_collections.ConfigDict,
  stages: Sequence[str] | None = None,
  workdir: str | Path | None = None,
) -> ml_collections.ConfigDict:
  """Checks everything a run of ``stages`` needs, before any stage starts; writes nothing.

  Every config field that the stages read (names, ranges, enums), the hardware target, the
  model (its name and options) and a given policy (its file and length), that the dataset's
  files exist (without loading a large one) and, with ``workdir``, that every stage the others
  start from has finished there or is among ``stages``.

  Args:
    config: a run config (:func:`default_config`).
    stages: the stages that will run (default: all, :data:`STAGES`).
    workdir: the run's directory (optional: the prerequisite check).

  Returns:
    The config with its derived fields filled (:func:`prepare`).

  Raises:
    CimjaxError: the first problem, in one line naming the field (or file), its value and what
      is allowed: :class:`ConfigError`, :class:`PipelineError`, :class:`DataError`.
  """
  checked = _check_common(config)
  _check_stages(checked, STAGES if stages is None else stages, workdir)
  return checked.config


# ----------------------------------------------------------------------------------------------
# The stages: each computes its result from the pipeline's shared state.


def _train(stage: str) -> Callable[[Pipeline], dict[str, Any]]:
  """The training stage ``stage`` (:func:`cimjax.train.run_stage`; it writes its result)."""

  def run(p: Pipeline) -> dict[str, Any]:
    return train_lib.run_stage(p.config.train, stage, p.workdir, splits=p.splits)

  return run


def _search(p: Pipeline) -> dict[str, Any]:
  """The search on the validation split, the choice on its held-out rest (or a given policy)."""
  d = p.stage_dir("search")
  if p.given_policy is not None:
    return stages_lib.given_policy_stage(d, p.given_policy, p.config.from_policy)
  task = stages_lib.data_task(
    p.model,
    p.variables("anyprec", "search"),
    p.splits,
    p.hw,
    search_images=int(p.config.search.search_images),
    final_split="val",
    data_parallel=int(p.config.search.get("data_parallel", 1)),
    batch_size=p.config.train.eval_batch_size,
  )
  with p.progress.search("search", int(p.config.search.budget), d / "tb") as progress:
    return stages_lib.run_search_stage(
      p.config, d, stages_lib.multiprocess(task), hw=p.hw, progress=progress
    )


def _finetune(p: Pipeline) -> dict[str, Any]:
  """Mixed-precision fine-tuning of the chosen policy."""
  return train_lib.run_stage(
    p.config.train,
    _FINETUNE,
    p.workdir,
    policy=p.chosen_policy(),
    policy_name=FINETUNE_NAME,
    splits=p.splits,
  )


def _evaluate(p: Pipeline) -> dict[str, Any]:
  """Validation and test accuracy of FP32, INT8, the search proxy and the fine-tuned model."""
  pol = p.chosen_policy()
  out: dict[str, Any] = {"policy": pol.tolist()}
  for name, stage, policy in (
    ("fp32", "fp32", None),
    ("int8", "int8", policy_lib.uniform_policy(len(p.specs()), 8, 8)),
    ("anyprec_proxy", "anyprec", pol),
    ("mixed", _FINETUNE, pol),
  ):
    v = p.variables(stage, "evaluate")
    out[name] = train_lib.evaluate_splits(
      v, p.model, p.splits, p.config.train, policy, ("val", "test")
    )
  return out


def _compile(p: Pipeline) -> dict[str, Any]:
  """Compilation of the fine-tuned model onto the crossbars, with bit-exact verification."""
  v = p.variables(_FINETUNE, "compile")
  test = p.splits.test
  cc = p.config.compile
  n_eval = min(int(cc.eval_images), len(test))
  with p.progress.phases("compile") as progress:
    res = compile_lib.compile_and_verify(
      p.model,
      v,
      p.chosen_policy(),
      p.hw,
      workdir=p.stage_dir("compile"),
      verify_inputs=test.images[: int(cc.num_verify)],
      input_scheme=cc.input_scheme,
      model_kwargs=dict(p.config.train.model_kwargs),
      eval_data=(test.images[:n_eval], test.labels[:n_eval]) if n_eval else None,
      progress=progress,
    )
  return {
    "verify": res.summary["verify"],
    "accuracy": res.accuracy,
    "eval_images": n_eval,
    "total_latency_us": res.summary["total_latency_us"],
    "total_energy_pj": res.summary["total_energy_pj"],
    "total_tiles": res.summary["total_tiles"],
    "cost_model_mismatches": res.summary["cost_model_mismatches"],
    "program": str(res.path),
  }


def _report(p: Pipeline) -> dict[str, Any]:
  """``report.json`` and ``report.md`` (:func:`cimjax.report.write_report`)."""
  from cimjax import report as report_lib  # pylint: disable=g-import-not-at-top

  return report_lib.write_report(run_summary(p), p.log)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the run.

  Attributes:
    name: its name (``--stages``); its folder is ``Pipeline.stage_dir(name)``.
    run: computes the stage in a :class:`Pipeline`; returns its result.
    writes_result: the pipeline writes the result, with the stage's wall time, to the stage's
      ``result.json`` (False: the stage writes its own, as the training stages do, or none, as
      the report).
    collective: in a multi-process run every process runs the stage (data-parallel training,
      the search with its batches split between processes); False: process 0 alone runs it
      (host work: evaluation, compilation, the report) while the others wait.
  """

  name: str
  run: Callable[[Pipeline], dict[str, Any]]
  writes_result: bool = True
  collective: bool = False


STAGE_TABLE: tuple[Stage, ...] = (
  *(Stage(s, _train(s), writes_result=False, collective=True) for s in _PRETRAIN),
  Stage("search", _search, collective=True),
  Stage(_FINETUNE, _finetune, writes_result=False, collective=True),
  Stage("evaluate", _evaluate),
  Stage("compile", _compile),
  Stage("report", _report, writes_result=False),
)
STAGES = tuple(s.name for s in STAGE_TABLE)


# ----------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
  """Runs the stages of the main job in one workdir.

  Args:
    config: see :func:`default_config`.
    workdir: the run directory.
    log: a function printing one progress line.
    progress: the stages' progress displays (default: ``config.train.progress`` on or off,
      :meth:`cimjax.progress.Progress.of`).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    log: Callable[[str], None] = print,
    progress: progress_lib.Progress | None = None,
  ):
    self._checked = _check_common(config)  # fail early, before any training
    self.config = self._checked.config
    self.workdir = Path(workdir)
    self.log = log
    self.progress = progress_lib.Progress.of(
      progress if progress is not None else bool(self.config.train.progress)
    )
    self.hw = self._checked.hw
    self._splits = self._checked.splits
    self._model = None
    self.given_policy = self._checked.given_policy

  # -- shared state --------------------------------------------------------------------------
  @property
  def splits(self) -> data_lib.Splits:
    """The config's data splits (loaded once)."""
    if self._splits is None:
      self._splits = train_lib.load_splits(self.config.train)
    return self._splits

  @property
  def model(self) -> ModelDef:
    """The config's model, its input shape taken from the data (built once)."""
    if self._model is None:
      self._model = train_lib.build_model(self.config.train, self.splits)
    return self._model

  def specs(self) -> list[Any]:
    """The model's layer specs in policy order."""
    return trace_specs(self.model)

  def stage_dir(self, stage: str) -> Path:
    """The folder of ``stage`` (fine-tuning: ``finetune/chosen``)."""
    if stage == _FINETUNE:
      return train_lib.stage_dir(self.workdir, _FINETUNE, FINETUNE_NAME)
    return self.workdir / stage

  def variables(self, stage: str, needed_by: str) -> Any:
    """The final variables of the finished training ``stage`` (for stage ``needed_by``)."""
    d = self.stage_dir(stage)
    if not train_lib.is_done(d):
      raise PipelineError(f"stage {needed_by} needs the finished {stage} stage in {d}")
    try:
      return train_lib.load_variables(d, self.model)
    except VariablesError as e:
      raise PipelineError(
        f"stage {needed_by} needs the variables of the finished {stage} stage, but {e}; "
        f"delete {d} to run the {stage} stage again"
      ) from None

  def chosen_policy(self) -> np.ndarray:
    """The policy the search stage chose (or was given), ``[L, 2]`` int32."""
    d = self.stage_dir("search")
    if not train_lib.is_done(d):
      raise PipelineError(f"no chosen policy: run the search stage first ({d})")
    return np.asarray(_read(d)["chosen_policy"], np.int32)

  def check_config(self) -> None:
    """Writes ``config.json`` on the first run; refuses to continue a run with another config.

    A field that ``config.json`` lacks and that this run leaves at its default (a field added
    by a later cimjax, e.g. ``search.choose_margin``) is not a difference: the run continues,
    says so in one log line, and ``config.json`` stays as the run began (see
    :func:`config_difference`).
    """
    path = self.workdir / "config.json"
    cur = _json(self.config)
    if not multihost.leader_flag(path.is_file()):  # all processes take the same branch
      if multihost.is_leader():
        io.write_json(path, cur)
      multihost.barrier("cimjax config written")
      return
    diff, added = config_difference(json.loads(path.read_text()), cur)
    if diff:
      raise PipelineError(
        f"{self.workdir} holds a run with another config (fields "
        f"{', '.join(diff[:5])}); use a new --workdir"
      )
    if added:
      self.log(
        f"{path} predates the fields {', '.join(added)}: the stages still to run use their defaults"
      )

  def describe(self) -> str:
    """One line naming the model, the data, the target, the workdir and the devices."""
    t = self.config.train
    return (
      f"cimjax run: {t.model} on {t.data.get('source') or t.data.name}, target {self.hw.name}, "
      f"workdir {self.workdir}, devices {device_summary()}"
    )

  # -- running -------------------------------------------------------------------------------
  def validate(self, stages: Sequence[str] = STAGES) -> tuple[str, ...]:
    """The checks of :func:`validate_run` that depend on the stages (the others ran when the
    pipeline was made); returns ``stages`` in run order. Writes nothing."""
    return _check_stages(self._checked, stages, self.workdir)

  def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any] | None:
    """Runs ``stages`` in run order (finished ones are skipped); returns the report if written.

    Everything is checked (:meth:`validate`) and the data loaded before the workdir is created
    and locked (process 0; :func:`cimjax.lock.workdir_lock`).

    Raises:
      CimjaxError: bad input (nothing written), a busy workdir
        (:class:`cimjax.errors.WorkdirBusyError`), a workdir of another config, a stage that
        cannot run.
      OSError: the workdir cannot be created or written (a full disk).
    """
    stages = self.validate(stages)
    self.splits  # noqa: B018 (loaded before anything is written: a bad split size fails here)
    if "search" in stages and not self.config.from_policy:
      from cimjax.data import check_search_images  # pylint: disable=g-import-not-at-top

      check_search_images(self.splits, int(self.config.search.search_images))
    with lock_lib.workdir_lock(self.workdir, enabled=jax.process_index() == 0):
      self.workdir.mkdir(parents=True, exist_ok=True)
      self.check_config()
      report = None
      for stage in STAGE_TABLE:
        if stage.name in stages:
          out = self.run_stage(stage)
          if stage.name == "report":
            report = out
    return report

  def run_stage(self, stage: Stage) -> dict[str, Any] | None:
    """Runs one stage unless it is finished; returns its result (None when skipped)."""
    d = self.stage_dir(stage.name)
    leader = multihost.is_leader()
    if leader:
      train_runner.discard_unreadable_result(d)  # a corrupt result.json: the stage runs again
    # Multi-process: process 0's reading of the disk decides for all (they must agree).
    if multihost.leader_flag(train_lib.is_done(d) if leader else False):
      self.log(f"[{stage.name}] already finished in {d}")
      return None
    self.log(f"[{stage.name}] running")
    t0 = time.time()
    out = None
    if stage.collective or leader:
      out = stage.run(self)
    dt = time.time() - t0
    if stage.writes_result and leader:
      out["stage_time_s"] = round(dt, 2)
      io.write_json(d / "result.json", out)  # written last: marks the stage finished
    multihost.barrier(f"cimjax stage {stage.name} done")  # its files are there for every process
    self.log(f"[{stage.name}] done in {dt:.1f} s")
    return out


def run_summary(p: Pipeline) -> report_lib.RunSummary:
  """The figures of the run in ``p`` that its report needs (a :class:`cimjax.report.RunSummary`)."""
  from cimjax import report as report_lib  # pylint: disable=g-import-not-at-top

  t = p.config.train
  results = {s: _read(p.stage_dir(s)) for s in STAGES if s != "report"}
  policy = np.asarray(
    results["evaluate"].get("policy") or results["search"]["chosen_policy"], np.int32
  )
  specs = p.specs()
  splits = p.splits
  return report_lib.RunSummary(
    model=t.model,
    dataset=splits.name,
    hw=p.hw.name,
    hw_description=p.hw.description,
    latency_mode=p.hw.latency_mode,
    train_images=len(splits.train),
    val_images=len(splits.val),
    test_images=len(splits.test),
    train_subset=bool(t.data.train_size and t.data.train_size > 0),
    epochs={s: float(t[s].epochs) for s in train_lib.STAGES},
    allowed_drop=float(p.config.search.acc_drop),
    results=results,
    policy=policy.tolist(),
    cost_int8=cost_lib.layer_report(specs, p.hw, policy_lib.uniform_policy(len(specs), 8, 8)),
    cost_mixed=cost_lib.layer_report(specs, p.hw, policy),
    metrics={s: p.stage_dir(s) / "metrics.jsonl" for s in train_lib.STAGES},
    search_dir=p.stage_dir("search"),
    workdir=p.workdir,
    data_info=dict(splits.info),
  )


def config_difference(
  saved: dict[str, Any], current: dict[str, Any]
) -> tuple[list[str], list[str]]:
  """How a run's stored config (``config.json``) differs from the config it is resumed with.

  Args:
    saved: the stored config, as JSON.
    current: this run's config, as JSON.

  Returns:
    ``(diff, added)``, dotted field names, sorted: ``diff`` the fields whose values differ
    (or that only one side has), which refuse the resume; ``added`` the fields that only
    ``current`` has, at their value in :func:`default_config`: fields added by a later cimjax.
    The stages still to run use those defaults; the finished ones ran before the fields
    existed (e.g. a search that finished before ``search.choose_margin`` keeps its choice).
  """
  old, new = _flatten(saved), _flatten(current)
  defaults = _flatten(_json(default_config()))
  added = sorted(k for k in new.keys() - old.keys() if k in defaults and new[k] == defaults[k])
  one_side = (old.keys() ^ new.keys()) - set(added)
  changed = {k for k in old.keys() & new.keys() if old[k] != new[k]}
  return sorted(one_side | changed), added


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out: dict[str, Any] = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def device_summary() -> str:
  """One line naming the backend and devices."""
  devs = jax.devices()
  return f"{jax.default_backend()} x{len(devs)} ({devs[0].device_kind})"
