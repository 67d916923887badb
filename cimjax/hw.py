"""Hardware targets: the crossbar, converter, timing and energy parameters of a CIM accelerator.

A target is a frozen :class:`HardwareTarget`, usually loaded from a TOML file in ``hw/`` with
:func:`load_hw`. Every field is validated on construction (``__post_init__``), so a target that
exists is a valid one; errors raise :class:`HwError` naming the field and the allowed values.

TOML layout (flat keys, one per field; see ``hw/rram_256_c4.toml``)::

  name = "rram_256_c4"          # optional, defaults to the file stem
  description = "..."           # optional
  rows = 256                    # N, crossbar rows (input dim)
  cols = 256                    # M, crossbar columns (output dim)
  cell_bits = 4                 # bits per RRAM cell, 1..4
  dac_bits = 1                  # input bits applied per cycle, >= 1
  adc_bits = "ideal"            # or an int 1..32
  mapping = "dc"                # "of" | "dc" | "dr"
  t_write_us = 56.0             # programming one crossbar tile
  t_exec_us = 1.4               # one crossbar MVM cycle
  e_dac_pj = 0.39               # one DAC conversion (one row, one cycle)
  e_cell_read_pj = 0.0018       # one cell read in one cycle
  e_adc_pj = 25.0               # one ADC conversion
  e_shift_add_pj = 0.02         # one digital shift-add of one partial sum
  e_write_pj = 10.0             # programming one cell
  num_crossbars = 1             # optional, P >= 1
  latency_mode = "serial"       # optional: "serial" | "stationary" | "parallel"
  batch = 1                     # optional, images per weight programming
  sources = ["..."]             # optional, where the numbers come from

Targets are found by name in, in order: ``$CIMJAX_HW_DIR`` (one directory, or several joined
with ``os.pathsep``), the source tree's ``hw/`` directory, and ``sys.prefix/share/cimjax/hw``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from cimjax.errors import HwError  # noqa: F401 (re-exported)

Mapping = Literal["of", "dc", "dr"]
LatencyMode = Literal["serial", "stationary", "parallel"]

MAPPINGS: tuple[str, ...] = ("of", "dc", "dr")
LATENCY_MODES: tuple[str, ...] = ("serial", "stationary", "parallel")
HW_DIR_ENV = "CIMJAX_HW_DIR"

_INT_FIELDS = ("rows", "cols", "cell_bits", "dac_bits", "num_crossbars", "batch")
_TIME_FIELDS = ("t_write_us", "t_exec_us")
_ENERGY_FIELDS = ("e_dac_pj", "e_cell_read_pj", "e_adc_pj", "e_shift_add_pj", "e_write_pj")


@dataclasses.dataclass(frozen=True)
class HardwareTarget:
  """One CIM accelerator configuration (docs/architecture.md, sections 1 and 3).

  Attributes:
    name: short identifier, e.g. ``"rram_256_c4"``.
    rows: N, crossbar rows; a layer's input dim ``n`` maps onto rows.
    cols: M, crossbar columns; a layer's output dim ``m`` (times weight slices) maps onto columns.
    cell_bits: bits stored per RRAM cell, 1..4.
    dac_bits: input bits applied per crossbar cycle (input bit slicing), >= 1.
    adc_bits: ADC resolution in bits, or ``None`` for an ideal (exact) ADC. Used by the
      crossbar simulator; the energy model charges ``e_adc_pj`` per conversion either way.
    mapping: signed-weight mapping: ``"of"`` offset (+1 column), ``"dc"`` differential column
      (2x columns), ``"dr"`` differential row (2x rows).
    t_write_us: microseconds to program one crossbar tile.
    t_exec_us: microseconds for one crossbar MVM cycle (one input bit-plane).
    e_dac_pj: picojoules per DAC conversion (one row driven for one cycle).
    e_cell_read_pj: picojoules per cell read in one cycle.
    e_adc_pj: picojoules per ADC conversion (one column, one cycle).
    e_shift_add_pj: picojoules per digital shift-add of one partial sum.
    e_write_pj: picojoules per cell programmed.
    num_crossbars: P, crossbars that work in parallel (``"parallel"`` latency mode), >= 1.
    latency_mode: ``"serial"`` (CIM-AQ exact), ``"stationary"`` or ``"parallel"``; see
      :mod:`cimjax.cost`.
    batch: images per weight programming (``"stationary"`` and ``"parallel"`` modes), >= 1.
    description: free text.
    sources: where the numbers come from (citations).
  """

  name: str
  rows: int
  cols: int
  cell_bits: int
  dac_bits: int
  adc_bits: int | None
  mapping: Mapping
  t_write_us: float
  t_exec_us: float
  e_dac_pj: float
  e_cell_read_pj: float
  e_adc_pj: float
  e_shift_add_pj: float
  e_write_pj: float
  num_crossbars: int = 1
  latency_mode: LatencyMode = "serial"
  batch: int = 1
  description: str = ""
  sources: tuple[str, ...] = ()

  def __post_init__(self):
    # Normalise convenient spellings before validating: lists of sources become tuples, int
    # times and energies become floats, "ideal" becomes None.
    if isinstance(self.sources, list):
      object.__setattr__(self, "sources", tuple(self.sources))
    if isinstance(self.adc_bits, str) and self.adc_bits == "ideal":
      object.__setattr__(self, "adc_bits", None)
    for f in _TIME_FIELDS + _ENERGY_FIELDS:
      v = getattr(self, f)
      if isinstance(v, int) and not isinstance(v, bool):
        object.__setattr__(self, f, float(v))
    self.validate()

  def validate(self) -> "HardwareTarget":
    """Checks every field's type and range.

    Returns:
      ``self``, so that ``target.validate()`` can be chained.

    Raises:
      HwError: naming the first offending field and its allowed values.
    """
    where = f"hardware target {self.name!r}" if isinstance(self.name, str) else "hardware target"

    def fail(field: str, value: Any, allowed: str) -> None:
      raise HwError(f"{where}: field {field!r} = {value!r} is invalid; allowed: {allowed}")

    if not isinstance(self.name, str) or not self.name:
      fail("name", self.name, "a non-empty string")
    if not isinstance(self.description, str):
      fail("description", self.description, "a string")
    if not isinstance(self.sources, tuple) or not all(isinstance(s, str) for s in self.sources):
      fail("sources", self.sources, "a list of strings")
    for f in _INT_FIELDS:
      v = getattr(self, f)
      if not _is_int(v) or v < 1:
        fail(f, v, "an integer >= 1")
    if not 1 <= self.cell_bits <= 4:
      fail("cell_bits", self.cell_bits, "an integer in 1..4")
    if self.adc_bits is not None and (not _is_int(self.adc_bits) or not 1 <= self.adc_bits <= 32):
      fail("adc_bits", self.adc_bits, '"ideal" or an integer in 1..32')
    if self.mapping not in MAPPINGS:
      fail("mapping", self.mapping, " | ".join(f'"{m}"' for m in MAPPINGS))
    if self.latency_mode not in LATENCY_MODES:
      fail("latency_mode", self.latency_mode, " | ".join(f'"{m}"' for m in LATENCY_MODES))
    for f in _TIME_FIELDS:
      v = getattr(self, f)
      if not _is_real(v) or not math.isfinite(v) or v < 0:
        fail(f, v, "a finite number >= 0 (microseconds)")
    if self.t_exec_us <= 0:
      fail("t_exec_us", self.t_exec_us, "a finite number > 0 (microseconds)")
    for f in _ENERGY_FIELDS:
      v = getattr(self, f)
      if not _is_real(v) or not math.isfinite(v) or v < 0:
        fail(f, v, "a finite number >= 0 (picojoules)")
    return self

  def replace(self, **changes: Any) -> "HardwareTarget":
    """Returns a copy with ``changes`` applied and validated (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """Returns the fields as a JSON/TOML-friendly dict (``adc_bits`` None -> ``"ideal"``)."""
    d = dataclasses.asdict(self)
    d["sources"] = list(self.sources)
    if d["adc_bits"] is None:
      d["adc_bits"] = "ideal"
    return d


def replace(hw: HardwareTarget, **changes: Any) -> HardwareTarget:
  """Returns a validated copy of ``hw`` with ``changes`` applied."""
  return dataclasses.replace(hw, **changes)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HardwareTarget))
