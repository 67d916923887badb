"""Search per-layer bit-widths of a trained any-precision model (or a synthetic task).

Usage (from the repository root)::

  # real accuracy: the any-precision model trained by launch.train (its WORKDIR/anyprec)
  python -m launch.search --config=train/small_cnn_fashion.py --workdir=/tmp/s \
      --checkpoint=/tmp/cnn_fashion/anyprec --hw=rram_256_c4 --agent=pg --acc_drop=0.5 \
      --constraint=both --budget=600

  # synthetic accuracy model (no trained model needed), any zoo model
  python -m launch.search --workdir=/tmp/s --accuracy=synthetic --model=vit_b32 \
      --hw=rram_256_c4 --agent=pg --budget=3000

This is the run's search stage (:func:`cimjax.stages.run_search_stage`) on its own. ``--config``
is a run config (``train/*.py``, :mod:`cimjax.configs`); its ``train`` part names the model and
the data splits (``--config.<field>`` overrides a field of that part); the search settings come
from the flags. The search runs on the search-validation split ``val``; the best candidates are
re-evaluated on ``test`` (reported only: the choice stays the search's winner), or
``--final_split=none``. Without ``--config`` the embedded run config is used (small CNN,
Fashion-MNIST). The search state is checkpointed in ``WORKDIR/checkpoints`` and an interrupted
run resumes from it. Outputs in ``WORKDIR``: ``best_policy.npy`` (CIM-AQ format),
``chosen_policy.npy`` (the same policy, as the run's search stage writes it), ``report.json``
(accuracy, latency, energy, speedup over 8/8, evaluations used, wall time), ``pareto.json``,
``history.npz`` and the plots ``pareto.png``, ``bits.png``, ``latency.png``. The report is also
printed as one JSON object.

Several processes (``--num_processes``/``--process_id``/``--coordinator_address``, or
``--distributed`` on a TPU pod or SLURM cluster) run the same search and split every batch's
accuracy evaluations between them (``docs/multihost.md``); ``--workdir`` must be shared.

The flags and the config are checked before anything is loaded or written; the workdir is then
locked by process 0 (:mod:`cimjax.lock`: a workdir another live run holds is refused). A corrupt
newest search checkpoint is skipped for the newest intact one (one warning line).

Exit status 0 on success; 2 with one line on stderr naming the flag for a usage error (any
:class:`cimjax.errors.CimjaxError`, a busy workdir included) or an ``OSError`` (``PATH:
REASON``); 1 for an internal error (a bug: its traceback between two lines saying so).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from cimjax import cli as cli_lib
from cimjax import configs
from cimjax import progress as progress_lib
from cimjax.cli import distributed as distributed_lib
from cimjax.errors import CimjaxError, UnknownModelError, UsageError

PROG = "launch.search"
AGENTS = ("pg", "ddpg", "random", "exhaustive")
CONSTRAINTS = ("both", "weight", "io", "none")
ACCURACY = ("data", "synthetic")
MODES = ("auto", "loop", "scan")
FINAL_SPLITS = ("test", "none")
SYNTHETIC_KINDS = ("additive", "saturating", "interaction")
_CONFIG_HELP = (
  "Run config file (train/*.py with get_config()): the model and data of its train part; "
  "override a field of that part with --config.<field>=<value>."
)

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
configs.define_config_flag(FLAGS, _CONFIG_HELP)
flags.DEFINE_string("workdir", None, "Output and checkpoint directory.", flag_values=FLAGS)
flags.DEFINE_string(
  "hw", "rram_256_c4", "Hardware target: a name from hw/ or a .toml path.", flag_values=FLAGS
)
flags.DEFINE_enum("agent", "pg", AGENTS, "Search agent.", flag_values=FLAGS)
flags.DEFINE_float(
  "acc_drop",
  0.5,
  "Allowed accuracy drop from INT8 in percentage points.",
  lower_bound=0.0,
  flag_values=FLAGS,
)
flags.DEFINE_enum("constraint", "both", CONSTRAINTS, "Constraint variant.", flag_values=FLAGS)
flags.DEFINE_integer(
  "budget",
  600,
  "Unique accuracy evaluations (exhaustive: 0 = the whole space).",
  lower_bound=0,
  flag_values=FLAGS,
)
flags.DEFINE_enum("accuracy", "data", ACCURACY, "Accuracy source.", flag_values=FLAGS)
flags.DEFINE_string(
  "checkpoint",
  None,
  "Directory of the any-precision model (launch.train's WORKDIR/anyprec or its variables/); "
  "required with --accuracy=data.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "model",
  None,
  "Model reference (overrides the config's model; e.g. for synthetic runs): a zoo or registered "
  "name, package.module:factory, path/file.py:factory or a .onnx file.",
  flag_values=FLAGS,
)
flags.DEFINE_integer("seed", 0, "Search seed.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_enum("mode", "auto", MODES, "Search loop.", flag_values=FLAGS)
flags.DEFINE_integer(
  "population",
  0,
  "Candidates per iteration (0: the agent's default).",
  lower_bound=0,
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "min_bits", 2, "Smallest bit-width.", lower_bound=1, upper_bound=8, flag_values=FLAGS
)
flags.DEFINE_integer(
  "max_bits", 8, "Largest bit-width.", lower_bound=1, upper_bound=8, flag_values=FLAGS
)
flags.DEFINE_enum(
  "final_split",
  "test",
  FINAL_SPLITS,
  "Split re-evaluating the best candidates (reported; the choice stays the search's winner).",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "final_top_k",
  5,
  "Best candidates re-evaluated on the final split.",
  lower_bound=1,
  flag_values=FLAGS,
)
flags.DEFINE_bool(
  "lazy",
  False,
  "Lazy evaluation: score candidates in chunks of images and stop those that cannot win or "
  "are below the target by an exact sequential test (docs/architecture.md).",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "lazy_chunk", 250, "Images per look of the lazy evaluation.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_float(
  "lazy_alpha",
  1e-3,
  "Error rate of the lazy evaluation's sequential test over the whole search.",
  lower_bound=0.0,
  upper_bound=1.0,
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "search_images",
  0,
  "Use only the first N images of the search split (0: all).",
  lower_bound=0,
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "synthetic_kind", "additive", SYNTHETIC_KINDS, "Synthetic model.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "synthetic_seed", 0, "Seed of the synthetic sensitivities.", lower_bound=0, flag_values=FLAGS
)
flags.DEFINE_integer(
  "checkpoint_every",
  0,
  "Iterations between search checkpoints (0: at the end).",
  lower_bound=0,
  flag_values=FLAGS,
)
distributed_lib.define_flags(FLAGS)
flags.DEFINE_bool(
  "progress",
  True,
  "Show progress: a live bar on a terminal, a plain line every 10 s or 25% otherwise.",
  flag_values=FLAGS,
)
flags.DEFINE_bool("plots", True, "Write PNG plots.", flag_values=FLAGS)


def _allowed(flag: flags.Flag) -> str:
  """What a typed flag accepts, in words."""
  p = flag.parser
  if isinstance(p, flags.EnumParser):
    return ", ".join(p.enum_values)
  lo, hi = getattr(p, "lower_bound", None), getattr(p, "upper_bound", None)
  if isinstance(p, flags.IntegerParser):
    if lo is None:
      return "an integer"
    return f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
  return f"numbers >= {lo:g}" if lo is not None else "numbers"


def _flag_message(message: str) -> str:
  """absl's ``flag --NAME=VALUE: ...`` as ``--NAME=VALUE: allowed values are ...``."""
  m = re.match(r"flag --(\w+)=(.*?): ", message)
  if not m or m.group(1) not in FLAGS or m.group(1) == "config":
    return message
  return f"--{m.group(1)}={m.group(2)}: allowed values are {_allowed(FLAGS[m.group(1)])}"


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """Parses the command line (program name first) into :data:`FLAGS` and loads the config.

  Raises:
    UsageError: unknown flag, bad flag value, config file that does not load, missing
      required flag.
  """
  argv, renamed = configs.expand_train_overrides(argv)
  configs.define_config_flag(FLAGS, _CONFIG_HELP, argv)
  try:
    return cli_lib.parse_config_args(FLAGS, argv)
  except UsageError as e:
    raise UsageError(_flag_message(configs.restore_names(str(e), renamed))) from None


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """An ``absl.app.run`` flags parser: ``--help`` lists the flags; bad input exits with 2."""
  if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
    print(f"usage: {PROG} [flags]\n\n{FLAGS.get_help()}")
    sys.exit(0)
  return cli_lib.usage_parser(parse_args, PROG)(argv)


