"""Faults and bad input: every user error is one line and exit status 2, with nothing written.

* a table of malformed command lines of every console script (``cimjax``, ``launch.search``,
  ``launch.train``, ``launch.compile``, ``launch.cost``), run in-process: status 2, exactly one
  line on stderr naming the field, and the workdir not created;
* a corrupted file of each artefact type: training and search checkpoints (the newest intact
  one is resumed, or the stage restarts; the figures equal an uninterrupted run's), a finished
  stage's variables, a policy, a program, a ``result.json`` (its stage runs again);
* OS errors (a workdir that cannot be created, a full disk) and bugs (a traceback between two
  lines saying so); the abandoned reads of a failed orbax restore print nothing;
* a busy workdir is refused naming its holder;
* (slow) kill -9 of a run at two points and a corrupted newest checkpoint: the rerun gives the
  figures of an uninterrupted run; two concurrent runs in real processes.
"""

import errno
import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cimjax import checkpoint, lock
from cimjax import cli as cli_lib
from cimjax import policy as policy_lib
from cimjax import train as train_lib
from cimjax.cli import compile as compile_cli
from cimjax.cli import cost as cost_cli
from cimjax.cli import run as run_cli
from cimjax.cli import search as search_cli
from cimjax.cli import train as train_cli
from cimjax.errors import CimjaxError, CorruptCheckpointError, PipelineError

REPO = Path(__file__).resolve().parents[1]
RUN_TINY = str(REPO / "train" / "run_tiny.py")
TINY = str(REPO / "train" / "tiny.py")
NARROW = '{"channels": [4, 8, 8], "hidden": 16}'


def _load_config(path):
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _flip(files):
  """Flips every 7th byte of each file (a bad disk)."""
  assert files
  for f in files:
    b = bytearray(Path(f).read_bytes())
    for i in range(0, len(b), 7):
      b[i] ^= 0xFF
    Path(f).write_bytes(bytes(b))


def _data_files(directory):
  """The array data files of an orbax checkpoint (or variables) directory."""
  files = glob.glob(f"{directory}/**/d/*", recursive=True)
  return [f for f in files if os.path.isfile(f)]


def _error_lines(err):
  """stderr without absl's non-error lines (INFO and WARNING)."""
  lines = [l for l in err.splitlines() if l.strip()]
  return [l for l in lines if not l.startswith(("I", "W", "INFO:", "WARNING:")) or ":" not in l]


# ----------------------------------------------------------------------------------------------
# Malformed inputs: one line, status 2, nothing written


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  np.save(d / "p3.npy", np.full((3, 2), 8))
  (d / "garbage.npy").write_bytes(b"\x93NUMPY garbage, not an array")
  (d / "noget.py").write_text("x = 1\n")
  (d / "syntax.py").write_text("def get_config(:\n")
  (d / "file").write_text("a regular file\n")
  (d / "kwargs.py").write_text(
    f"import runpy\n\n\ndef get_config():\n  c = runpy.run_path({RUN_TINY!r})['get_config']()\n"
    "  c.train.model_kwargs.depth = 3\n  return c\n"
  )
  return d


def _invoke(tool, args, capsys):
  """Runs a console script's ``main`` in-process; returns ``(status, stderr)``."""
  capsys.readouterr()
  if tool == "cimjax":
    rc = run_cli.main(["cimjax", *args])
  elif tool == "search":
    rc = search_cli.main(["launch.search", *args])
  elif tool == "train":
    rc = train_cli.main(["launch.train", *args])
  else:
    mod, prog = (compile_cli, "cimjax-compile") if tool == "compile" else (cost_cli, "cimjax-cost")
    mod.FLAGS.unparse_flags()
    try:
      rest = cli_lib.flags_parser(mod.FLAGS, prog)([prog, *args])
      rc = mod.main(rest)
    except SystemExit as e:
      rc = e.code
    finally:
      mod.FLAGS.unparse_flags()
  return rc, capsys.readouterr().err


