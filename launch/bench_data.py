"""Images/s of the streaming input pipeline against the training step: ``python -m
launch.bench_data``.

Generates an image folder in a temporary directory (``--images`` JPEGs of 256..500 px a side,
``--classes`` class folders), opens it with :func:`cimjax.data.open_stream` and, for each
worker count of ``--workers``, times ``--batches`` batches of decode + augment (random resized
crop + flip to ``--crop``; the first batch, which starts the workers, is timed apart). Then it
times the training step of ``--model`` on batches of the same shape (compilation excluded), so
the table says whether the loader keeps up with the step on this machine.

Example::

  python -m launch.bench_data --images=300 --workers=0,1,2 --out=bench_data.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from cimjax import cli as cli_lib
from cimjax import data as data_lib
from cimjax import io
from cimjax.errors import CimjaxError, ConfigError

PROG = "launch.bench_data"

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_integer("images", 300, "JPEGs in the generated folder.", flag_values=FLAGS)
flags.DEFINE_integer("classes", 4, "Class folders of the generated folder.", flag_values=FLAGS)
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to time.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Images a batch (one host, one device).", flag_values=FLAGS)
flags.DEFINE_integer("batches", 8, "Batches timed per worker count.", flag_values=FLAGS)
flags.DEFINE_integer("crop", 224, "Crop side (pixels).", flag_values=FLAGS)
flags.DEFINE_integer("resize", 256, "Evaluation resize side (pixels).", flag_values=FLAGS)
flags.DEFINE_integer("threads", 1, "Decoding threads per worker.", flag_values=FLAGS)
flags.DEFINE_string(
  "model", "small_cnn", "Model whose training step is timed ('' to skip).", flag_values=FLAGS
)
flags.DEFINE_integer(
  "steps", 3, "Training steps timed (after one compiling step).", flag_values=FLAGS
)
flags.DEFINE_string(
  "folder", "", "Use this image folder instead of generating one.", flag_values=FLAGS
)
flags.DEFINE_string("out", "", "Write the results as JSON to this file.", flag_values=FLAGS)


def make_folder(root: Path, images: int, classes: int, seed: int = 0) -> Path:
  """``images`` random JPEGs (256..500 px a side, quality 90) in ``classes`` class folders."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for i in range(images):
    d = root / f"class{i % classes}"
    d.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in rng.integers(256, 501, 2))
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish
    img = np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w]
    Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
  return root


def time_loader(stream: data_lib.TrainStream, workers: int, batches: int) -> dict[str, float]:
  """Images/s of ``batches`` batches with ``workers`` processes (after the first batch)."""
  s = dataclasses.replace(stream, options=dataclasses.replace(stream.options, workers=workers))
  t0 = time.perf_counter()
  with s.iterator(0) as it:
    next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
      next(it)
    t2 = time.perf_counter()
  n = batches * s.host_batch
  return {
    "workers": workers,
    "first_batch_s": round(t1 - t0, 3),
    "images": n,
    "seconds": round(t2 - t1, 3),
    "images_per_s": round(n / max(t2 - t1, 1e-9), 1),
  }


def time_step(model_name: str, shape: Sequence[int], batch: int, steps: int) -> dict[str, Any]:
  """Images/s of the float training step of ``model_name`` on ``[batch, *shape]`` inputs."""
  import jax  # pylint: disable=g-import-not-at-top

  from cimjax import train  # pylint: disable=g-import-not-at-top
  from cimjax.train.config import resolve_model  # pylint: disable=g-import-not-at-top
  from cimjax.variables import init_variables  # pylint: disable=g-import-not-at-top

  model = dataclasses.replace(
    resolve_model(model_name, num_classes=FLAGS.classes), input_shape=tuple(shape)
  )
  tx = train.make_optimizer("adamw", 1e-3, steps + 1)
  trainer = train.Trainer(model, tx)
  v = init_variables(model, jax.random.PRNGKey(0))
  st = train.create_state(v["params"], v.get("batch_stats", {}), tx, jax.random.PRNGKey(1))
  x = np.zeros((batch, *shape), np.float32)
  y = np.zeros((batch,), np.int32)
  t0 = time.perf_counter()
  st, m = trainer.train_step(st, (x, y))
  jax.block_until_ready(m)
  t1 = time.perf_counter()
  for _ in range(steps):
    st, m = trainer.train_step(st, (x, y))
  jax.block_until_ready(m)
  t2 = time.perf_counter()
  return {
    "model": model_name,
    "compile_s": round(t1 - t0, 2),
    "images_per_s": round(steps * batch / max(t2 - t1, 1e-9), 1),
  }