def check_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The checks that involve more than one flag; raises :class:`UsageError` naming the flag."""
  if not fv.acc_drop >= 0:  # NaN
    raise UsageError(f"--acc_drop={fv.acc_drop}: allowed values are numbers >= 0")
  if fv.budget == 0 and fv.agent != "exhaustive":
    raise UsageError(
      "--budget=0: allowed values are integers >= 1 (0 only with --agent=exhaustive)"
    )
  if fv.population == 1 and fv.agent == "pg":
    raise UsageError("--population=1: allowed values are 0 (default) or >= 2 for --agent=pg")
  if fv.min_bits > fv.max_bits:
    raise UsageError(f"--min_bits={fv.min_bits}: allowed values are 1..--max_bits ({fv.max_bits})")
  distributed_lib.check_flags(fv)
  if fv.accuracy == "data" and not fv.checkpoint:
    raise UsageError(
      "--checkpoint is required with --accuracy=data (the any-precision model "
      "directory, e.g. WORKDIR/anyprec of launch.train); or use "
      "--accuracy=synthetic"
    )


def run_config(fv: flags.FlagValues = FLAGS) -> Any:
  """The run config of the flags: ``--config`` (default: the embedded one) with the search
  settings, the target and the model of the flags."""
  from cimjax import pipeline  # pylint: disable=g-import-not-at-top
  from cimjax.train import config as train_config  # pylint: disable=g-import-not-at-top

  config = fv.config if fv["config"].value is not None else pipeline.default_config()
  if fv.model:
    try:
      train_config.check_model(fv.model)
    except UnknownModelError as e:
      raise UsageError(f"--model={fv.model}: allowed values are {e.allowed}") from None
    except CimjaxError as e:
      raise UsageError(f"--model={fv.model}: {cli_lib.one_line(e)}") from None
    config.train.model = fv.model
  config.hw = fv.hw
  for name in ("agent", "budget", "acc_drop", "constraint", "seed", "mode", "population"):
    config.search[name] = fv[name].value
  config.search.search_images = fv.search_images
  config.search.final_top_k = fv.final_top_k
  for name in ("lazy", "lazy_chunk", "lazy_alpha"):
    config.search[name] = fv[name].value
  return config


def _load_hw(fv: flags.FlagValues) -> Any:
  from cimjax import hw as hw_lib  # pylint: disable=g-import-not-at-top

  try:
    target = hw_lib.load_hw(fv.hw)
  except hw_lib.HwError as e:
    raise UsageError(f"--hw: {cli_lib.one_line(e)}") from None
  if fv.constraint in ("weight", "both") and fv.max_bits < target.cell_bits:
    raise UsageError(
      f"--max_bits={fv.max_bits}: allowed values are >= cell_bits "
      f"({target.cell_bits}) with --constraint={fv.constraint}"
    )
  return target


def check_config(config: Any, target: Any, fv: flags.FlagValues = FLAGS) -> Any:
  """Checks the run config's parts that the search reads, before anything is loaded: its
  ``train`` part (model, data fields, the dataset's files), its ``search`` section and, with
  ``--accuracy=data``, that ``--checkpoint`` is a directory.

  Returns:
    The data splits when checking them meant loading them, else None.

  Raises:
    CimjaxError: naming the field (or flag), its value and what is allowed.
  """
  from cimjax import stages  # pylint: disable=g-import-not-at-top
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top
  from cimjax.train import config as train_config  # pylint: disable=g-import-not-at-top

  t = config.train
  if t.bits.constraint in ("weight", "both") and not t.bits.cell_bits:
    t.bits.cell_bits = target.cell_bits  # as the run fills it
  train_lib.validate_config(t)
  stages.validate_search(config)
  if fv.accuracy == "data":
    if not Path(fv.checkpoint).is_dir():
      raise UsageError(f"--checkpoint={fv.checkpoint}: directory not found")
    return train_config.check_data(t)
  return None


def _data_task(config: Any, target: Any, fv: flags.FlagValues, splits: Any = None) -> Any:
  """The search on ``val`` with the any-precision model in ``--checkpoint``."""
  from cimjax import stages  # pylint: disable=g-import-not-at-top
  from cimjax import train as train_lib  # pylint: disable=g-import-not-at-top

  t = config.train
  try:
    splits = splits if splits is not None else train_lib.load_splits(t)
    model = train_lib.build_model(t, splits)
  except (CimjaxError, ValueError) as e:
    raise UsageError(f"--config: {cli_lib.one_line(e)}") from None
  try:
    variables = train_lib.load_variables(fv.checkpoint, model)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
      f"--checkpoint={fv.checkpoint}: cannot load the model variables ({cli_lib.one_line(e)})"
    ) from None
  if len(splits.val) == 0:
    raise UsageError("--config: the search-validation split is empty (config.data.val_size)")
  return stages.data_task(
    model,
    variables,
    splits,
    target,
    search_images=fv.search_images,
    final_split=fv.final_split,
    batch_size=t.eval_batch_size,
    data_parallel=int(config.search.get("data_parallel", 1)),
  )


def _synthetic_task(config: Any, target: Any, fv: flags.FlagValues) -> Any:
  """The search on a synthetic accuracy model of the config's model."""
  from cimjax import stages  # pylint: disable=g-import-not-at-top
  from cimjax.train import config as train_config  # pylint: disable=g-import-not-at-top

  t = config.train
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in t.model_kwargs.to_dict().items()}
  try:
    model = train_config.resolve_model(t.model, **kw)
  except CimjaxError as e:
    raise UsageError(f"--model: {cli_lib.one_line(e)}") from None
  return stages.synthetic_task(model, target, kind=fv.synthetic_kind, seed=fv.synthetic_seed)