PROGS = {
  "cimjax": "cimjax",
  "search": "launch.search",
  "train": "launch.train",
  "compile": "cimjax-compile",
  "cost": "cimjax-cost",
}
BASE = {
  "cimjax": [f"--config={RUN_TINY}", "--workdir=WD"],
  "search": ["--workdir=WD", "--accuracy=synthetic", "--noprogress", "--noplots"],
  "train": [f"--config={TINY}", "--workdir=WD"],
  "compile": ["--workdir=WD", "--dataset=none", "--num_verify=1", f"--model_kwargs={NARROW}"],
  "cost": [],
}
# (tool, arguments, what the one error line must contain); BAD/ is the folder of bad files.
CASES = [
  ("cimjax", ["--config.search.agent=xx"], "config.search.agent = 'xx'; allowed: pg, ddpg"),
  ("cimjax", ["--config.search.budget=0"], "config.search.budget = 0; allowed: an integer >= 1"),
  ("cimjax", ["--config.search.acc_drop=-1"], "config.search.acc_drop = -1.0; allowed"),
  ("cimjax", ["--config.search.mode=fast"], "config.search.mode = 'fast'; allowed: auto"),
  ("cimjax", ["--config.search.population=1"], "config.search.population = 1; allowed"),
  ("cimjax", ["--config.search.final_top_k=0"], "config.search.final_top_k = 0"),
  ("cimjax", ["--config.search.choose_margin=-1"], "config.search.choose_margin = -1.0"),
  ("cimjax", ["--config.search.constraint=all"], "config.search.constraint = 'all'"),
  ("cimjax", ["--config.compile.input_scheme=zz"], "config.compile.input_scheme = 'zz'"),
  ("cimjax", ["--config.compile.num_verify=0"], "config.compile.num_verify = 0"),
  ("cimjax", ["--config.train.model=resnet99"], "config.train.model = 'resnet99'; allowed:"),
  ("cimjax", ["--config.train.data.name=mnist"], "config.train.data.name = 'mnist'"),
  ("cimjax", ["--config.train.fp32.lr=-1"], "config.train.fp32.lr = -1.0; allowed: a number > 0"),
  ("cimjax", ["--config.train.fp32.optimizer=adam"], "config.train.fp32.optimizer = 'adam'"),
  ("cimjax", ["--config.train.batch_size=0"], "config.train.batch_size = 0"),
  ("cimjax", ["--config.train.bits.min_bits=9"], "config.train.bits = (9, 8)"),
  ("cimjax", ["--config.train.finetune.source=zz"], "config.train.finetune.source = 'zz'"),
  (
    "cimjax",
    ["--config=BAD/kwargs.py"],
    "config.train.model_kwargs = {'channels': [8, 16, 16], 'depth': 3",
  ),
  ("cimjax", ["--config.train.data.val_size=100000"], "val_size=100000"),
  (
    "cimjax",
    ["--config.train.data.name=fashion_mnist", "--config.train.data.data_dir=/no/such/dir"],
    "/no/such/dir/train-images-idx3-ubyte.gz not found",
  ),
  ("cimjax", ["--hw=no_such_target"], "config.hw = 'no_such_target': unknown hardware target"),
  ("cimjax", ["--from_policy=/no/such/p.npy"], "config.from_policy = '/no/such/p.npy'"),
  ("cimjax", ["--from_policy=BAD/p3.npy"], "policy has 3 layers; the model has 5"),
  ("cimjax", ["--from_policy=BAD/garbage.npy"], "config.from_policy"),
  ("cimjax", ["--budget=0"], "--budget=0: allowed values are integers >= 1"),
  ("cimjax", ["--stages=fp32,nope"], "--stages has ['nope']"),
  ("cimjax", ["--stages=int8"], "stage int8 needs the finished fp32 stage"),
  ("cimjax", ["--stages=compile"], "stage compile needs the finished search stage"),
  ("cimjax", ["--workdir=/proc/nope/wd"], "/proc/nope: No such file or directory"),
  ("cimjax", ["--workdir=BAD/file/wd"], "file/wd: Not a directory"),
  ("cimjax", ["--config=/no/such/config.py"], "--config: config file not found"),
  ("cimjax", ["--config=BAD/noget.py"], "get_config"),
  ("cimjax", ["--config=BAD/syntax.py"], "cannot load config file"),
  ("cimjax", ["--config.nope=1"], "--config.nope: unknown config field 'nope'"),
  ("cimjax", ["--config.search.budget=ten"], "--config.search.budget"),
  ("cimjax", ["extra"], "unexpected arguments: extra"),
  ("search", ["--agent=xx"], "--agent=xx: allowed values are pg, ddpg, random, exhaustive"),
  ("search", ["--model=resnet99"], "--model=resnet99: allowed values are"),
  ("search", ["--hw=no_such_target"], "--hw: unknown hardware target"),
  ("search", ["--budget=-1"], "--budget=-1"),
  ("search", ["--config=BAD/noget.py"], "get_config"),
  ("search", ["--accuracy=data", "--checkpoint=/no/such/dir"], "--checkpoint=/no/such/dir"),
  ("search", ["--workdir=/proc/nope/wd"], "/proc/nope: No such file or directory"),
  ("train", ["--stage=fp32", "--config.fp32.lr=0"], "config.fp32.lr = 0.0"),
  ("train", ["--stage=fp32", "--config.nope=1"], "unknown config field 'nope'"),
  ("train", ["--stage=int8"], "stage int8 needs the finished fp32 stage"),
  ("train", ["--stage=finetune", "--policy=BAD/p3.npy"], "policy has 3 layers; the model has 5"),
  ("train", ["--stage=finetune", "--policy=BAD/garbage.npy"], "--policy:"),
  ("train", ["--stage=fp32", "--workdir=/proc/nope/wd"], "/proc/nope: No such file or directory"),
  ("train", ["--stage=fp32", "--config=/no/such/config.py"], "config file not found"),
  (
    "train",
    ["--stage=fp32", "--config.data.name=fashion_mnist", "--config.data.data_dir=/no/such/dir"],
    "/no/such/dir/train-images-idx3-ubyte.gz not found",
  ),
  ("compile", ["--model=resnet99"], "--model: unknown model 'resnet99'"),
  ("compile", ["--hw=no_such_target"], "--hw: unknown hardware target"),
  ("compile", ["--policy=BAD/p3.npy"], "policy has 3 layers; the model has 5"),
  ("compile", ["--checkpoint=/no/such/dir"], "--checkpoint: directory not found"),
  ("compile", ["--adc_bits=0"], "--adc_bits='0'"),
  ("compile", ["--workdir=/proc/nope/wd"], "/proc/nope: No such file or directory"),
  ("compile", ["--seed=abc"], "seed"),
  ("cost", ["--model=xx"], "--model: unknown model 'xx'"),
  ("cost", ["--hw=no_such_target"], "--hw: unknown hardware target"),
  ("cost", ["--policy=BAD/garbage.npy"], "--policy:"),
  ("cost", ["--uniform=9,8"], "--uniform: layer 0"),
  ("cost", ["--no_such_flag=1"], "no_such_flag"),
]


