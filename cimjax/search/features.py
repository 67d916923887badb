"""Layer and option features the agents condition on.

- :func:`layer_features` / :func:`option_features`: geometry plus hardware-cost features for
  the policy-gradient agent (CIM-AQ's state has none of the latter): each layer's
  share of the 8/8 latency, the latency saved per weight bit and per activation bit, tiles,
  layer type and position; per option (a weight or activation bit-width of a layer), the
  share of the total 8/8 latency that choosing it saves.
- :func:`haq_features`: CIM-AQ/HAQ's 10 state features per step (two steps per free layer:
  weight, then activation), min-max normalised per column, for the reference DDPG agent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cimjax.search import space as space_lib
from cimjax.spec import LayerSpec

KINDS = ("Conv2D", "Dense", "MatMul")
NUM_LAYER_FEATURES = 14
NUM_OPTION_FEATURES = 3
NUM_HAQ_FEATURES = 10


def _minmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  lo, hi = x.min(), x.max()
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def layer_features(
  specs: Sequence[LayerSpec],
  table: np.ndarray,
  space: space_lib.SearchSpace,
  tiles: np.ndarray | None = None,
) -> np.ndarray:
  """Per-layer features for the PG agent's prior network.

  Args:
    specs: ``L`` layer specs.
    table: ``[L, 8, 8]`` cost (latency) table.
    space: the search space.
    tiles: optional ``[L, 8, 8]`` tile table (``CostTables.tiles``).

  Returns:
    float32 ``[L, 14]``: latency share at 8/8, min-max normalised log latency at 8/8, latency
    saved per weight bit and per activation bit (relative to the 8/8 total, times L), log
    tiles at 8 bits (normalised), layer type one-hot (3), position in the network,
    normalised log weight count, signed input, forced (single option), first, last.
  """
  t = np.asarray(table, np.float64)
  num = t.shape[0]
  lat8 = t[:, 7, 7]
  total = lat8.sum()
  w_lo = np.asarray([o.min() for o in space.w_options])
  a_lo = np.asarray([o.min() for o in space.a_options])
  l = np.arange(num)
  save_w = (lat8 - t[l, w_lo - 1, 7]) / np.maximum(8 - w_lo, 1) / total * num
  save_a = (lat8 - t[l, 7, a_lo - 1]) / np.maximum(8 - a_lo, 1) / total * num
  tl = np.log(np.asarray(tiles, np.float64)[:, 7, 7]) if tiles is not None else np.zeros(num)
  kind = np.zeros((num, len(KINDS)))
  for i, s in enumerate(specs):
    kind[i, KINDS.index(s.kind) if s.kind in KINDS else 0] = 1.0
  pos = l / max(num - 1, 1)
  wc = np.log(np.asarray([max(s.weight_count, 1) for s in specs], np.float64))
  signed = np.asarray([float(s.signed_input) for s in specs])
  forced = (space.options_per_layer == 1).astype(np.float64)
  first = (l == 0).astype(np.float64)
  last = (l == num - 1).astype(np.float64)
  feats = np.stack(
    [
      lat8 / total,
      _minmax(np.log(np.maximum(lat8, 1e-12))),
      save_w,
      save_a,
      _minmax(tl),
      kind[:, 0],
      kind[:, 1],
      kind[:, 2],
      pos,
      _minmax(wc),
      signed,
      forced,
      first,
      last,
    ],
    axis=1,
  )
  return feats.astype(np.float32)


def option_features(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-option features: what each bit-width choice saves.

  Args:
    table: ``[L, 8, 8]`` cost (latency) table.

  Returns:
    ``(w_feats [L, 8, 3], a_feats [L, 8, 3], wa_feats [L, 64, 3])`` float32: the latency saved
    by the option relative to the 8/8 total (times L), the bit-width / 8, and the saving
    relative to the layer's own 8/8 latency. Weight options keep a = 8 and activation options
    w = 8; joint (w, a) options are flattened ``w * 8 + a`` (0-based).
  """
  t = np.asarray(table, np.float64)
  num = t.shape[0]
  lat8 = t[:, 7, 7]
  total = lat8.sum()
  bits = np.arange(1, 9, dtype=np.float64)
  sw = lat8[:, None] - t[:, :, 7]
  sa = lat8[:, None] - t[:, 7, :]
  sj = (lat8[:, None, None] - t).reshape(num, 64)
  own = np.maximum(lat8, 1e-12)
  w_feats = np.stack(
    [sw / total * num, np.broadcast_to(bits / 8, sw.shape), sw / own[:, None]], axis=-1
  )
  a_feats = np.stack(
    [sa / total * num, np.broadcast_to(bits / 8, sa.shape), sa / own[:, None]], axis=-1
  )
  jb = (np.add.outer(bits, bits) / 16).reshape(64)
  wa_feats = np.stack([sj / total * num, np.broadcast_to(jb, sj.shape), sj / own[:, None]], axis=-1)
  return w_feats.astype(np.float32), a_feats.astype(np.float32), wa_feats.astype(np.float32)


def haq_layer_type(spec: LayerSpec) -> int:
  """CIM-AQ/HAQ's layer type code: 0 conv, 1 depthwise conv, 2 fully connected, 3 MatMul."""
  if spec.kind == "Conv2D":
    return 1 if spec.groups > 1 and spec.groups == spec.in_channels else 0
  return 2 if spec.kind == "Dense" else 3


def haq_steps(space: space_lib.SearchSpace) -> list[tuple[int, int]]:
  """The DDPG episode: ``(layer, 0 = weight | 1 = activation)`` for every free decision.

  Forced layers (a single option) and single-option halves are skipped: they are not part of
  the action space (CIM-AQ overwrote them after the episode instead).
  """
  steps = []
  for l in range(space.num_layers):
    if len(space.w_options[l]) > 1:
      steps.append((l, 0))
    if len(space.a_options[l]) > 1:
      steps.append((l, 1))
  return steps


def haq_features(specs: Sequence[LayerSpec], space: space_lib.SearchSpace) -> np.ndarray:
  """CIM-AQ's 10 state features for every step of an episode.

  Columns: layer type, in channels, out channels, stride, kernel size, number of weights,
  input feature-map size, layer index, previous action (bits / max_bits; filled during the
  episode, 0 here), and the weight/activation flag (1 = weight step, 0 = activation step; the
  reference inverts it after layer 0; this is the intended meaning). Columns 1-8
  are min-max normalised over the steps, as in the reference.

  Returns:
    float32 ``[S, 10]`` with ``S = len(haq_steps(space))``.
  """
  steps = haq_steps(space)
  rows = []
  for l, kind in steps:
    s = specs[l]
    rows.append(
      [
        haq_layer_type(s),
        s.in_channels,
        s.out_channels,
        s.stride,
        s.kernel[0],
        s.weight_count,
        s.input_size,
        l,
        0.0,
        1.0 if kind == 0 else 0.0,
      ]
    )
  f = np.asarray(rows, np.float64).reshape(len(steps), NUM_HAQ_FEATURES)
  for j in range(8):
    f[:, j] = _minmax(f[:, j]) if len(steps) else f[:, j]
  return f.astype(np.float32)


__all__ = [
  "KINDS",
  "NUM_HAQ_FEATURES",
  "NUM_LAYER_FEATURES",
  "NUM_OPTION_FEATURES",
  "haq_features",
  "haq_layer_type",
  "haq_steps",
  "layer_features",
  "option_features",
]