def format_table(result: dict[str, Any]) -> str:
  """The results as a plain-text table."""
  rows = [f"{'workers':>8} {'first batch s':>14} {'images/s':>10} {'vs step':>8}"]
  step = (result.get("step") or {}).get("images_per_s")
  for r in result["loader"]:
    ratio = f"{r['images_per_s'] / step:.2f}x" if step else "-"
    rows.append(f"{r['workers']:>8} {r['first_batch_s']:>14} {r['images_per_s']:>10} {ratio:>8}")
  if step:
    rows.append(f"train step ({result['step']['model']}): {step} images/s")
  return "\n".join(rows)


def _workers() -> list[int]:
  try:
    ws = [int(w) for w in FLAGS.workers]
  except ValueError:
    raise ConfigError(f"--workers={','.join(FLAGS.workers)}; allowed: integers >= 0") from None
  if not ws or min(ws) < 0:
    raise ConfigError(f"--workers={','.join(FLAGS.workers)}; allowed: integers >= 0")
  for f in ("images", "classes", "batch_size", "batches", "crop", "resize", "threads", "steps"):
    if getattr(FLAGS, f) < 1:
      raise ConfigError(f"--{f}={getattr(FLAGS, f)}; allowed: an integer >= 1")
  if FLAGS.images < FLAGS.batch_size * 2:
    raise ConfigError(f"--images={FLAGS.images}; allowed: at least 2 x --batch_size")
  return ws


def main(argv: Sequence[str]) -> None:
  """absl entry point."""
  del argv
  try:
    workers = _workers()
    with tempfile.TemporaryDirectory() as tmp:
      root = (
        Path(FLAGS.folder)
        if FLAGS.folder
        else make_folder(Path(tmp) / "images", FLAGS.images, FLAGS.classes)
      )
      opts = data_lib.StreamOptions(
        crop_size=FLAGS.crop,
        resize_size=FLAGS.resize,
        threads=FLAGS.threads,
        stats_images=16,
        prefetch=2,
      )
      lo = data_lib.LoadOptions(val_fraction=0.0, test_fraction=0.0)
      sd = data_lib.open_stream("folder", root, lo, opts, global_batch=FLAGS.batch_size)
      n_batches = min(FLAGS.batches, sd.stream.steps_per_epoch - 1)
      print(
        f"bench_data: {len(sd.stream)} JPEGs (256..500 px), batch {FLAGS.batch_size}, crop "
        f"{FLAGS.crop}, {os.cpu_count()} CPUs",
        flush=True,
      )
      loader = [time_loader(sd.stream, w, n_batches) for w in workers]
      shape = sd.stream.input_shape
    step = time_step(FLAGS.model, shape, FLAGS.batch_size, FLAGS.steps) if FLAGS.model else None
  except CimjaxError as e:
    cli_lib.fail(PROG, e)
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "cpus": os.cpu_count(),
    "images": FLAGS.images,
    "batch_size": FLAGS.batch_size,
    "crop": FLAGS.crop,
    "threads": FLAGS.threads,
    "loader": loader,
    "step": step,
  }
  print(format_table(result))
  if FLAGS.out:
    io.write_json(FLAGS.out, result)
    print(f"wrote {FLAGS.out}")
  else:
    print(json.dumps(result))


def run() -> None:
  """Entry point of ``python -m launch.bench_data``."""
  app.run(main, flags_parser=cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