@pytest.mark.parametrize(
  "tool, args, needle", CASES, ids=[f"{t}:{' '.join(a)[:40]}" for t, a, _ in CASES]
)
def test_malformed_input_is_one_line_and_status_2(tool, args, needle, bad_files, tmp_path, capsys):
  wd = tmp_path / "wd"
  sub = {"WD": str(wd), "BAD": str(bad_files)}

  def fill(a):
    for k, v in sub.items():
      a = a.replace(k, v)
    return a

  own = {a.split("=", 1)[0] for a in args}
  argv = [fill(a) for a in BASE[tool] if a.split("=", 1)[0] not in own] + [fill(a) for a in args]
  rc, err = _invoke(tool, argv, capsys)
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 2, err
  assert len(lines) == 1, err
  assert lines[0].startswith(f"{PROGS[tool]}: error: "), lines[0]
  assert fill(needle) in lines[0], lines[0]
  assert not wd.exists(), "the workdir was created"


def test_the_table_covers_every_console_script_with_enough_cases():
  assert {t for t, _, _ in CASES} == set(PROGS) and len(CASES) >= 25


# ----------------------------------------------------------------------------------------------
# The error policy of every console script: OS errors, bugs, a full disk, a busy workdir


def test_a_bug_is_a_traceback_between_two_lines_saying_so(capsys):
  def body():
    raise ZeroDivisionError("division by zero")

  assert cli_lib.run_main("cimjax", body) == cli_lib.EXIT_BUG
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[0].startswith("cimjax: internal error (a bug") and "Traceback" in lines[1]
  assert "ZeroDivisionError" in lines[-2] and lines[-1].startswith("cimjax: internal error")


