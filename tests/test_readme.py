"""Every command and code example in README.md runs (on small settings where noted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def readme(repo_root):
  return Path(repo_root, "README.md").read_text()


def _blocks(text, lang):
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block):
  """Shell commands of a block, continuation lines joined, comments dropped."""
  joined = block.replace("\\\n", " ")
  return [
    re.sub(r"\s+#.*$", "", line).strip()
    for line in joined.splitlines()
    if line.strip() and not line.strip().startswith("#")
  ]


def _run(repo_root, cmd, timeout=600):
  args = cmd.split()
  if args[0] == "cimjax":
    args = ["-m", "launch.run", *args[1:]]
  elif args[:2] == ["python", "-m"]:
    args = args[1:]
  p = subprocess.run(
    [sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout
  )
  assert p.returncode == 0, f"{cmd}\n{p.stderr[-3000:]}"
  return p


def test_quick_start_is_what_ci_runs(readme, repo_root):
  quick = _commands(_blocks(readme, "bash")[0])
  assert len(quick) == 2
  assert quick[0].startswith("apt-get install -y dataset-fashion-mnist") and "cimjax" in quick[0]
  assert quick[1] == "ruff check . && ruff format --check . && mypy && python -m pytest"
  ci = [
    l.strip()
    for l in Path(repo_root, ".ci/run").read_text().splitlines()
    if l.strip() and not l.startswith("#") and not l.startswith(("set ", "cd "))
  ]
  assert ci == quick


def test_cost_commands(readme, repo_root):
  cmds = [c for b in _blocks(readme, "bash") for c in _commands(b)]
  cmds += re.findall(r"`(python -m launch\.cost [^`]*)`", readme.replace("\n", " "))
  cost = [
    c
    for c in cmds
    if c.startswith("python -m launch.cost") and "my_macro" not in c and "policy.npy" not in c
  ]
  assert len(cost) >= 3
  for c in cost:
    out = _run(repo_root, c).stdout
    assert "speedup" in out or '"speedup"' in out


def test_toml_example_is_a_valid_target(readme, tmp_path, repo_root):
  toml = _blocks(readme, "toml")[0]
  path = tmp_path / "my_macro.toml"
  path.write_text(toml)
  from cimjax import hw

  t = hw.load_hw(path)
  assert (t.name, t.rows, t.mapping) == ("my_macro", 128, "of")
  out = _run(repo_root, f"python -m launch.cost --model=vgg16 --hw={path}").stdout
  assert "vgg16" in out or "conv1" in out


@pytest.mark.slow  # default-suite time; the CLIs have their own tests (tests/test_cli_*.py)
def test_tool_commands(readme, repo_root, tmp_path):
  block = next(b for b in _blocks(readme, "bash") if "launch.train" in b)
  for c in _commands(block):
    if c.startswith(("python -m launch.cost", "python -m launch.bench ")):
      continue  # cost: above; the benchmark summary: test_bench_quick (slow)
    c = c.replace("/tmp/", f"{tmp_path}/")
    _run(repo_root, c)
  assert (tmp_path / "t" / "fp32" / "result.json").is_file()
  assert (tmp_path / "s" / "best_policy.npy").is_file()
  assert (tmp_path / "c" / "program" / "manifest.json").is_file()


@pytest.mark.slow  # default-suite time; the run flags are tested in tests/test_pipeline.py
def test_run_flags_on_the_tiny_config(readme, repo_root, tmp_path):
  """The README's run examples, with the tiny config and stages up to the search."""
  block = next(b for b in _blocks(readme, "bash") if "--config.search.agent=ddpg" in b)
  cmds = _commands(block)
  assert len(cmds) == 3
  flags = [f for c in cmds[:2] for f in c.split()[1:] if not f.startswith("--workdir")]
  flags = [f.replace("--budget=3000", "--budget=30") for f in flags]
  _run(
    repo_root,
    f"cimjax --config=train/run_tiny.py --workdir={tmp_path / 'w'} "
    f"--stages=fp32,int8,anyprec,search {' '.join(flags)}",
  )
  import json

  cfg = json.loads((tmp_path / "w" / "config.json").read_text())
  assert cfg["hw"] == "rram_256_c4" and cfg["search"]["agent"] == "ddpg"
  assert cfg["search"]["constraint"] == "none" and cfg["search"]["acc_drop"] == 1.0
  res = json.loads((tmp_path / "w" / "search" / "result.json").read_text())
  assert res["summary"]["agent"] == "ddpg" and res["summary"]["evals_used"] <= 30


@pytest.mark.slow  # default-suite time (a Fashion-MNIST evaluation of random policies)
def test_python_example(readme, tmp_path, repo_root):
  code = next(b for b in _blocks(readme, "python") if "random_policies" in b)
  # The example reads the default run's weights; here, freshly initialised ones.
  import jax

  import cimjax
  from cimjax import train

  model = cimjax.get_model("small_cnn")
  train.save_variables(tmp_path / "anyprec" / "variables", cimjax.init(model, jax.random.key(0)))
  code = code.replace('"runs/default/anyprec"', repr(str(tmp_path / "anyprec")))
  p = subprocess.run(
    [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert re.search(r"best speedup \d+\.\d+x, accuracy \d+\.\d-\d+\.\d%", p.stdout), p.stdout


@pytest.mark.slow
def test_bench_quick(repo_root, tmp_path):
  _run(repo_root, f"python -m launch.bench --quick --workdir={tmp_path}", timeout=3000)
  assert (tmp_path / "bench_summary.md").is_file()
