"""Crossbar simulator throughput: ``python -m launch.bench_xbar [--out=FILE.json]``.

Measures, on the default JAX device (CPU unless a GPU is present), in one run:

1. A 256x256 layer (n = m = 256) at 8-bit weights and 8-bit activations on 256x256 crossbars
   with 4-bit cells, a 1-bit DAC and the ``dc`` mapping: 2 slices x 2 (differential) -> 1024
   physical columns = 4 tiles, 8 input cycles. Simulated bit-sliced MVMs per second (one MVM =
   one input vector through the whole layer: 32 tile-cycles), with the ideal ADC, a 6-bit ADC
   and with non-idealities; and the plain integer matmul (float32, HIGHEST) as the reference.
2. One physical 256x256 tile (n = 256, m = 64 logical outputs: 64 x 2 slices x 2 = 256
   columns).
3. A whole ResNet-20 forward pass (32x32x3, uniform 8/8 policy, random weights) with every
   layer on the simulator, against the fake-quantised forward pass (native conv).

Prints a table and writes JSON (``--out``). Times are medians over ``--repeats`` calls after a
warm-up (compile) call. Bad input prints one line ``launch.bench_xbar: error: ...`` on stderr and
exits with status 2.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

from cimjax import cli as cli_lib
from cimjax.errors import CimjaxError

PROG = "launch.bench_xbar"

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
_OUT = flags.DEFINE_string(
  "out", None, "Write the results as JSON to this file.", flag_values=FLAGS
)
_TOKENS = flags.DEFINE_integer(
  "tokens",
  4096,
  "Input vectors per MVM batch (layer benches).",
  lower_bound=1,
  flag_values=FLAGS,
)
_BATCH = flags.DEFINE_integer(
  "batch", 16, "Images per ResNet-20 forward pass.", lower_bound=1, flag_values=FLAGS
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 5, "Timed calls per measurement (median).", lower_bound=1, flag_values=FLAGS
)


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of ``repeats`` further calls)."""
  import jax

  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return first, statistics.median(ts)