def _check_exhaustive(cfg: Any, task: Any, target: Any) -> int:
  """The search's budget; checks that an exhaustive search covers its whole space."""
  from cimjax import search  # pylint: disable=g-import-not-at-top

  space = search.make_space(
    len(task.specs), cfg.constraint, target.cell_bits, cfg.min_bits, cfg.max_bits
  )
  budget = cfg.budget or space.size
  if cfg.agent == "exhaustive" and space.size > budget:
    raise UsageError(
      f"--budget={budget}: --agent=exhaustive needs the whole space "
      f"({space.size:.4g} policies) in the budget; use --budget=0 or a smaller "
      f"space (--constraint=both)"
    )
  if cfg.agent == "exhaustive" and space.size >= 2**31:
    raise UsageError(
      f"--agent=exhaustive: the space has {space.size:.4g} policies; allowed are spaces below 2^31"
    )
  return budget


def run_from_flags(fv: flags.FlagValues = FLAGS) -> dict[str, Any]:
  """Runs the search the flags describe; returns the report dict.

  Raises:
    CimjaxError: anything the user can fix (exit status 2).
  """
  check_flags(fv)
  if distributed_lib.wanted(fv):
    distributed_lib.initialize(fv)
  import jax  # pylint: disable=g-import-not-at-top

  from cimjax import lock as lock_lib  # pylint: disable=g-import-not-at-top
  from cimjax import stages  # pylint: disable=g-import-not-at-top

  config = run_config(fv)
  target = _load_hw(fv)
  splits = check_config(config, target, fv)  # checked before anything is loaded or written
  if fv.accuracy == "data":
    task = _data_task(config, target, fv, splits)  # reads only
  else:
    task = _synthetic_task(config, target, fv)
  task = stages.multiprocess(task)
  cfg = stages.search_config(
    config, min_bits=fv.min_bits, max_bits=fv.max_bits, checkpoint_every=fv.checkpoint_every
  )
  budget = _check_exhaustive(cfg, task, target)
  first = jax.process_index() == 0
  with lock_lib.workdir_lock(fv.workdir, enabled=first):  # process 0 writes the outputs
    tb = Path(fv.workdir) / "tb" if first else None  # TensorBoard scalars (with tensorboardX)
    update = progress_lib.Progress.of(fv.progress and first).search("search", budget, tb)
    try:
      result = stages.run_search_stage(
        config,
        fv.workdir,
        task,
        hw=target,
        search=cfg,
        progress=update,
        plots=fv.plots,
      )
    except ValueError as e:
      raise UsageError(f"--workdir={fv.workdir}: {cli_lib.one_line(e)}") from None
    finally:
      update.close()
  if jax.process_index() != 0:
    return {"process": jax.process_index(), "best_reward": result["summary"]["best_reward"]}
  report = json.loads(Path(fv.workdir, "report.json").read_text())
  report.pop("layers", None)
  report["accuracy_source"] = task.accuracy.describe()
  return report


def main(argv: Sequence[str] | flags.FlagValues) -> int:
  """Entry point: ``argv`` (program name first) or flags parsed by :func:`parse_flags`.

  Returns:
    The exit status (:func:`cimjax.cli.run_main`): 0, 2 after one line on stderr, 1 on a bug.
  """

  def body() -> None:
    fv = argv if isinstance(argv, flags.FlagValues) else parse_args(argv)
    report = run_from_flags(fv)
    print(json.dumps(report, sort_keys=True, default=str))

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Console-script entry point (``cimjax-search``)."""
  cli_lib.run_console(progress_lib.quiet_main(main), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
