"""The compiled program (:class:`CimProgram`) and its file format.

A program holds, per quantizable layer, its :class:`~cimjax.compiler.plan.LayerPlan` and (for
layers with static weights) the integer weights, the cell levels of every ``N x M`` tile, the
column sums of the weights (offset-input correction), the dequantisation scales and their
fixed-point form; the ordered :class:`~cimjax.compiler.schedule.Schedule`; and the model's other
(digital) variables, so a saved program runs on its own.

Files (:func:`save_program`, :func:`load_program`): a directory with ``manifest.json`` (format,
model, target, policy, layer plans, schedule settings, per-layer latency/energy from the walk,
SHA-256 of every array and of the ``.npz``) and ``arrays.npz`` (loaded with
``allow_pickle=False``). Writes go to a temporary directory that is renamed into place; loads
check the format version and every checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
from flax import traverse_util

from cimjax import crossbar as xb
from cimjax import hw as hw_lib
from cimjax.compiler.plan import LayerPlan
from cimjax.compiler.schedule import (
  OP_NAMES,
  Schedule,
  ScheduleCost,
  schedule_params,
  walk_schedule,
)
from cimjax.errors import ProgramError

FORMAT = "cimjax-program"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
_VARIABLES = "variables/"


def array_key(index: int, name: str) -> str:
  """The ``arrays`` key of layer ``index``'s array ``name`` (``"layerNNN/<name>"``)."""
  return f"layer{index:03d}/{name}"


@dataclasses.dataclass
class CimProgram:
  """A compiled model: plans, schedule, tiles and the digital parameters.

  Attributes:
    hw: the target.
    policy: int32 ``[L, 2]``.
    layers: one :class:`LayerPlan` per quantizable layer.
    schedule: the operations.
    arrays: ``"layerNNN/<name>"`` per-layer arrays (``w_int`` int8/int16 ``[rep, n, m]``,
      ``levels`` uint8 ``[rep, tr, tc, N, M]``, ``w_colsum`` int32 ``[rep, m]``, ``w_step``
      float32 ``[rep, m]``, ``a_step`` float32 ``[]``, ``out_scale`` float32 ``[rep, m]``,
      ``out_mult``/``out_shift`` int64 ``[rep, m]``; the weight arrays are absent for dynamic
      layers) and ``"variables/<collection>/<path>"`` the model's variables.
    input_scheme: signed-input scheme of the simulator (``"twos"`` or ``"offset"``).
    model: zoo name, or None.
    model_kwargs: keyword arguments of :func:`cimjax.models.get_model` (JSON values).
    input_shape: one input without the batch axis.
    num_classes: the model's number of outputs (classes), or None when unknown.
    cost: walked per-layer cost (computed when missing).
  """

  hw: hw_lib.HardwareTarget
  policy: np.ndarray
  layers: list[LayerPlan]
  schedule: Schedule
  arrays: dict[str, np.ndarray]
  input_scheme: str = "twos"
  model: str | None = None
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  input_shape: tuple[int, ...] | None = None
  num_classes: int | None = None
  cost: ScheduleCost | None = None

  def __post_init__(self):
    if self.cost is None:
      self.cost = walk_schedule(self.schedule, self.hw, len(self.layers))

  def layer_array(self, index: int, name: str) -> np.ndarray:
    """Per-layer array ``name`` of layer ``index``."""
    key = array_key(index, name)
    if key not in self.arrays:
      raise ProgramError(f"program has no array {key!r} (layer {index} {self.layers[index].name})")
    return self.arrays[key]

  def variables(self) -> dict[str, Any]:
    """The model's variables (nested dicts of NumPy arrays)."""
    flat = {k[len(_VARIABLES) :]: v for k, v in self.arrays.items() if k.startswith(_VARIABLES)}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}

  def xbar_config(self, **overrides: Any) -> xb.XbarConfig:
    """The simulator configuration (target + input scheme, with ``overrides``)."""
    kw = {"input_scheme": self.input_scheme}
    kw.update(overrides)
    return xb.XbarConfig.from_hw(self.hw, **kw)

  def summary(self) -> list[dict[str, Any]]:
    """Per-layer rows: name, kind, bits, tiles, cycles, latency and energy (from the walk)."""
    return [_summary_row(p, self.cost) for p in self.layers]

  @property
  def total_latency_us(self) -> float:
    """Latency per image over all layers, microseconds."""
    return float(self.cost.latency_us.sum())

  @property
  def total_energy_pj(self) -> float:
    """Energy per image over all layers, picojoules."""
    return float(self.cost.energy_pj.sum())


