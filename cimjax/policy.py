"""Bit-width policies: arrays, constraints, action masks and CIM-AQ compatible ``.npy`` I/O.

Contract (docs/architecture.md): a policy is an int32 array ``[L, 2]`` of
(weight_bits, activation_bits) in the model's layer (call) order; a batch of candidates is
``[N, L, 2]``. Files are ``.npy`` holding an integer ``[L, 2]`` array exactly like CIM-AQ's
policy files; they are loaded with ``allow_pickle=False``.

Constraints (CIM-AQ's four variants, docs/architecture.md):

- ``"none"``: every layer may take any (w, a) in ``min_bits..max_bits``.
- ``"io"``: the first and last layers are forced to ``io_bits``/``io_bits`` (8/8).
- ``"weight"``: weight bits must be multiples of ``cell_bits``.
- ``"both"``: both of the above (forced layers are exempt from the cell rule).

CIM-AQ's own names (``"no_constraint"``, ``"input_output_constraint"``, ``"weight_constraint"``,
``"both_constraints"``) are accepted as aliases.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cimjax.errors import PolicyError  # noqa: F401 (re-exported)

Constraint = Literal["none", "io", "weight", "both"]
CONSTRAINTS: tuple[str, ...] = ("none", "io", "weight", "both")
_ALIASES = {
  "no_constraint": "none",
  "input_output_constraint": "io",
  "weight_constraint": "weight",
  "both_constraints": "both",
}


def normalize_constraint(constraint: str | None) -> str:
  """Maps ``None`` and CIM-AQ's names to one of :data:`CONSTRAINTS`.

  Raises:
    PolicyError: unknown name (the message lists the allowed ones).
  """
  if constraint is None:
    return "none"
  c = _ALIASES.get(constraint, constraint)
  if c not in CONSTRAINTS:
    allowed = ", ".join(CONSTRAINTS + tuple(_ALIASES))
    raise PolicyError(f"constraint = {constraint!r}; allowed: {allowed}")
  return c


def _check_range(min_bits: int, max_bits: int) -> None:
  if not (isinstance(min_bits, int) and isinstance(max_bits, int)) or not (
    1 <= min_bits <= max_bits
  ):
    raise PolicyError(
      f"bit range {min_bits!r}..{max_bits!r} is invalid; need integers 1 <= min_bits <= max_bits"
    )


def _forced(layer: int, num_layers: int, constraint: str) -> bool:
  return constraint in ("io", "both") and layer in (0, num_layers - 1)


def allowed_bits(
  layer: int,
  num_layers: int,
  constraint: str | None = "none",
  cell_bits: int | None = None,
  min_bits: int = 2,
  max_bits: int = 8,
  io_bits: int = 8,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The weight and activation bit-widths allowed at one layer.

  Args:
    layer: layer index in ``0..num_layers-1``.
    num_layers: L.
    constraint: see the module docstring.
    cell_bits: bits per cell; required by ``"weight"`` and ``"both"``.
    min_bits: smallest bit-width.
    max_bits: largest bit-width.
    io_bits: the bit-width forced on the first and last layers by ``"io"``/``"both"``.

  Returns:
    ``(weight_bits, activation_bits)``, two ascending tuples.

  Raises:
    PolicyError: bad arguments, or no weight bit-width in range is a multiple of
      ``cell_bits``.
  """
  c = normalize_constraint(constraint)
  _check_range(min_bits, max_bits)
  if not 0 <= layer < num_layers:
    raise PolicyError(f"layer {layer} outside 0..{num_layers - 1}")
  if _forced(layer, num_layers, c):
    if not min_bits <= io_bits <= max_bits:
      raise PolicyError(f"io_bits = {io_bits} outside the allowed range {min_bits}..{max_bits}")
    return (io_bits,), (io_bits,)
  a_bits = tuple(range(min_bits, max_bits + 1))
  w_bits = a_bits
  if c in ("weight", "both"):
    if (
      cell_bits is None
      or isinstance(cell_bits, bool)
      or not isinstance(cell_bits, int)
      or (cell_bits < 1)
    ):
      raise PolicyError(f"constraint {c!r} needs cell_bits, an integer >= 1; got {cell_bits!r}")
    w_bits = tuple(b for b in a_bits if b % cell_bits == 0)
    if not w_bits:
      raise PolicyError(
        f"no weight bit-width in {min_bits}..{max_bits} is a multiple of "
        f"cell_bits = {cell_bits} (constraint {c!r})"
      )
  return w_bits, a_bits


