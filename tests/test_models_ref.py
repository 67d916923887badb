"""Models by reference: zoo and registered names, package.module:factory, file.py:factory, .onnx.

Every place that names a model (``train.model``, the CLIs' ``--model``, a compiled program's
``model``) goes through :func:`cimjax.models.resolve_model`; these tests cover the references,
their one-line errors, registration seen by the config validation, and programs that reload by
their reference.
"""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

import cimjax
from cimjax import compile as cc
from cimjax import models, trace
from cimjax import train as train_lib
from cimjax.errors import ConfigError, ModelError, ModelNotFoundError, UnknownModelError
from cimjax.variables import init_variables

USER_MODEL = textwrap.dedent(
  """
  import flax.linen as nn


  class PlainCNN(nn.Module):
    channels: tuple = (4, 8, 8)
    hidden: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
      for c in self.channels:
        x = nn.max_pool(nn.relu(nn.Conv(c, (3, 3))(x)), (2, 2), (2, 2))
      x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
      return nn.Dense(self.num_classes)(x)


  def factory(num_classes=10, channels=(4, 8, 8), hidden=16):
    return PlainCNN(tuple(channels), hidden, num_classes), (8, 8, 1)


  def as_dict():
    return {"module": PlainCNN(), "input_shape": (8, 8, 1), "rules": [{"pattern": "Dense_1",
            "skip": True}], "description": "dict form"}


  def bare():
    return PlainCNN()
  """
)


@pytest.fixture
def user_file(tmp_path):
  path = tmp_path / "user_cnn.py"
  path.write_text(USER_MODEL)
  return path


@pytest.fixture
def registered():
  """Registers ``my_cnn`` for one test (and removes it afterwards)."""

  def factory(num_classes=10):
    import flax.linen as nn

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(num_classes)(nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1))

    return Tiny(), (8, 8, 1)

  cimjax.register_model("my_cnn", factory)
  yield "my_cnn"
  models.unregister_model("my_cnn")


# ------------------------------------------------------------------------------ registration


def test_register_model_is_seen_everywhere(registered):
  assert registered in cimjax.model_names() and registered in cimjax.MODEL_NAMES
  assert registered in models.MODEL_NAMES  # computed on access, not an import-time copy
  md = cimjax.resolve_model(registered, num_classes=7)
  assert md.name == "my_cnn" and md.num_classes == 7 and md.input_shape == (8, 8, 1)
  assert [s.kind for s in trace.trace_specs(md)] == ["Conv2D", "Dense"]
  config = train_lib.default_config()
  config.model = registered
  train_lib.validate_config(config)  # the training config accepts the registered name
  assert train_lib.config.resolve_model(registered, num_classes=3).num_classes == 3


def test_unregistered_name_is_rejected_by_the_config():
  config = train_lib.default_config()
  config.model = "my_cnn"
  with pytest.raises(ConfigError, match="config.model = 'my_cnn'; allowed: a zoo or registered"):
    train_lib.validate_config(config)


def test_register_model_errors(registered):
  with pytest.raises(ModelError, match="'small_cnn' is a zoo model"):
    cimjax.register_model("small_cnn", lambda: None)
  with pytest.raises(ModelError, match="already registered"):
    cimjax.register_model(registered, lambda: None)
  with pytest.raises(ModelError, match="no ':'"):
    cimjax.register_model("a:b", lambda: None)
  with pytest.raises(ModelError, match="not callable"):
    cimjax.register_model("other", 3)
  cimjax.register_model(
    registered, lambda num_classes=10: models.get_model("small_cnn"), overwrite=True
  )
  assert cimjax.resolve_model(registered).name == registered  # the reference, not small_cnn


# ------------------------------------------------------------------------ import and file refs


def test_package_module_factory_from_the_current_directory(tmp_path, monkeypatch):
  pkg = tmp_path / "mypkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "nets.py").write_text(USER_MODEL)
  (tmp_path / "file_module.py").write_text(USER_MODEL)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  for ref in ("mypkg.nets:factory", "file_module:factory"):
    md = cimjax.resolve_model(ref, num_classes=5, hidden=8)
    assert md.name == ref and md.num_classes == 5
    specs = trace.trace_specs(md)
    assert [s.name for s in specs] == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]
    assert (specs[3].n, specs[3].m, specs[4].m) == (8, 8, 5)
  assert str(tmp_path) not in sys.path  # the search path is restored
  md = cimjax.resolve_model("mypkg.nets:as_dict")
  assert md.description == "dict form" and len(trace.trace_specs(md)) == 4  # Dense_1 skipped


def test_file_py_factory(user_file, tmp_path, monkeypatch):
  md = cimjax.resolve_model(f"{user_file}:factory")
  assert md.name == f"{user_file}:factory" and md.input_shape == (8, 8, 1)
  monkeypatch.chdir(tmp_path)
  rel = cimjax.resolve_model("user_cnn.py:factory", num_classes=4)
  assert rel.name == f"{user_file.resolve()}:factory"  # recorded absolute
  assert len(trace.trace_specs(rel)) == 5 and rel.num_classes == 4


def test_factory_results(user_file):
  with pytest.raises(
    ModelError, match="returned a bare PlainCNN; return \\(module, input_shape\\)"
  ):
    cimjax.resolve_model(f"{user_file}:bare")
  with pytest.raises(ModelError, match="has 10 outputs but 3 classes are needed"):
    cimjax.resolve_model(f"{user_file}:as_dict", num_classes=3)  # as_dict takes no num_classes
  with pytest.raises(ModelError, match="calling its factory with \\{'depth': 3\\} failed"):
    cimjax.resolve_model(f"{user_file}:factory", depth=3)
  zoo = cimjax.resolve_model(models.get_model("small_cnn"))  # a ModelDef passes through
  assert zoo.name == "small_cnn"


