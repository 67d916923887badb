"""Tests for cimjax.hw: shipped targets, loading by name/path, and validation messages."""

import dataclasses
import re
from pathlib import Path

import pytest

from cimjax import hw

SHIPPED = ("rram_256_c4", "rram_256_c2", "rram_128_c2", "rram_64_c2")
HW_DIR = Path(hw.__file__).resolve().parents[1] / "hw"


def _toml(**fields) -> str:
  base = hw.load_hw("rram_256_c4").to_dict()
  base.update(fields)
  lines = []
  for k, v in base.items():
    if v is None:
      continue
    if isinstance(v, str):
      lines.append(f'{k} = "{v}"')
    elif isinstance(v, bool):
      lines.append(f"{k} = {'true' if v else 'false'}")
    elif isinstance(v, list):
      lines.append(f"{k} = [" + ", ".join(f'"{s}"' for s in v) + "]")
    else:
      lines.append(f"{k} = {v!r}")
  return "\n".join(lines) + "\n"


def _write(tmp_path, text, name="target.toml") -> Path:
  p = tmp_path / name
  p.write_text(text)
  return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_targets_load(name):
  t = hw.load_hw(name)
  assert t.name == name
  assert t.sources, "every shipped target cites its sources"
  assert t.latency_mode == "serial" and t.num_crossbars == 1 and t.batch == 1
  assert t.mapping == "dc"
  assert name in hw.list_hw()


def test_cim_aq_default_values():
  t = hw.load_hw("rram_256_c4")
  assert (t.rows, t.cols, t.cell_bits, t.dac_bits, t.adc_bits) == (256, 256, 4, 1, None)
  assert (t.t_write_us, t.t_exec_us) == (56.0, 1.4)
  assert hw.load_hw("rram_256_c2").cell_bits == 2
  isaac = hw.load_hw("rram_128_c2")
  assert (isaac.rows, isaac.cols, isaac.cell_bits, isaac.adc_bits) == (128, 128, 2, 8)
  assert (isaac.t_write_us, isaac.t_exec_us) == (56.0, 0.1)
  small = hw.load_hw("rram_64_c2")
  assert (small.rows, small.cols, small.cell_bits) == (64, 64, 2)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_in_shipped_targets_is_commented(name):
  """Each numeric setting has a comment on its line or directly above it."""
  lines = (HW_DIR / f"{name}.toml").read_text().splitlines()
  for i, line in enumerate(lines):
    if re.match(r"^\s*\w+\s*=\s*[-+0-9.]", line):
      above = lines[i - 1].lstrip() if i else ""
      assert "#" in line or above.startswith("#"), f"{name}.toml line {i + 1}: {line!r}"


def test_load_by_path_str_and_pathlike(tmp_path):
  p = _write(tmp_path, _toml(name="mine", rows=128))
  assert hw.load_hw(str(p)).rows == 128
  assert hw.load_hw(p).name == "mine"
  assert hw.load_hw(HW_DIR / "rram_64_c2.toml").rows == 64


def test_name_defaults_to_file_stem(tmp_path):
  text = "\n".join(l for l in _toml().splitlines() if not l.startswith("name ="))
  assert hw.load_hw(_write(tmp_path, text, "my_target.toml")).name == "my_target"


def test_env_dir_takes_precedence(tmp_path, monkeypatch):
  _write(tmp_path, _toml(name="rram_256_c4", rows=32), "rram_256_c4.toml")
  _write(tmp_path, _toml(name="extra"), "extra.toml")
  monkeypatch.setenv(hw.HW_DIR_ENV, str(tmp_path))
  assert hw.load_hw("rram_256_c4").rows == 32
  assert hw.load_hw("extra").name == "extra"
  assert {"extra", *SHIPPED} <= set(hw.list_hw())
  assert hw.hw_search_path()[0] == tmp_path


def test_unknown_name_lists_available():
  with pytest.raises(hw.HwError, match="unknown hardware target 'nope'") as e:
    hw.load_hw("nope")
  for name in SHIPPED:
    assert name in str(e.value)


def test_missing_file():
  with pytest.raises(hw.HwError, match="not found"):
    hw.load_hw("/no/such/dir/target.toml")


def test_toml_syntax_error(tmp_path):
  p = _write(tmp_path, "rows = = 3\n")
  with pytest.raises(hw.HwError, match="TOML syntax error"):
    hw.load_hw(p)


def test_unknown_field(tmp_path):
  p = _write(tmp_path, _toml() + "colums = 3\n")
  with pytest.raises(hw.HwError, match="unknown field.*'colums'.*allowed fields.*cols"):
    hw.load_hw(p)


def test_missing_field(tmp_path):
  text = "\n".join(l for l in _toml().splitlines() if not l.startswith("t_exec_us"))
  with pytest.raises(hw.HwError, match="missing required field.*'t_exec_us'"):
    hw.load_hw(_write(tmp_path, text))


@pytest.mark.parametrize(
  "field,value,allowed",
  [
    ("cell_bits", 5, "1..4"),
    ("cell_bits", 0, ">= 1"),
    ("rows", 0, ">= 1"),
    ("cols", 1.5, "integer"),
    ("rows", True, "integer"),
    ("dac_bits", "1", "integer"),
    ("adc_bits", "foo", "ideal"),
    ("adc_bits", 0, "ideal"),
    ("mapping", "xx", '"of" | "dc" | "dr"'),
    ("latency_mode", "fast", '"serial" | "stationary" | "parallel"'),
    ("t_exec_us", 0.0, "> 0"),
    ("t_write_us", -1.0, ">= 0"),
    ("e_adc_pj", -1.0, "picojoules"),
    ("e_write_pj", "x", "picojoules"),
    ("num_crossbars", 0, ">= 1"),
    ("batch", 0, ">= 1"),
  ],
)
def test_bad_values_name_field_and_allowed(tmp_path, field, value, allowed):
  p = _write(tmp_path, _toml(**{field: value}))
  with pytest.raises(hw.HwError) as e:
    hw.load_hw(p)
  msg = str(e.value)
  assert repr(field) in msg and allowed in msg, msg


def test_direct_construction_validates():
  t = hw.load_hw("rram_128_c2")
  with pytest.raises(hw.HwError, match="'mapping'"):
    dataclasses.replace(t, mapping="diff")
  with pytest.raises(hw.HwError, match="'cell_bits'"):
    t.replace(cell_bits=8)
  with pytest.raises(hw.HwError, match="'batch'"):
    hw.replace(t, batch=-2)
  assert t.replace(latency_mode="parallel", num_crossbars=4).num_crossbars == 4


def test_normalisation_and_round_trip():
  t = hw.load_hw("rram_256_c4")
  u = t.replace(adc_bits="ideal", t_write_us=56, sources=["a", "b"])
  assert u.adc_bits is None and isinstance(u.t_write_us, float) and u.sources == ("a", "b")
  assert hash(u) == hash(t.replace(sources=("a", "b")))
  assert hw.hw_from_dict(t.to_dict()) == t
  assert hw.load_hw(t) is t