def _summary_row(p: LayerPlan, cost: ScheduleCost) -> dict[str, Any]:
  """One row of :meth:`CimProgram.summary`."""
  i = p.index
  return {
    "index": i,
    "name": p.name,
    "kind": p.kind,
    "w_bits": p.w_bits,
    "a_bits": p.a_bits,
    "slices": p.slices,
    "cycles": p.cycles,
    "tiles": p.total_tiles,
    "tile_grid": [p.row_tiles, p.col_tiles],
    "repeat": p.repeat,
    "dynamic": p.dynamic,
    "exec_cycles": int(cost.exec_cycles[i]),
    "latency_us": float(cost.latency_us[i]),
    "energy_pj": float(cost.energy_pj[i]),
  }


def program_model(program: CimProgram, model: Any = None) -> Any:
  """The :class:`cimjax.models.ModelDef` of a program (rebuilt from its manifest if needed).

  The manifest's ``model`` is the model's reference (a zoo or registered name,
  ``package.module:factory``, ``/abs/path/file.py:factory`` or an ``.onnx`` path), rebuilt by
  :func:`cimjax.models.resolve_model` with the stored ``model_kwargs`` and given the stored
  input shape.

  Raises:
    ProgramError: no model name, the reference cannot be rebuilt (the message says why), or
      the rebuilt model has another number of classes than the program's.
  """
  if model is not None:
    return model
  from cimjax import models as models_lib  # pylint: disable=g-import-not-at-top

  if program.model is None:
    raise ProgramError("program has no model name; pass the model explicitly")
  try:
    md = models_lib.resolve_model(program.model, **program.model_kwargs)
  except (TypeError, ValueError) as e:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ProgramError(
      f"cannot rebuild model {program.model!r} with {program.model_kwargs}: {msg}"
    ) from None
  if program.input_shape and tuple(md.input_shape) != tuple(program.input_shape):
    md = dataclasses.replace(md, input_shape=tuple(program.input_shape))
  got = getattr(md, "num_classes", None)
  if program.num_classes and got and int(got) != int(program.num_classes):
    raise ProgramError(
      f"model {program.model!r} rebuilt with {got} classes; the program was compiled for "
      f"{program.num_classes} (model_kwargs {program.model_kwargs})"
    )
  return md


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def array_sha256(a: np.ndarray) -> str:
  """SHA-256 of an array's dtype, shape and C-order bytes."""
  a = np.ascontiguousarray(a)
  h = hashlib.sha256()
  h.update(f"{a.dtype.str}|{list(a.shape)}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def file_sha256(path: Path) -> str:
  """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _manifest(program: CimProgram) -> dict[str, Any]:
  """The manifest of a program, without the checksums."""
  crossbars, amortize = schedule_params(program.hw)
  c = program.cost
  return {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "model": program.model,
    "model_kwargs": program.model_kwargs,
    "input_shape": list(program.input_shape) if program.input_shape else None,
    "num_classes": program.num_classes,
    "hw": program.hw.to_dict(),
    "input_scheme": program.input_scheme,
    "policy": np.asarray(program.policy).tolist(),
    "schedule": {
      "ops": len(program.schedule),
      "crossbars_per_round": crossbars,
      "amortize": amortize,
      "latency_mode": program.hw.latency_mode,
      "op_names": list(OP_NAMES),
    },
    "layers": [
      dict(
        p.to_dict(),
        latency_us=float(c.latency_us[p.index]),
        energy_pj=float(c.energy_pj[p.index]),
        tiles_programmed=int(c.tiles_programmed[p.index]),
      )
      for p in program.layers
    ],
    "total_latency_us": program.total_latency_us,
    "total_energy_pj": program.total_energy_pj,
  }


def _write_synced(path: Path, mode: str, write: Callable[[IO[Any]], Any]) -> None:
  """Opens ``path`` with ``mode``, calls ``write(f)``, then flushes and fsyncs the file."""
  with open(path, mode) as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())


def _write_files(program: CimProgram, directory: Path) -> None:
  """Writes ``arrays.npz`` and then ``manifest.json`` (with every checksum) into ``directory``."""
  arrays = dict(program.arrays)
  for k in Schedule._fields:
    arrays[f"schedule/{k}"] = getattr(program.schedule, k)
  _write_synced(directory / ARRAYS, "wb", lambda f: np.savez(f, **arrays))
  man = _manifest(program)
  man["arrays"] = {
    k: {"sha256": array_sha256(v), "dtype": np.asarray(v).dtype.str, "shape": list(np.shape(v))}
    for k, v in sorted(arrays.items())
  }
  man["files"] = {ARRAYS: file_sha256(directory / ARRAYS)}
  _write_synced(directory / MANIFEST, "w", lambda f: json.dump(man, f, indent=1))


def _move_into_place(tmp: Path, dest: Path) -> None:
  """Renames ``tmp`` to ``dest``, replacing an existing ``dest`` (removed after the rename)."""
  if dest.exists():
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, dest)


def save_program(program: CimProgram, path: str | os.PathLike[str]) -> Path:
  """Writes a program directory atomically (temporary directory, then rename).

  An existing program directory at ``path`` is replaced; any other existing non-empty
  directory or file is refused.

  Args:
    program: the program.
    path: destination directory.

  Returns:
    The destination path.

  Raises:
    ProgramError: ``path`` exists and is not a program directory.
  """
  dest = Path(path)
  if dest.exists() and not (
    dest.is_dir() and ((dest / MANIFEST).is_file() or not any(dest.iterdir()))
  ):
    raise ProgramError(f"{dest}: exists and is not a program directory; refusing to replace it")
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  try:
    _write_files(program, tmp)
    _move_into_place(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dest


def _read_manifest(mpath: Path) -> dict[str, Any]:
  """The parsed manifest, checked for the format and its version."""
  try:
    man = json.loads(mpath.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ProgramError(f"{mpath}: corrupt manifest: {e}") from None
  if not isinstance(man, dict) or man.get("format") != FORMAT:
    raise ProgramError(f"{mpath}: not a {FORMAT} manifest")
  if man.get("version") != FORMAT_VERSION:
    raise ProgramError(
      f"{mpath}: format version {man.get('version')!r} is not supported (expected {FORMAT_VERSION})"
    )
  return man


def _read_arrays(apath: Path, man: dict[str, Any]) -> dict[str, np.ndarray]:
  """Every array of ``arrays.npz``, after checking the file's and each listed array's SHA-256."""
  want = man["files"][ARRAYS]
  got = file_sha256(apath)
  if got != want:
    raise ProgramError(
      f"{apath}: SHA-256 mismatch (file is corrupt or was modified): "
      f"expected {want[:16]}..., got {got[:16]}..."
    )
  arrays: dict[str, np.ndarray] = {}
  with np.load(apath, allow_pickle=False) as z:
    for k in z.files:
      arrays[k] = z[k]
  for k, meta in man["arrays"].items():
    if k not in arrays:
      raise ProgramError(f"{apath}: array {k!r} listed in the manifest is missing")
    if array_sha256(arrays[k]) != meta["sha256"]:
      raise ProgramError(f"{apath}: array {k!r}: SHA-256 mismatch")
  return arrays


def load_program(path: str | os.PathLike[str]) -> CimProgram:
  """Loads and checks a program directory.

  Verifies the format, the SHA-256 of ``arrays.npz`` and of every array, and recomputes the
  walked cost.

  Raises:
    ProgramError: missing directory or file, unreadable or corrupt JSON/npz, checksum
      mismatch, unsupported format version (the message names the file or array).
  """
  root = Path(path)
  if not root.is_dir():
    raise ProgramError(f"program directory not found: {str(root)!r}")
  mpath, apath = root / MANIFEST, root / ARRAYS
  for p in (mpath, apath):
    if not p.is_file():
      raise ProgramError(f"{root}: missing {p.name} (not a complete cimjax program)")
  man = _read_manifest(mpath)
  try:
    arrays = _read_arrays(apath, man)
    hw = hw_lib.hw_from_dict(man["hw"], origin=str(mpath))
    layers = [LayerPlan.from_dict(d) for d in man["layers"]]
    sched = Schedule(**{k: arrays.pop(f"schedule/{k}").astype(np.int64) for k in Schedule._fields})
  except ProgramError:
    raise
  except hw_lib.HwError as e:
    raise ProgramError(f"{mpath}: {e}") from None
  except (KeyError, TypeError, ValueError, OSError) as e:
    raise ProgramError(f"{root}: corrupt program ({type(e).__name__}: {e})") from None
  return CimProgram(
    hw=hw,
    policy=np.asarray(man["policy"], np.int32),
    layers=layers,
    schedule=sched,
    arrays=arrays,
    input_scheme=man["input_scheme"],
    model=man.get("model"),
    model_kwargs=dict(man.get("model_kwargs") or {}),
    input_shape=tuple(man["input_shape"]) if man.get("input_shape") else None,
    num_classes=int(man["num_classes"]) if man.get("num_classes") else None,
  )


__all__ = [
  "ARRAYS",
  "CimProgram",
  "FORMAT",
  "FORMAT_VERSION",
  "MANIFEST",
  "array_key",
  "array_sha256",
  "file_sha256",
  "load_program",
  "program_model",
  "save_program",
]