def action_mask(
  num_layers: int,
  constraint: str | None = "none",
  cell_bits: int | None = None,
  min_bits: int = 2,
  max_bits: int = 8,
  io_bits: int = 8,
) -> np.ndarray:
  """The allowed (w, a) pairs of every layer.

  Args:
    num_layers: L >= 1.
    constraint: ``"none"``, ``"io"``, ``"weight"`` or ``"both"`` (or a CIM-AQ alias).
    cell_bits: required by ``"weight"`` and ``"both"``.
    min_bits: smallest bit-width.
    max_bits: B, largest bit-width.
    io_bits: bits forced on the first and last layer by ``"io"`` and ``"both"``.

  Returns:
    bool ``[L, B, B]``; ``[l, w - 1, a - 1]`` is True iff (w, a) is allowed at layer ``l``.
    The mask of each layer is a product of a weight set and an activation set.

  Raises:
    PolicyError: bad arguments or an empty set of allowed weight bits.
  """
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
    raise PolicyError(f"num_layers = {num_layers!r}; allowed: an integer >= 1")
  mask = np.zeros((num_layers, max_bits, max_bits), dtype=bool)
  for l in range(num_layers):
    w_bits, a_bits = allowed_bits(l, num_layers, constraint, cell_bits, min_bits, max_bits, io_bits)
    mask[l, np.asarray(w_bits)[:, None] - 1, np.asarray(a_bits)[None, :] - 1] = True
  return mask


def _layer_label(l: int, layer_names: Sequence[str] | None) -> str:
  if layer_names is not None and l < len(layer_names):
    return f"layer {l} ({layer_names[l]})"
  return f"layer {l}"


def validate_policy(
  policy: Any,
  num_layers: int | None = None,
  *,
  min_bits: int = 2,
  max_bits: int = 8,
  layer_names: Sequence[str] | None = None,
  constraint: str | None = None,
  cell_bits: int | None = None,
  io_bits: int = 8,
) -> np.ndarray:
  """Checks a policy and returns it as an int32 ``[L, 2]`` NumPy array.

  Args:
    policy: array-like ``[L, 2]`` of (weight bits, activation bits). Integer dtypes, or floats
      holding whole numbers.
    num_layers: expected L, or None to accept any L >= 1.
    min_bits: smallest allowed bit-width.
    max_bits: largest allowed bit-width.
    layer_names: optional names, used in error messages.
    constraint: optional constraint (see the module docstring).
    cell_bits: bits per cell, required by the ``"weight"``/``"both"`` constraints.
    io_bits: bits forced on the first and last layers by ``"io"``/``"both"``.

  Returns:
    The policy, int32 ``[L, 2]``.

  Raises:
    PolicyError: naming the offending layer (index and name) and the allowed values, e.g.
      ``"layer 3 (block1/conv_a): weight bits 9 outside the allowed range 2..8"``.
  """
  _check_range(min_bits, max_bits)
  arr = _as_policy_array(policy, num_layers)
  _check_bit_values(arr, min_bits, max_bits, layer_names)
  out = arr.astype(np.int32)
  c = normalize_constraint(constraint)
  if c != "none":
    _check_constraint(out, c, cell_bits, min_bits, max_bits, io_bits, layer_names)
  return out


def _as_policy_array(policy: Any, num_layers: int | None) -> np.ndarray:
  """The policy as a NumPy array of shape ``[L, 2]`` (``L = num_layers`` when given)."""
  try:
    arr = np.asarray(policy)
  except Exception as e:  # ragged lists and the like
    raise PolicyError(f"policy is not an array: {e}") from None
  if arr.dtype == object or not (
    np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
  ):
    raise PolicyError(f"policy must hold integers, got dtype {arr.dtype}")
  expected = f"[{num_layers}, 2]" if num_layers is not None else "[L, 2]"
  if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
    raise PolicyError(
      f"policy has shape {list(arr.shape)}; expected {expected} "
      f"(weight bits, activation bits) per layer"
    )
  if num_layers is not None and arr.shape[0] != num_layers:
    raise PolicyError(
      f"policy has {arr.shape[0]} layers; the model has {num_layers} (expected shape {expected})"
    )
  return arr


_KINDS = ("weight", "activation")


def _check_bit_values(
  arr: np.ndarray, min_bits: int, max_bits: int, layer_names: Sequence[str] | None
) -> None:
  """Whole numbers within ``min_bits..max_bits``; the first offending entry is named."""
  if np.issubdtype(arr.dtype, np.floating):
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
      l, j = map(int, np.argwhere(bad)[0])
      raise PolicyError(
        f"{_layer_label(l, layer_names)}: {_KINDS[j]} bits {float(arr[l, j])} is not an integer"
      )
  for l in range(arr.shape[0]):
    for j in range(2):
      v = arr[l, j]
      if not min_bits <= v <= max_bits:
        raise PolicyError(
          f"{_layer_label(l, layer_names)}: {_KINDS[j]} bits {int(v)} outside "
          f"the allowed range {min_bits}..{max_bits}"
        )