REQUIRED_FIELDS: tuple[str, ...] = tuple(
  f.name
  for f in dataclasses.fields(HardwareTarget)
  if f.default is dataclasses.MISSING and f.name != "name"
)


def hw_search_path() -> list[Path]:
  """Directories searched for ``<name>.toml``, in order.

  Returns:
    ``$CIMJAX_HW_DIR`` entries (``os.pathsep``-separated), the source tree's ``hw/`` and
    ``sys.prefix/share/cimjax/hw``.
  """
  dirs: list[Path] = []
  env = os.environ.get(HW_DIR_ENV, "")
  dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
  dirs.append(Path(__file__).resolve().parents[1] / "hw")
  dirs.append(Path(sys.prefix) / "share" / "cimjax" / "hw")
  return dirs


def list_hw() -> list[str]:
  """Names of the targets found on :func:`hw_search_path`, sorted, without duplicates."""
  names: set[str] = set()
  for d in hw_search_path():
    if d.is_dir():
      names.update(p.stem for p in d.glob("*.toml") if p.is_file())
  return sorted(names)


def _looks_like_path(s: str) -> bool:
  return s.endswith(".toml") or "/" in s or os.sep in s


def find_hw(name: str) -> Path:
  """Resolves a target name to its TOML file on the search path.

  Raises:
    HwError: if no directory holds ``<name>.toml``; the message lists the available names.
  """
  for d in hw_search_path():
    p = d / f"{name}.toml"
    if p.is_file():
      return p
  available = ", ".join(list_hw()) or "none"
  raise HwError(
    f"unknown hardware target {name!r}; available: {available} "
    f"(or pass a path to a .toml file; search path: "
    f"{os.pathsep.join(str(d) for d in hw_search_path())})"
  )


