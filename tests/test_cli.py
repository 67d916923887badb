"""The CLI modules: own flag registries (importable together), --help, bad-flag exit status."""

import importlib
import os
import subprocess
import sys

import pytest

from cimjax import cli

# console scripts (cimjax.cli.*) and the benchmarks in launch/
MODULES = (
  "cimjax.cli.run",
  "launch.bench",
  "launch.bench_eval",
  "launch.bench_search",
  "cimjax.cli.compile",
  "cimjax.cli.cost",
  "launch.proxy_validity",
  "cimjax.cli.search",
  "cimjax.cli.train",
)
GLOBAL_FLAG_MODULES = (
  "cimjax.cli.run",
  "launch.bench",
  "launch.bench_eval",
  "cimjax.cli.compile",
  "cimjax.cli.cost",
  "launch.proxy_validity",
)


def test_every_cli_module_imports_in_one_process():
  """No duplicate-flag errors: each module keeps its flags in its own registry."""
  mods = [importlib.import_module(m) for m in MODULES]
  assert len(mods) == len(MODULES)
  for m in GLOBAL_FLAG_MODULES:
    fv = importlib.import_module(m).FLAGS
    assert fv is not cli.flags.FLAGS and len(list(fv)) >= 3


@pytest.mark.parametrize("module", GLOBAL_FLAG_MODULES)
def test_parser_rejects_unknown_and_bad_flags_with_status_2(module, capsys):
  fv = importlib.import_module(module).FLAGS
  parse = cli.flags_parser(fv, module)
  with pytest.raises(SystemExit) as e:
    parse([module, "--no_such_flag_xyz=1"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"{module}: error:") and "no_such_flag_xyz" in err
  fv.unparse_flags()


def test_parser_reports_bad_value_naming_the_flag(capsys):
  from cimjax.cli import compile as cc

  parse = cli.flags_parser(cc.FLAGS, "cimjax-compile")
  with pytest.raises(SystemExit) as e:
    parse(["cimjax-compile", "--seed=abc"])
  assert e.value.code == 2
  assert "seed" in capsys.readouterr().err
  cc.FLAGS.unparse_flags()


def test_parser_keeps_positional_arguments_and_parses_values():
  from cimjax.cli import cost

  parse = cli.flags_parser(cost.FLAGS, "cimjax-cost")
  rest = parse(["cimjax-cost", "--hw=rram_256_c4", "--json", "extra"])
  assert rest == ["cimjax-cost", "extra"]
  assert cost.FLAGS.hw == "rram_256_c4" and cost.FLAGS.json is True
  cost.FLAGS.unparse_flags()


@pytest.mark.parametrize("module", ["cost", "compile"])
def test_help_lists_the_module_flags(module, repo_root):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-m", f"launch.{module}", "--help"],
    cwd=repo_root,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--hw" in proc.stdout and "--uniform" in proc.stdout