def _check_constraint(
  out: np.ndarray,
  c: str,
  cell_bits: int | None,
  min_bits: int,
  max_bits: int,
  io_bits: int,
  layer_names: Sequence[str] | None,
) -> None:
  """Every layer's bits among those the constraint ``c`` allows."""
  num = out.shape[0]
  for l in range(num):
    w_ok, a_ok = allowed_bits(l, num, c, cell_bits, min_bits, max_bits, io_bits)
    w, a = int(out[l, 0]), int(out[l, 1])
    if w in w_ok and a in a_ok:
      continue
    label = _layer_label(l, layer_names)
    if _forced(l, num, c):
      raise PolicyError(
        f"{label}: bits ({w}, {a}) violate constraint {c!r}: the first and "
        f"last layers must be ({io_bits}, {io_bits})"
      )
    raise PolicyError(
      f"{label}: weight bits {w} violate constraint {c!r}: allowed weight "
      f"bits {', '.join(map(str, w_ok))} (multiples of cell_bits = "
      f"{cell_bits})"
    )


def uniform_policy(num_layers: int, w_bits: int = 8, a_bits: int = 8) -> np.ndarray:
  """Every layer at (``w_bits``, ``a_bits``): int32 ``[L, 2]``."""
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
    raise PolicyError(f"num_layers = {num_layers!r}; allowed: an integer >= 1")
  return np.tile(np.asarray([[w_bits, a_bits]], dtype=np.int32), (num_layers, 1))


@functools.partial(jax.jit, static_argnames=("n",))
def random_policies(key: jax.Array, mask: Any, n: int) -> jax.Array:
  """Samples policies, each layer's (w, a) pair independently.

  Jitted, with ``n`` static; it can be called inside other jitted code.

  Args:
    key: PRNG key.
    mask: bool ``[L, B, B]`` allowed pairs (see :func:`action_mask`): each layer's pair is then
      uniform over its allowed ones. Or non-negative float weights ``[L, B, B]``: each layer's
      pair is drawn with probability proportional to its weight. Every layer needs an allowed
      (positive) pair.
    n: number of policies.

  Returns:
    int32 ``[n, L, 2]``.
  """
  mask = jnp.asarray(mask)
  num_layers, b1, b2 = mask.shape
  flat = mask.reshape(num_layers, b1 * b2)
  if flat.dtype == jnp.bool_:
    logits = jnp.where(flat, 0.0, -jnp.inf)
  else:
    w = flat.astype(jnp.float32)
    logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
  idx = jax.random.categorical(key, logits, axis=-1, shape=(n, num_layers))
  w_bits = idx // b2 + 1
  a_bits = idx % b2 + 1
  return jnp.stack([w_bits, a_bits], axis=-1).astype(jnp.int32)


def load_policy(
  path: str | os.PathLike[str], num_layers: int | None = None, **validate_kwargs: Any
) -> np.ndarray:
  """Loads a CIM-AQ style ``.npy`` policy (no pickles) and validates it.

  Args:
    path: ``.npy`` file holding an integer ``[L, 2]`` array.
    num_layers: expected L, or None.
    **validate_kwargs: passed on to :func:`validate_policy` (``min_bits``, ``max_bits``,
      ``layer_names``, ``constraint``, ``cell_bits``, ``io_bits``).

  Returns:
    int32 ``[L, 2]``.

  Raises:
    PolicyError: missing or unreadable file, pickled/object data, or an invalid policy.
  """
  p = Path(path)
  if not p.is_file():
    raise PolicyError(f"policy file not found: {str(p)!r}")
  try:
    arr = np.load(p, allow_pickle=False)
  except ValueError as e:
    raise PolicyError(
      f"{p}: not a plain .npy integer array (pickled or object data is refused): {e}"
    ) from None
  except OSError as e:
    raise PolicyError(f"{p}: cannot read policy: {e}") from None
  if not isinstance(arr, np.ndarray):  # e.g. an .npz archive
    close = getattr(arr, "close", None)
    if close is not None:
      close()
    raise PolicyError(f"{p}: expected a .npy array, got {type(arr).__name__}")
  try:
    return validate_policy(arr, num_layers, **validate_kwargs)
  except PolicyError as e:
    raise PolicyError(f"{p}: {e}") from None


def save_policy(path: str | os.PathLike[str], policy: Any) -> Path:
  """Saves a policy as ``.npy`` (int64 ``[L, 2]``, as CIM-AQ writes them), atomically.

  The array is written to a temporary file in the same directory and renamed over ``path``,
  so a crash never leaves half a file. ``path`` is used as given (no ``.npy`` is appended).

  Args:
    path: destination file.
    policy: ``[L, 2]`` integer policy (shape and integrality are checked; bits in 1..64).

  Returns:
    The destination path.
  """
  arr = validate_policy(policy, None, min_bits=1, max_bits=64).astype(np.int64)
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, arr, allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return p
