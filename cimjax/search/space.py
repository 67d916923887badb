"""The search space: allowed (w, a) bits per layer, option indexing and policy keys.

A :class:`SearchSpace` is built from :func:`cimjax.policy.action_mask` (the four CIM-AQ
constraint variants and the bit bounds) and padded to the cost tables' ``B`` (8). Each layer's
allowed set is a product ``W_l x A_l`` of weight and activation bit-widths; layers forced to
``io_bits``/``io_bits`` by the ``"io"``/``"both"`` constraints have a single option, so every
agent samples them only at that value (they are masked out of the action space, not overwritten
after the fact as in CIM-AQ).

Policies are hashed exactly by :func:`policy_keys`: each layer's pair becomes a 6-bit code
``(w - 1) * 8 + (a - 1)`` and five codes are packed into one int32 word, so two policies are
equal iff their keys are equal. The keys serve the evaluation cache in and out of ``jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimjax import policy as policy_lib

Array = Any
TABLE_BITS = 8  # B of the cost tables: bits 1..8
CODES_PER_WORD = 5  # 5 x 6 bits = 30 bits per int32 key word


@dataclasses.dataclass(frozen=True, eq=False)
class SearchSpace:
  """Allowed bit-widths of every layer.

  Attributes:
    num_layers: L.
    constraint: ``"none"``, ``"io"``, ``"weight"`` or ``"both"``.
    cell_bits: bits per cell (the ``"weight"``/``"both"`` rule), or None.
    min_bits: smallest bit-width.
    max_bits: largest bit-width.
    io_bits: bits forced on the first and last layers by ``"io"``/``"both"``.
    mask: bool ``[L, 8, 8]``; ``[l, w - 1, a - 1]`` is True iff (w, a) is allowed at layer l.
    w_mask: bool ``[L, 8]`` allowed weight bits (``[l, w - 1]``).
    a_mask: bool ``[L, 8]`` allowed activation bits.
  """

  num_layers: int
  constraint: str
  cell_bits: int | None
  min_bits: int
  max_bits: int
  io_bits: int
  mask: np.ndarray
  w_mask: np.ndarray
  a_mask: np.ndarray

  @property
  def w_options(self) -> list[np.ndarray]:
    """Per layer, the allowed weight bits (ascending int arrays)."""
    return [np.flatnonzero(r) + 1 for r in self.w_mask]

  @property
  def a_options(self) -> list[np.ndarray]:
    """Per layer, the allowed activation bits (ascending int arrays)."""
    return [np.flatnonzero(r) + 1 for r in self.a_mask]

  @property
  def options_per_layer(self) -> np.ndarray:
    """int64 ``[L]``: number of allowed (w, a) pairs of each layer."""
    return self.mask.reshape(self.num_layers, -1).sum(axis=1).astype(np.int64)

  @property
  def free_layers(self) -> np.ndarray:
    """Indices of layers with more than one option."""
    return np.flatnonzero(self.options_per_layer > 1)

  @property
  def size(self) -> int:
    """Number of distinct policies in the space (a Python int, may be huge)."""
    return math.prod(int(k) for k in self.options_per_layer)

  @property
  def num_key_words(self) -> int:
    """K, int32 words of a policy key."""
    return -(-self.num_layers // CODES_PER_WORD)

  def reference_policy(self) -> np.ndarray:
    """The uniform ``io_bits``/``io_bits`` policy (CIM-AQ's INT8 reference), int32 ``[L, 2]``.

    It is the accuracy reference (``acc_int8``) and the cost baseline; it need not lie in the
    space (e.g. with the cell rule and ``io_bits`` not a multiple of ``cell_bits``).
    """
    return policy_lib.uniform_policy(self.num_layers, self.io_bits, self.io_bits)

  def contains(self, policies: Array) -> np.ndarray:
    """bool ``[N]``: whether each policy of ``[N, L, 2]`` lies in the space (NumPy)."""
    p = np.asarray(policies)
    if p.ndim == 2:
      p = p[None]
    w, a = p[..., 0].astype(np.int64), p[..., 1].astype(np.int64)
    ok = (w >= 1) & (w <= TABLE_BITS) & (a >= 1) & (a <= TABLE_BITS)
    l = np.arange(self.num_layers)[None]
    inside = self.mask[l, np.clip(w, 1, TABLE_BITS) - 1, np.clip(a, 1, TABLE_BITS) - 1]
    return (ok & inside).all(axis=1)

  def check(self, policies: Array, layer_names: list[str] | None = None) -> None:
    """Raises :class:`cimjax.policy.PolicyError` naming the first policy/layer outside."""
    p = np.asarray(policies)
    if p.ndim == 2:
      p = p[None]
    if p.ndim != 3 or p.shape[1:] != (self.num_layers, 2):
      raise policy_lib.PolicyError(
        f"policies have shape {list(p.shape)}; expected [N, {self.num_layers}, 2]"
      )
    bad = ~self.contains(p)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      for l in range(self.num_layers):
        w, a = int(p[i, l, 0]), int(p[i, l, 1])
        if not (1 <= w <= TABLE_BITS and 1 <= a <= TABLE_BITS and self.mask[l, w - 1, a - 1]):
          name = f"layer {l}" + (f" ({layer_names[l]})" if layer_names else "")
          raise policy_lib.PolicyError(
            f"candidate {i}, {name}: bits ({w}, {a}) are outside the search space "
            f"(constraint {self.constraint!r}, bits {self.min_bits}..{self.max_bits}; "
            f"allowed w {self.w_options[l].tolist()}, a {self.a_options[l].tolist()})"
          )

  def describe(self) -> dict[str, Any]:
    """JSON-ready summary."""
    return {
      "num_layers": self.num_layers,
      "constraint": self.constraint,
      "cell_bits": self.cell_bits,
      "min_bits": self.min_bits,
      "max_bits": self.max_bits,
      "io_bits": self.io_bits,
      "size": float(self.size),
      "w_options": [o.tolist() for o in self.w_options],
      "a_options": [o.tolist() for o in self.a_options],
    }


def make_space(
  num_layers: int,
  constraint: str | None = "none",
  cell_bits: int | None = None,
  min_bits: int = 2,
  max_bits: int = 8,
  io_bits: int | None = None,
) -> SearchSpace:
  """Builds the search space of one model and constraint.

  Args:
    num_layers: L.
    constraint: ``"none"``, ``"io"``, ``"weight"``, ``"both"`` or a CIM-AQ alias.
    cell_bits: bits per cell, required by ``"weight"``/``"both"`` (the target's ``cell_bits``).
    min_bits: smallest bit-width (default 2, as CIM-AQ's configs).
    max_bits: largest bit-width, at most 8 (the cost tables' size).
    io_bits: bits forced on the first/last layer (default ``max_bits``: CIM-AQ's 8/8).

  Returns:
    The :class:`SearchSpace`.

  Raises:
    cimjax.policy.PolicyError: bad bounds or constraint (the message names the argument).
  """
  c = policy_lib.normalize_constraint(constraint)
  if not isinstance(max_bits, int) or max_bits > TABLE_BITS:
    raise policy_lib.PolicyError(f"max_bits = {max_bits!r}; allowed: an integer <= {TABLE_BITS}")
  io = max_bits if io_bits is None else io_bits
  cb = cell_bits if c in ("weight", "both") else None
  mask = policy_lib.action_mask(
    num_layers, c, cell_bits=cb, min_bits=min_bits, max_bits=max_bits, io_bits=io
  )
  pad = TABLE_BITS - mask.shape[1]
  if pad:
    mask = np.pad(mask, ((0, 0), (0, pad), (0, pad)))
  return SearchSpace(
    num_layers=num_layers,
    constraint=c,
    cell_bits=cb,
    min_bits=min_bits,
    max_bits=max_bits,
    io_bits=io,
    mask=mask,
    w_mask=mask.any(axis=2),
    a_mask=mask.any(axis=1),
  )


def policy_keys(policies: Array, xp: Any = jnp) -> Array:
  """Exact int32 keys of policies (equal keys iff equal policies).

  Args:
    policies: int ``[..., L, 2]`` with bits in 1..8.
    xp: ``jax.numpy`` (jittable) or ``numpy``.

  Returns:
    int32 ``[..., K]`` with ``K = ceil(L / 5)``.
  """
  p = xp.asarray(policies).astype(xp.int32)
  codes = (p[..., 0] - 1) * TABLE_BITS + (p[..., 1] - 1)  # [..., L] in 0..63
  num_layers = codes.shape[-1]
  k = -(-num_layers // CODES_PER_WORD)
  pad = k * CODES_PER_WORD - num_layers
  if pad:
    codes = xp.concatenate([codes, xp.zeros(codes.shape[:-1] + (pad,), xp.int32)], axis=-1)
  codes = codes.reshape(codes.shape[:-1] + (k, CODES_PER_WORD))
  scale = xp.asarray([64**j for j in range(CODES_PER_WORD)], xp.int32)
  return (codes * scale).sum(axis=-1).astype(xp.int32)


def policy_bytes(policy: Array) -> bytes:
  """Host cache key of one policy ``[L, 2]``."""
  return np.ascontiguousarray(np.asarray(policy), dtype=np.int8).tobytes()


def option_indices(space: SearchSpace, policies: Array, xp: Any = jnp) -> Array:
  """Mixed-radix index of each policy in the enumeration order of :func:`enumerate_policies`.

  Args:
    space: the search space.
    policies: int ``[..., L, 2]`` inside the space.
    xp: ``jax.numpy`` or ``numpy``.

  Returns:
    int64 (NumPy) or int32 (JAX; the space must have fewer than 2^31 policies) ``[...]``.
  """
  idt = np.int64 if xp is np else jnp.int32
  flat = space.mask.reshape(space.num_layers, -1)
  # rank of each allowed pair within its layer: [L, 64], -1 where not allowed
  ranks = np.where(flat, np.cumsum(flat, axis=1) - 1, -1)
  radix = space.options_per_layer
  strides = np.concatenate([np.cumprod(radix[::-1])[::-1][1:], [1]]).astype(np.int64)
  p = xp.asarray(policies).astype(idt)
  code = (p[..., 0] - 1) * TABLE_BITS + (p[..., 1] - 1)
  r = xp.asarray(ranks.astype(np.int64 if xp is np else np.int32))[
    xp.arange(space.num_layers), code
  ]
  return (r * xp.asarray(strides.astype(np.int64 if xp is np else np.int32))).sum(axis=-1)


def enumerate_policies(space: SearchSpace, start: int, count: int) -> np.ndarray:
  """Policies ``start .. start + count - 1`` of the space in mixed-radix order (NumPy).

  Layer 0 is the most significant digit; within a layer, pairs are ordered by (w, a).

  Returns:
    int32 ``[n, L, 2]`` with ``n = min(count, size - start)``.
  """
  size = space.size
  idx = np.arange(start, min(start + count, size), dtype=np.int64)
  flat = space.mask.reshape(space.num_layers, -1)
  pairs = [np.flatnonzero(r) for r in flat]
  out = np.zeros((idx.shape[0], space.num_layers, 2), np.int32)
  rem = idx.copy()
  for l in range(space.num_layers - 1, -1, -1):
    k = len(pairs[l])
    digit = rem % k
    rem //= k
    code = pairs[l][digit]
    out[:, l, 0] = code // TABLE_BITS + 1
    out[:, l, 1] = code % TABLE_BITS + 1
  return out


def enumerate_policies_jnp(space: SearchSpace, index: jax.Array) -> jax.Array:
  """Jittable :func:`enumerate_policies` for int32 indices ``[N]`` (space < 2^31)."""
  flat = space.mask.reshape(space.num_layers, -1)
  width = int(flat.sum(axis=1).max())
  pairs = np.zeros((space.num_layers, width), np.int32)
  for l, r in enumerate(flat):
    nz = np.flatnonzero(r)
    pairs[l, : len(nz)] = nz
  radix = space.options_per_layer.astype(np.int32)
  rem = index.astype(jnp.int32)
  digits = []
  for l in range(space.num_layers - 1, -1, -1):
    digits.append(rem % int(radix[l]))
    rem = rem // int(radix[l])
  digits = jnp.stack(digits[::-1], axis=-1)  # [N, L]
  code = jnp.asarray(pairs)[jnp.arange(space.num_layers), digits]
  return jnp.stack([code // TABLE_BITS + 1, code % TABLE_BITS + 1], axis=-1).astype(jnp.int32)