def test_os_errors_are_one_line_naming_the_path(capsys):
  def body():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/config.json")

  assert cli_lib.run_main("launch.train", body) == 2
  assert capsys.readouterr().err == "launch.train: error: /x/config.json: No space left on device\n"


def test_a_full_disk_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
  """ENOSPC from the first write of a run (its config.json): one line, status 2, lock freed."""
  from cimjax import io

  def full(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(io, "write_bytes", full)
  wd = tmp_path / "wd"
  rc, err = _invoke("cimjax", [f"--config={RUN_TINY}", f"--workdir={wd}"], capsys)
  assert rc == 2
  assert _error_lines(err) == [f"cimjax: error: {wd / 'config.json'}: No space left on device"]
  assert not (wd / lock.LOCK_NAME).exists()


def test_a_full_disk_under_orbax_is_an_os_error(tmp_path, monkeypatch):
  c = checkpoint.Checkpointer(tmp_path / "c")

  def full(*a, **k):
    raise ValueError("INTERNAL: Error writing local file: No space left on device [ENOSPC]")

  monkeypatch.setattr(c._manager, "save", full)
  with pytest.raises(OSError) as e:
    c.save(1, {"w": np.zeros(3)})
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(c.directory)
  c.close()


@pytest.fixture
def live_holder():
  """A live process of ours (its pid holds a lock) for the duration of a test."""
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield proc.pid
  proc.kill()
  proc.wait()


@pytest.mark.parametrize("tool", ["cimjax", "search", "train"])
def test_a_busy_workdir_is_refused_naming_its_holder(tool, tmp_path, capsys, live_holder):
  wd = tmp_path / "wd"
  wd.mkdir()
  holder = {"pid": live_holder, "host": os.uname().nodename, "start": "earlier", "argv": []}
  (wd / lock.LOCK_NAME).write_text(json.dumps(holder))
  args = {
    "cimjax": [f"--config={RUN_TINY}", f"--workdir={wd}"],
    "search": [f"--workdir={wd}", "--accuracy=synthetic", "--budget=8", "--noprogress"],
    "train": [f"--config={TINY}", f"--workdir={wd}", "--stage=fp32"],
  }[tool]
  rc, err = _invoke(tool, args, capsys)
  assert rc == 2
  (line,) = _error_lines(err)
  assert f"in use by process {live_holder} on host" in line and "started earlier" in line
  assert sorted(p.name for p in wd.iterdir()) == [lock.LOCK_NAME]  # nothing else written


# ----------------------------------------------------------------------------------------------
# Corrupt artefacts


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
  """A finished tiny fp32 stage with checkpoints at steps 5, 10, 15 and 20 (config, workdir)."""
  config = _load_config(TINY).train
  config.fp32.steps = 20
  config.checkpoint_every = 5
  config.max_to_keep = 4
  wd = tmp_path_factory.mktemp("fp32")
  result = train_lib.run_stage(config, "fp32", wd)
  return config, wd, result


def _variables(wd, config):
  model = train_lib.build_model(config, train_lib.load_splits(config))
  return train_lib.load_variables(wd / "fp32", model)


def _interrupted_copy(src, dst, keep):
  """``src`` as a run killed after checkpoint ``keep``: no variables, no result."""
  shutil.copytree(src, dst)
  sdir = dst / "fp32"
  shutil.rmtree(sdir / "variables")
  (sdir / "result.json").unlink()
  for step in (sdir / "checkpoints").iterdir():
    if step.name.isdigit() and int(step.name) > keep:
      shutil.rmtree(step)
  return sdir


def test_corrupt_newest_training_checkpoint_resumes_from_the_intact_one(fp32_run, tmp_path, caplog):
  config, wd, clean = fp32_run
  caplog.set_level(logging.INFO, logger="absl")
  sdir = _interrupted_copy(wd, tmp_path / "wd", keep=15)
  _flip(_data_files(sdir / "checkpoints" / "15"))
  resumed = train_lib.run_stage(config, "fp32", tmp_path / "wd")
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("checkpoint 15 is corrupt" in w for w in warnings), warnings
  assert any("resuming from step 10" in r.getMessage() for r in caplog.records)
  assert resumed["eval"] == clean["eval"]
  jax.tree.map(
    np.testing.assert_array_equal, _variables(tmp_path / "wd", config), _variables(wd, config)
  )


def test_no_intact_training_checkpoint_restarts_the_stage(fp32_run, tmp_path, caplog):
  config, wd, clean = fp32_run
  sdir = _interrupted_copy(wd, tmp_path / "wd", keep=10)
  for step in ("5", "10"):
    _flip(_data_files(sdir / "checkpoints" / step))
  resumed = train_lib.run_stage(config, "fp32", tmp_path / "wd")
  msgs = [r.getMessage() for r in caplog.records]
  assert any("no intact checkpoint" in m and "restarts from its beginning" in m for m in msgs)
  assert resumed["eval"] == clean["eval"]


def test_corrupt_result_json_makes_the_stage_run_again(fp32_run, tmp_path, capsys, caplog):
  """A finished stage whose result.json does not read back counts as unfinished: it runs again
  (from its final checkpoint, so at once) and gives the same figures."""
  config, wd, clean = fp32_run
  shutil.copytree(wd, tmp_path / "wd")
  result = tmp_path / "wd" / "fp32" / "result.json"
  result.write_bytes(result.read_bytes()[:40])
  again = train_lib.run_stage(config, "fp32", tmp_path / "wd")
  assert again["eval"] == clean["eval"] and again["steps"] == clean["steps"]
  assert (result.parent / "result.json.corrupt").is_file()
  assert any("does not read back" in r.getMessage() for r in caplog.records)


def test_corrupt_variables_of_a_finished_stage_are_one_line(fp32_run, tmp_path, capsys):
  """The int8 stage starts from the finished fp32 stage's variables/: corrupt, one line."""
  _, wd, _ = fp32_run
  shutil.copytree(wd, tmp_path / "wd")
  _flip(_data_files(tmp_path / "wd" / "fp32" / "variables"))
  rc, err = _invoke(
    "train", [f"--config={TINY}", f"--workdir={tmp_path / 'wd'}", "--stage=int8"], capsys
  )
  assert rc == 2
  (line,) = _error_lines(err)
  assert line.startswith("launch.train: error: stage int8 starts from the finished fp32 stage")
  assert "cannot read the saved variables" in line and "to run the fp32 stage again" in line
  # The compiler reads a stage's variables the same way: one line.
  rc, err = _invoke(
    "compile",
    [
      f"--workdir={tmp_path / 'c'}",
      "--model_kwargs={" + '"channels": [8, 16, 16], "hidden": 32}',
      f"--checkpoint={tmp_path / 'wd' / 'fp32'}",
      "--dataset=none",
      "--num_verify=1",
    ],
    capsys,
  )
  assert rc == 2 and _error_lines(err)[0].startswith("cimjax-compile: error: --checkpoint:")


def test_corrupt_variables_in_the_pipeline_name_the_stage(fp32_run, tmp_path):
  _, wd, _ = fp32_run
  shutil.copytree(wd / "fp32", tmp_path / "wd" / "fp32")
  _flip(_data_files(tmp_path / "wd" / "fp32" / "variables"))
  from cimjax import pipeline

  p = pipeline.Pipeline(_load_config(RUN_TINY), tmp_path / "wd", log=lambda s: None)
  with pytest.raises(
    PipelineError, match="stage evaluate needs the variables of the finished fp32"
  ):
    p.variables("fp32", "evaluate")


def test_corrupt_search_checkpoint_resumes_from_the_intact_one(small_cnn_rram_64_c2, tmp_path):
  from cimjax.search import accuracy as acc_lib
  from cimjax.search import runner

  m, specs, hw, tables = small_cnn_rram_64_c2
  src = acc_lib.SyntheticAccuracy(specs, seed=5, drop44=3.0)
  cfg = runner.SearchConfig(
    agent="random", budget=96, constraint="none", seed=3, mode="loop", population=16,
    checkpoint_every=1,
  )  # fmt: skip
  kw = dict(hw=hw, plots=False)
  full = runner.run_search(m, specs, tables, src, cfg, workdir=tmp_path / "full", **kw)
  for name, corrupt in (("one", ("4",)), ("all", ("3", "4"))):
    wd = tmp_path / name
    part = runner.run_search(m, specs, tables, src, cfg, workdir=wd, stop_after=4, **kw)
    assert part.iterations == 4
    for step in corrupt:
      _flip(_data_files(wd / "checkpoints" / step))
    resumed = runner.run_search(m, specs, tables, src, cfg, workdir=wd, **kw)
    assert resumed.iterations == full.iterations, name
    np.testing.assert_array_equal(resumed.history.policies, full.history.policies)
    np.testing.assert_array_equal(resumed.best_policy, full.best_policy)


def test_corrupt_program_is_one_line(tmp_path, capsys):
  from cimjax import compile as cc
  from cimjax import hw as hw_lib
  from cimjax import models

  model = models.get_model("small_cnn", **json.loads(NARROW))
  program = cc.compile_model(
    model,
    cc.init_variables(model, 0),
    policy_lib.uniform_policy(5, 4, 4),
    hw_lib.load_hw("rram_64_c2"),
  )
  path = cc.save_program(program, tmp_path / "program")
  _flip([path / "arrays.npz"])
  rc, err = _invoke("compile", [f"--program={path}", "--eval_images=0", "--num_verify=1"], capsys)
  assert rc == 2
  (line,) = _error_lines(err)
  assert line.startswith("cimjax-compile: error: --program:") and "arrays.npz" in line


def test_corrupt_checkpoint_is_reported_in_one_warning_naming_step_and_file(tmp_path, caplog):
  c = checkpoint.Checkpointer(tmp_path / "c")
  c.save(1, {"w": np.arange(100.0)})
  c.save(2, {"w": np.arange(100.0) + 1})
  _flip(_data_files(tmp_path / "c" / "2"))
  with pytest.raises(CorruptCheckpointError):
    c.restore({"w": np.zeros(100)}, 2)
  assert c.restore_intact({"w": np.zeros(100)})[0] == 1
  (w,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert "checkpoint 2 is corrupt" in w and str(tmp_path / "c" / "2") in w
  c.close()


_ABANDONED = r"""
import glob, sys
import numpy as np
from cimjax import checkpoint
if sys.argv[2] == "unquiet":  # what one sees without cimjax's filters
  sys.unraisablehook = sys.__unraisablehook__
d = sys.argv[1]
c = checkpoint.Checkpointer(d, max_to_keep=3)
state = {f"w{i}": np.arange(20000.0, dtype=np.float32) + i for i in range(32)}
c.save(1, state)
c.save(2, state)
for f in glob.glob(f"{d}/2/**/d/*", recursive=True):
  open(f, "r+b").truncate(10)
small = {f"w{i}": np.zeros(10, np.float32) for i in range(32)}
for _ in range(5):  # each failed restore abandons its other reads
  for target, step in ((small, 1), (state, 2)):
    try:
      c.restore(target, step)
    except checkpoint.CheckpointError:
      pass
assert c.restore_intact(state)[0] == 1
c.close()
print("done")
"""


def test_a_failed_restore_leaves_nothing_printed_behind(tmp_path):
  """Failed restores (a shape that does not fit, a file cut short) abandon orbax's other reads;
  what those print when they finish is dropped: stderr holds the warnings of the skipped
  checkpoint and nothing else."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  p = subprocess.run(
    [sys.executable, "-c", _ABANDONED, str(tmp_path / "c"), "quiet"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 0 and p.stdout.strip() == "done", p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert lines and all("checkpoint 2 is corrupt" in l for l in lines), p.stderr[-3000:]


def test_errors_all_derive_from_one_base():
  from cimjax import errors

  for name in errors.__all__:
    assert issubclass(getattr(errors, name), CimjaxError), name


# ----------------------------------------------------------------------------------------------
# Slow: real processes killed, resumed and run concurrently


def _figures(report):
  r = dict(report)
  r.pop("stage_time_s")
  r.pop("total_time_s")
  r["search"] = {k: v for k, v in r["search"].items() if k != "wall_s"}
  return r


def _launch(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(
    [sys.executable, "-m", "launch.run", *args],
    cwd=REPO,
    env=env,
    start_new_session=True,
    **kw,
  )


def _wait_for(pred, proc, timeout=400):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if pred():
      return
    time.sleep(0.1)
  assert proc.poll() is None, "the run ended before the point was reached"
  assert pred(), "timed out"


@pytest.fixture(scope="module")
def reference_report(tmp_path_factory):
  wd = tmp_path_factory.mktemp("reference")
  p = _launch([f"--config={RUN_TINY}", f"--workdir={wd}"], stdout=subprocess.DEVNULL)
  assert p.wait(timeout=900) == 0
  return json.loads((wd / "report.json").read_text())


@pytest.mark.slow
def test_kill9_at_two_points_with_a_corrupt_checkpoint_resumes_to_the_same_figures(
  reference_report, tmp_path
):
  wd = tmp_path / "killed"
  args = [f"--config={RUN_TINY}", f"--workdir={wd}", "--config.train.throttle_s=0.05"]
  quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # 1: during fp32, after its second checkpoint; its newest checkpoint then gets corrupted.
  ck = wd / "fp32" / "checkpoints"
  proc = _launch(args, **quiet)
  _wait_for(lambda: ck.is_dir() and len([p for p in ck.iterdir() if p.name.isdigit()]) >= 2, proc)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  newest = max((p for p in ck.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  _flip(_data_files(newest))
  # 2: during the search stage (after the training stages, fp32 resumed from the intact one).
  with open(tmp_path / "stderr2", "w") as err2:
    proc = _launch(args, stdout=subprocess.DEVNULL, stderr=err2)
    _wait_for(lambda: (wd / "search").is_dir(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not (wd / "search" / "result.json").exists()
  assert f"checkpoint {newest.name} is corrupt" in (tmp_path / "stderr2").read_text()
  p = _launch(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, err = p.communicate(timeout=900)
  assert p.returncode == 0, err[-3000:]
  assert "taking over the lock" in err  # the killed run's stale lock
  report = json.loads((wd / "report.json").read_text())
  assert _figures(report) == _figures(reference_report)
  # 3: the report's inputs corrupted: a stage's result.json (the stage runs again) and a
  # training metrics file (its unreadable lines are skipped).
  result = wd / "evaluate" / "result.json"
  result.write_bytes(result.read_bytes()[:50])
  _flip([wd / "fp32" / "metrics.jsonl"])
  p = _launch(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = p.communicate(timeout=900)
  assert p.returncode == 0, err[-3000:]
  assert "[evaluate] running" in out and "does not read back" in err
  report = json.loads((wd / "report.json").read_text())
  assert _figures(report) == _figures(reference_report)


@pytest.mark.slow
def test_two_concurrent_runs_the_second_is_refused(tmp_path):
  wd = tmp_path / "wd"
  args = [f"--config={RUN_TINY}", f"--workdir={wd}", "--config.train.throttle_s=0.05"]
  first = _launch(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: (wd / lock.LOCK_NAME).is_file(), first)
    second = _launch(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("cimjax: error: workdir"), err
    assert f"in use by process {first.pid} on host" in lines[0]
    assert first.poll() is None  # the holder runs on
  finally:
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["int8", "anyprec", "finetune", "compile"])
def test_kill9_inside_each_later_stage_resumes_to_the_same_figures(
  reference_report, tmp_path, stage
):
  wd = tmp_path / "killed"
  args = [f"--config={RUN_TINY}", f"--workdir={wd}", "--config.train.throttle_s=0.05"]
  proc = _launch(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(lambda: (wd / stage).is_dir(), proc)
  if stage != "compile":  # training steps are throttled; the tiny compile takes about a second
    time.sleep(0.5)  # into the stage's work, not at its first line
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (wd / "report.json").exists()
  p = _launch(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, err = p.communicate(timeout=900)
  assert p.returncode == 0, err[-3000:]
  report = json.loads((wd / "report.json").read_text())
  assert _figures(report) == _figures(reference_report)