def hw_from_dict(
  data: dict[str, Any], *, default_name: str = "", origin: str = ""
) -> HardwareTarget:
  """Builds and validates a target from a flat dict (the parsed TOML).

  Args:
    data: field -> value, as in a TOML target file.
    default_name: used when ``data`` has no ``name``.
    origin: where the dict came from, for error messages (e.g. the file path).

  Raises:
    HwError: unknown or missing fields, wrong types, out-of-range values.
  """
  where = f"{origin}: " if origin else ""
  unknown = sorted(set(data) - set(FIELDS))
  if unknown:
    raise HwError(
      f"{where}unknown field(s) {', '.join(map(repr, unknown))}; "
      f"allowed fields: {', '.join(FIELDS)}"
    )
  missing = [f for f in REQUIRED_FIELDS if f not in data]
  if missing:
    raise HwError(
      f"{where}missing required field(s) {', '.join(map(repr, missing))}; "
      f"required fields: {', '.join(REQUIRED_FIELDS)}"
    )
  kwargs = dict(data)
  kwargs.setdefault("name", default_name)
  adc = kwargs["adc_bits"]
  if isinstance(adc, str) and adc != "ideal":
    raise HwError(
      f"{where}field 'adc_bits' = {adc!r} is invalid; allowed: \"ideal\" or an integer in 1..32"
    )
  try:
    return HardwareTarget(**kwargs)
  except HwError as e:
    raise HwError(f"{where}{e}") from None


def load_hw(name_or_path: str | os.PathLike[str] | HardwareTarget) -> HardwareTarget:
  """Loads a hardware target by name or by path.

  Args:
    name_or_path: a :class:`HardwareTarget` (returned as is), a path (anything ending in
      ``.toml`` or containing a path separator, or a ``PathLike``), or a name looked up on
      :func:`hw_search_path`.

  Returns:
    The validated target.

  Raises:
    HwError: unknown name (the message lists the available ones), missing file, TOML syntax
      error, unknown/missing field, wrong type or out-of-range value.
  """
  if isinstance(name_or_path, HardwareTarget):
    return name_or_path.validate()
  if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
    path = Path(name_or_path)
    if not path.is_file():
      raise HwError(f"hardware target file not found: {str(path)!r}")
  else:
    path = find_hw(str(name_or_path))
  try:
    with open(path, "rb") as f:
      data = tomllib.load(f)
  except tomllib.TOMLDecodeError as e:
    raise HwError(f"{path}: TOML syntax error: {e}") from None
  except OSError as e:
    raise HwError(f"{path}: cannot read hardware target: {e.strerror or e}") from None
  return hw_from_dict(data, default_name=path.stem, origin=str(path))
