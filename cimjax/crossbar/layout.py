"""Static crossbar configuration and the physical layout of one matrix on it.

:class:`XbarConfig` holds the hardware parameters the simulator needs (a hashable ``jit``
static argument); :class:`Layout` the geometry of one ``n x m`` matrix (physical rows and
columns of its mapping, allocated slices and cycles, row tiles). See :mod:`cimjax.crossbar`
for the numerics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

MAPPINGS: tuple[str, ...] = ("of", "dc", "dr")
INPUT_SCHEMES: tuple[str, ...] = ("twos", "offset")
DEFAULT_MAX_BITS = 8
# Partial sums computed at once before the simulator processes tokens in blocks (lax.map).
DEFAULT_BLOCK_ELEMS = 1 << 23


@dataclasses.dataclass(frozen=True)
class XbarConfig:
  """Static crossbar parameters the simulator needs (hashable: a ``jit`` static argument).

  Attributes:
    rows: N, crossbar rows (input dim).
    cols: M, crossbar columns.
    cell_bits: bits per cell, 1..4 (slice width).
    dac_bits: input bits per cycle, >= 1.
    mapping: ``"of"``, ``"dc"`` or ``"dr"``.
    adc_bits: ADC resolution in bits, or None for an ideal ADC.
    input_scheme: signed-input scheme, ``"twos"`` or ``"offset"`` (see :mod:`cimjax.crossbar`).
  """

  rows: int = 256
  cols: int = 256
  cell_bits: int = 4
  dac_bits: int = 1
  mapping: str = "dc"
  adc_bits: int | None = None
  input_scheme: str = "twos"

  def __post_init__(self):
    for f in ("rows", "cols", "cell_bits", "dac_bits"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"XbarConfig.{f} = {v!r}; allowed: an integer >= 1")
    if self.mapping not in MAPPINGS:
      raise ValueError(f"XbarConfig.mapping = {self.mapping!r}; allowed: {', '.join(MAPPINGS)}")
    if self.input_scheme not in INPUT_SCHEMES:
      raise ValueError(
        f"XbarConfig.input_scheme = {self.input_scheme!r}; allowed: {', '.join(INPUT_SCHEMES)}"
      )
    if self.adc_bits is not None and (
      not isinstance(self.adc_bits, (int, np.integer))
      or isinstance(self.adc_bits, bool)
      or not 1 <= self.adc_bits <= 32
    ):
      raise ValueError(f"XbarConfig.adc_bits = {self.adc_bits!r}; allowed: None or 1..32")

  @classmethod
  def from_hw(cls, hw: Any, **overrides: Any) -> "XbarConfig":
    """The simulator configuration of a :class:`cimjax.hw.HardwareTarget`.

    Args:
      hw: a hardware target (anything with ``rows, cols, cell_bits, dac_bits, mapping,
        adc_bits``).
      **overrides: fields to replace, e.g. ``adc_bits=6`` or ``input_scheme="offset"``.
    """
    kw = {
      f: getattr(hw, f) for f in ("rows", "cols", "cell_bits", "dac_bits", "mapping", "adc_bits")
    }
    kw.update(overrides)
    return cls(**kw)

  def replace(self, **changes: Any) -> "XbarConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static physical layout of one ``n x m`` matrix on a crossbar.

  Attributes:
    cfg: the crossbar configuration.
    n: input dim (logical rows).
    m: output dim (logical columns).
    signed_input: whether the streamed input is signed.
    slices: allocated weight slices ``ceil(max_w_bits / cell_bits)``.
    cycles: allocated input cycles ``ceil(max_a_bits / dac_bits)``.
  """

  cfg: XbarConfig
  n: int
  m: int
  signed_input: bool
  slices: int
  cycles: int

  @property
  def rows_p(self) -> int:
    """Physical rows of the matrix (``2n`` for ``dr``)."""
    return 2 * self.n if self.cfg.mapping == "dr" else self.n

  @property
  def cols_p(self) -> int:
    """Physical columns (``2mS`` for ``dc``, ``mS + 1`` for ``of``, ``mS`` for ``dr``)."""
    c = self.m * self.slices
    if self.cfg.mapping == "dc":
      return 2 * c
    if self.cfg.mapping == "of":
      return c + 1
    return c

  @property
  def row_tiles(self) -> int:
    """``ceil(rows_p / N)``."""
    return -(-self.rows_p // self.cfg.rows)

  @property
  def col_tiles(self) -> int:
    """``ceil(cols_p / M)``."""
    return -(-self.cols_p // self.cfg.cols)

  @property
  def tile_rows(self) -> int:
    """Rows per row tile in the simulator: ``N``, or ``rows_p`` when one tile holds them all."""
    return self.cfg.rows if self.row_tiles > 1 else self.rows_p


def make_layout(
  cfg: XbarConfig,
  n: int,
  m: int,
  *,
  signed_input: bool,
  max_w_bits: int = DEFAULT_MAX_BITS,
  max_a_bits: int = DEFAULT_MAX_BITS,
) -> Layout:
  """The static layout of an ``n x m`` matrix, with slices and cycles for the given maxima."""
  return Layout(
    cfg=cfg,
    n=int(n),
    m=int(m),
    signed_input=bool(signed_input),
    slices=num_slices(int(max_w_bits), cfg.cell_bits),
    cycles=num_cycles(int(max_a_bits), cfg.dac_bits),
  )


def num_slices(w_bits: Any, cell_bits: int) -> Any:
  """``ceil(w_bits / cell_bits)`` for Python ints or (traced) integer arrays."""
  return (w_bits + cell_bits - 1) // cell_bits


def num_cycles(a_bits: Any, dac_bits: int) -> Any:
  """``ceil(a_bits / dac_bits)`` for Python ints or (traced) integer arrays."""
  return (a_bits + dac_bits - 1) // dac_bits


def as_i32(v: Any) -> Array:
  """``v`` (a Python int or traced integer) as an int32 array."""
  return jnp.asarray(v).astype(jnp.int32)


def round_i32(x: Array) -> Array:
  """Integer-valued floats rounded to int32."""
  return jnp.round(x).astype(jnp.int32)


__all__ = [
  "DEFAULT_BLOCK_ELEMS",
  "DEFAULT_MAX_BITS",
  "HIGHEST",
  "INPUT_SCHEMES",
  "Layout",
  "MAPPINGS",
  "XbarConfig",
  "as_i32",
  "make_layout",
  "num_cycles",
  "num_slices",
  "round_i32",
]