def bench_layer(n: int, m: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
  """Simulated vs plain integer MVMs of one ``n x m`` layer."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cimjax import crossbar as xb
  from cimjax.noise import NoiseConfig

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (1, tokens, n)), jnp.float32)
  w = jnp.asarray(rng.integers(-127, 128, (1, n, m)), jnp.float32)
  cfg = xb.XbarConfig(rows=256, cols=256, cell_bits=4, dac_bits=1, mapping="dc")
  lay = xb.make_layout(cfg, n, m, signed_input=False)
  tile_cycles = lay.row_tiles * lay.col_tiles * lay.cycles
  want = np.asarray(jnp.einsum("rtn,rnm->rtm", x, w, precision=jax.lax.Precision.HIGHEST))
  ref = jax.jit(xb.int_matmul)
  cases = [
    ("int matmul (reference)", lambda: ref(x, w), None),
    ("crossbar, ideal ADC", lambda: xb.crossbar_mvm(x, w, 8, 8, cfg, signed_input=False), "exact"),
    (
      "crossbar, 6-bit ADC",
      lambda: xb.crossbar_mvm(x, w, 8, 8, cfg.replace(adc_bits=6), signed_input=False),
      None,
    ),
    (
      "crossbar, 6-bit ADC + noise",
      lambda: xb.crossbar_mvm(
        x,
        w,
        8,
        8,
        cfg.replace(adc_bits=6),
        signed_input=False,
        noise=NoiseConfig(variation=0.05, stuck_at_0=5e-4, stuck_at_1=5e-4, read_noise=0.5),
        prog_key=jax.random.key(0),
        read_key=jax.random.key(1),
      ),
      None,
    ),
  ]
  out = []
  for name, fn, check in cases:
    first, med = _time(fn, repeats)
    if check == "exact":
      assert np.array_equal(np.asarray(fn()), want), "simulator is not bit-exact"
    out.append(
      {
        "bench": f"layer {n}x{m}",
        "case": name,
        "tokens": tokens,
        "tiles": lay.row_tiles * lay.col_tiles,
        "cycles": lay.cycles,
        "compile_s": first,
        "seconds": med,
        "mvm_per_s": tokens / med,
        "tile_cycles_per_s": (tokens * tile_cycles / med) if "crossbar" in name else None,
      }
    )
  return out


def bench_resnet20(batch: int, repeats: int) -> list[dict[str, Any]]:
  """ResNet-20 forward pass: simulated (every layer on crossbars) vs fake-quantised."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cimjax import crossbar as xb
  from cimjax import layers, models, trace

  md = models.get_model("resnet20")
  v = jax.jit(lambda k: md.module.init(k, jnp.zeros((1, 32, 32, 3)), layers.QuantContext()))(
    jax.random.key(0)
  )
  num = len(trace.trace_specs(md))
  pol = np.full((num, 2), 8, np.int32)
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  cfg = xb.XbarConfig(rows=256, cols=256, cell_bits=4, dac_bits=1, mapping="dc")
  hook = xb.make_mvm_hook(cfg, policy=pol, straight_through_grad=False)
  fq = jax.jit(lambda v, x: models.forward(md.module, v, x, jnp.asarray(pol))[0])
  sim = jax.jit(lambda v, x: models.forward(md.module, v, x, jnp.asarray(pol), mvm=hook)[0])
  macs = sum(s.macs for s in trace.trace_specs(md)) * batch
  out = []
  for name, fn in (
    ("fake-quant forward (reference)", lambda: fq(v, x)),
    ("crossbar forward, ideal ADC", lambda: sim(v, x)),
  ):
    first, med = _time(fn, repeats)
    out.append(
      {
        "bench": "resnet20 forward",
        "case": name,
        "batch": batch,
        "compile_s": first,
        "seconds": med,
        "images_per_s": batch / med,
        "gmacs_per_s": macs / med / 1e9,
      }
    )
  a, b = np.asarray(fq(v, x)), np.asarray(sim(v, x))
  out[-1]["max_abs_logit_diff"] = float(np.abs(a - b).max())
  return out


def format_table(rows: list[dict[str, Any]]) -> str:
  """Plain-text table of the results (throughput, and relative to each bench's reference)."""
  head = ("bench", "case", "seconds", "throughput", "vs reference")
  lines = []
  ref: dict[str, float] = {}
  for r in rows:
    if "mvm_per_s" in r:
      thr, unit = r["mvm_per_s"], "MVM/s"
      if r["tile_cycles_per_s"]:
        extra = f" ({r['tile_cycles_per_s']:.3g} tile-cycles/s)"
      else:
        extra = ""
    else:
      thr, unit, extra = r["images_per_s"], "img/s", ""
    if "reference" in r["case"]:
      ref[r["bench"]] = thr
    rel = f"{thr / ref[r['bench']]:.3g}x" if r["bench"] in ref else "-"
    lines.append(
      (r["bench"], r["case"], f"{r['seconds'] * 1e3:.2f} ms", f"{thr:.4g} {unit}{extra}", rel)
    )
  widths = [max(len(h), *(len(l[j]) for l in lines)) for j, h in enumerate(head)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines])


def machine_info() -> dict[str, Any]:
  """Device, JAX version, CPUs and the crossbar configuration of the layer benches."""
  import jax

  dev = jax.devices()[0]
  return {
    "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
    "jax": jax.__version__,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "config": {
      "rows": 256,
      "cols": 256,
      "cell_bits": 4,
      "dac_bits": 1,
      "mapping": "dc",
      "w_bits": 8,
      "a_bits": 8,
    },
  }


def write_json(out: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
  """Writes ``{"meta", "results"}`` to ``out`` atomically; returns its absolute path."""
  path = os.path.abspath(out)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".bench_xbar.", dir=os.path.dirname(path))
  with os.fdopen(fd, "w") as f:
    json.dump({"meta": meta, "results": rows}, f, indent=1)
  os.replace(tmp, path)
  return path


def main(argv: list[str]) -> None:
  """absl entry point."""
  try:
    cli_lib.no_positional(argv)
    rows = []
    rows += bench_layer(256, 256, _TOKENS.value, _REPEATS.value)
    rows += bench_layer(256, 64, _TOKENS.value, _REPEATS.value)
    rows += bench_resnet20(_BATCH.value, _REPEATS.value)
  except CimjaxError as e:
    cli_lib.fail(PROG, e)
  meta = machine_info()
  print(f"device {meta['device']}, jax {meta['jax']}, {meta['cpu_count']} CPUs")
  print(format_table(rows))
  if _OUT.value:
    print(f"wrote {write_json(_OUT.value, meta, rows)}")


def run() -> None:
  """Entry point of ``python -m launch.bench_xbar``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