@pytest.mark.parametrize(
  "ref,match",
  [
    ("resnet99", "unknown model 'resnet99': not a zoo or registered model \\(small_cnn, "),
    ("mypkg.nets.factory", "did you mean mypkg.nets:factory"),
    ("nosuch.mod:factory", "import 'nosuch.mod': no module 'nosuch' on the Python path"),
    ("cimjax.models:nosuch", "module 'cimjax.models' has no attribute 'nosuch'"),
    ("missing/net.py:factory", "file '.*missing/net.py' not found"),
    ("missing.onnx", "ONNX file '.*missing.onnx' not found"),
  ],
)
def test_unknown_reference_one_line(ref, match):
  with pytest.raises(ModelNotFoundError, match=match) as e:
    cimjax.resolve_model(ref)
  assert "\n" not in str(e.value)
  assert isinstance(e.value, UnknownModelError) and isinstance(e.value, ModelError)
  with pytest.raises(ModelNotFoundError):
    models.check_model_ref(ref)


def test_onnx_reference_is_resolved_lazily(tmp_path, monkeypatch):
  path = tmp_path / "net.onnx"
  path.write_bytes(b"not really onnx")
  monkeypatch.setitem(sys.modules, "cimjax.onnx", None)  # as if the module did not exist
  with pytest.raises(ModelError, match="ONNX import is unavailable \\(cimjax.onnx"):
    cimjax.resolve_model(str(path))
  calls = []

  def import_model(p, *, input_shape=None, num_classes=None, name=None):
    calls.append((p, num_classes))
    return models.get_model("small_cnn", num_classes=num_classes or 10)

  monkeypatch.setitem(sys.modules, "cimjax.onnx", types.SimpleNamespace(import_model=import_model))
  md = cimjax.resolve_model(str(path), num_classes=6)
  assert calls == [(str(path), 6)] and md.name == str(path.resolve()) and md.num_classes == 6


def test_cli_prints_one_line_and_exits_2(repo_root):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-m", "launch.cost", "--model=nosuch.mod:factory", "--json"],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and "--model: model 'nosuch.mod:factory': import 'nosuch.mod'" in err[0]


# --------------------------------------------------------------------------- compiled programs


def test_program_of_a_referenced_model_reloads_by_reference(user_file, tmp_path):
  ref = f"{user_file}:factory"
  md = cimjax.resolve_model(ref, hidden=8)
  v = init_variables(md, 0)
  pol = np.array([[8, 8], [4, 4], [2, 6], [6, 2], [8, 8]], np.int32)
  prog = cc.compile_model(md, v, pol, "rram_64_c2", model_kwargs={"hidden": 8})
  assert prog.model == ref
  cc.save_program(prog, tmp_path / "prog")
  loaded = cc.load_program(tmp_path / "prog")
  rebuilt = cc.program_model(loaded)
  assert rebuilt.name == ref and trace.trace_specs(rebuilt) == trace.trace_specs(md)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  rep = cc.verify(loaded, x)  # no model given: rebuilt from the manifest's reference
  assert rep.ok and rep.logits_equal
  manifest = json.loads((tmp_path / "prog" / "manifest.json").read_text())
  assert manifest["model"] == ref and manifest["model_kwargs"] == {"hidden": 8}
  assert manifest["num_classes"] == md.num_classes == loaded.num_classes
  # a model rebuilt with another number of classes is refused, naming both
  import dataclasses

  other = dataclasses.replace(loaded, num_classes=md.num_classes + 1)
  with pytest.raises(
    cimjax.errors.ProgramError, match=f"{md.num_classes} classes.*{md.num_classes + 1}"
  ):
    cc.program_model(other)


# ---------------------------------------------------------------------------------- end to end


def _run_cli(repo_root, cwd, *args, timeout):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo_root)
  return subprocess.run(
    [sys.executable, "-m", "launch.run", f"--config={repo_root}/train/run_tiny.py", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_cli_trains_a_user_module_from_the_current_directory(repo_root, tmp_path):
  """``--config.train.model=file_module:factory`` (importable from the cwd), the fp32 stage."""
  (tmp_path / "file_module.py").write_text(USER_MODEL)
  proc = _run_cli(
    repo_root,
    tmp_path,
    "--config.train.model=file_module:factory",
    f"--workdir={tmp_path / 'wd'}",
    "--stages=fp32",
    "--config.train.fp32.steps=5",
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads((tmp_path / "wd" / "fp32" / "result.json").read_text())
  assert result["model"] == "file_module:factory"


@pytest.mark.slow
def test_cli_full_run_of_a_user_file(repo_root, tmp_path):
  """Every stage of the tiny run on a plain Flax CNN of a user's file, compiled bit-exact."""
  path = tmp_path / "user_cnn.py"
  path.write_text(USER_MODEL)
  wd = tmp_path / "wd"
  proc = _run_cli(
    repo_root, tmp_path, f"--config.train.model={path}:factory", f"--workdir={wd}", timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  compiled = json.loads((wd / "compile" / "result.json").read_text())
  assert compiled["verify"]["ok"] and compiled["verify"]["logits_equal"]
  assert json.loads((wd / "report.json").read_text())["model"] == f"{path}:factory"
  prog = cc.load_program(wd / "compile" / "program")
  assert prog.model == f"{path}:factory"
  assert cc.program_model(prog).name == prog.model
