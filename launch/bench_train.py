"""Training throughput (img/s) of cimjax against PyTorch, with a breakdown of cimjax's step:
``python -m launch.bench_train``.

Measures, on synthetic 28x28x1 images (batch 128 by default), after warm-up:

* **fp32**: the real fp32-stage step (:func:`cimjax.train.steps.train_step`, jitted exactly as
  a stage runs it, the default run's AdamW with warmup + cosine schedule and kernel-only weight
  decay) and, back to back with it, the same CNN in PyTorch (``nn.Module``, ``torch.optim.AdamW``,
  ``torch.set_num_threads(--torch_threads)``), and the same step with the max pools'
  gradient computed by :func:`max_pool_2x2` (bit-identical parameters, checked in the run);
* **breakdown** of the cimjax step, each part jitted and timed alone with
  ``block_until_ready``: forward only, forward+backward (``jax.value_and_grad``), the optimizer
  update alone, the step with the train state donated, a plain-JAX CNN (``lax.conv`` with no
  cimjax machinery) at default and ``HIGHEST`` precision, and the host work of one step of
  :func:`cimjax.train.fit` (the batch gather from an in-memory 55,000-image split, the
  ``device_put`` of the batch, the metrics fetch) plus :func:`fit` itself end to end; and the
  step's big ops alone (each conv's forward, input and filter gradient and the two operand
  transposes XLA:CPU puts before the filter gradient, each ReLU + max pool's gradient with
  ``nn.max_pool`` and with :func:`max_pool_2x2`, the first dense layer), and with ``--torch``
  the same ops in PyTorch on the same operands, side by side (the ratio column is PyTorch's
  time over cimjax's: below 1 where PyTorch's kernel is faster);
* **stages**: img/s of the step of every training stage with the default run's settings
  (fp32, int8 at 8/8, anyprec's sandwich step, finetune on a mixed policy) for the ``--arch``
  model, built as :mod:`cimjax.train.stages` builds them (``--arch=default``: the default run's
  own model).

Every figure is the median over ``--repeats`` rounds; the cimjax and PyTorch steps run back to
back within a round (a shared CPU's load changes between rounds). The load average is recorded.

Models (``--arch``): ``reference``, the reference work's CNN (conv 1->32, conv 32->64 + pool,
conv 64->128 + pool, dense 6272->256, dense 256->10; built here from cimjax's QuantConv /
QuantDense: the zoo's ``small_cnn`` pools after every conv, so with ``channels=(32, 64, 128)``
its dense layer is 1152->256, not 6272->256); ``zoo`` (``small_cnn`` with those channels);
``default`` (the default run's ``small_cnn``, 16-32-32 / 64).

Example::

  python -m launch.bench_train                      # 3-4 minutes on a shared 2-core CPU
  python -m launch.bench_train --parts=train --repeats=5 --out=bench_train.json
  python -m launch.bench_train --xla_flags=--xla_cpu_multi_thread_eigen=false
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from cimjax import cli as cli_lib
from cimjax.layers import QuantContext, QuantConv, QuantDense
from cimjax.models import ModelDef, get_model
from cimjax.models.pooling import max_pool_2x2
from cimjax.trace import trace_specs

PROG = "launch.bench_train"
ARCHS = ("reference", "zoo", "default")
PARTS = ("train", "breakdown", "stages")
STAGE_NAMES = ("fp32", "int8", "anyprec", "finetune")
# the default run's fine-tuned policy (BUILD_NOTES.md, "The main job end to end")
FINETUNE_POLICY = ((8, 8), (4, 4), (4, 4), (2, 6), (8, 8))

FLAGS = flags.FlagValues()  # this CLI's own registry (see cimjax.cli)
flags.DEFINE_enum(
  "arch", "reference", ARCHS, "The CNN (see the module docstring).", flag_values=FLAGS
)
flags.DEFINE_integer("batch_size", 128, "Images a step.", flag_values=FLAGS)
flags.DEFINE_integer(
  "steps",
  5,
  "Timed steps per measurement (breakdown and stage rows: half, at least 2).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("warmup", 1, "Untimed steps before each measurement.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Rounds; figures are medians over them.", flag_values=FLAGS)
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.", flag_values=FLAGS)
flags.DEFINE_list("parts", list(PARTS), f"Subset of: {', '.join(PARTS)}.", flag_values=FLAGS)
flags.DEFINE_list(
  "stages",
  list(STAGE_NAMES),
  f"Stages timed by the stages part, of {', '.join(STAGE_NAMES)}.",
  flag_values=FLAGS,
)
flags.DEFINE_bool("torch", True, "Time the PyTorch reference (train part).", flag_values=FLAGS)
flags.DEFINE_string(
  "xla_flags",
  "",
  "Appended to XLA_FLAGS before JAX starts (e.g. CPU runtime flags).",
  flag_values=FLAGS,
)
flags.DEFINE_string("out", "", "Write the results as JSON here.", flag_values=FLAGS)
for _name, _allowed in (("parts", PARTS), ("stages", STAGE_NAMES)):
  flags.register_validator(
    _name,
    lambda v, a=_allowed: bool(v) and all(x in a for x in v),
    f"allowed values are {', '.join(_allowed)}",
    flag_values=FLAGS,
  )
for _name, _lo in (
  ("batch_size", 1),
  ("steps", 1),
  ("warmup", 0),
  ("repeats", 1),
  ("torch_threads", 1),
):
  flags.register_validator(
    _name, lambda v, lo=_lo: v >= lo, f"allowed values are integers >= {_lo}", flag_values=FLAGS
  )


# ----------------------------------------------------------------------------------------------
# the models


class ReferenceCNN(nn.Module):
  """The reference work's CNN on cimjax's quantizable layers (policy rows: conv1-3, fc1-2).

  ``fast_pool``: the max pools use :func:`max_pool_2x2` (same values and gradients bit for
  bit, a faster gradient on XLA:CPU) instead of ``nn.max_pool``.
  """

  channels: Sequence[int] = (32, 64, 128)
  pools: Sequence[bool] = (False, True, True)
  hidden: int = 256
  num_classes: int = 10
  fast_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    for i, (c, pool) in enumerate(zip(self.channels, self.pools)):
      x = nn.relu(QuantConv(c, (3, 3), signed_input=(i == 0), name=f"conv{i + 1}")(x, ctx))
      if pool:
        x = max_pool_2x2(x) if self.fast_pool else nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QuantDense(self.hidden, name="fc1")(x, ctx))
    return QuantDense(self.num_classes, name="fc2")(x, ctx)


def reference_cnn() -> ModelDef:
  """``launch.bench_train:reference_cnn``: the reference CNN on 28x28x1 images."""
  return ModelDef(
    "launch.bench_train:reference_cnn", ReferenceCNN(), (28, 28, 1), 10, "reference CNN"
  )


def build_model(arch: str, fast_pool: bool = False) -> ModelDef:
  """The benchmarked model (see :data:`ARCHS`); ``fast_pool``: the same network built on
  :class:`ReferenceCNN` with :func:`max_pool_2x2` (same parameter tree, same numerics)."""
  if arch == "reference" and not fast_pool:
    return reference_cnn()
  if not fast_pool:
    if arch == "zoo":
      return get_model("small_cnn", channels=(32, 64, 128), hidden=256)
    return get_model("small_cnn")
  kw: dict[str, Any] = {"fast_pool": True}
  if arch != "reference":
    kw["pools"] = (True, True, True)
  if arch == "default":
    kw.update(channels=(16, 32, 32), hidden=64)
  return ModelDef(f"{arch}+fast_pool", ReferenceCNN(**kw), (28, 28, 1), 10, f"{arch}, fast pool")


def _layout(arch: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], int]:
  """``(conv channels, pool after each conv, fc1 width)`` of the ``--arch`` CNN."""
  chans, hidden = ((16, 32, 32), 64) if arch == "default" else ((32, 64, 128), 256)
  pools = (False, True, True) if arch == "reference" else (True, True, True)
  return chans, pools, hidden


def torch_model(arch: str) -> Any:
  """The same CNN in PyTorch (NCHW, padding 1 = SAME)."""
  import torch  # pylint: disable=g-import-not-at-top

  chans, pools, hidden = _layout(arch)
  layers, c_in, hw = [], 1, 28
  for c, pool in zip(chans, pools):
    layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.ReLU()]
    if pool:
      layers.append(torch.nn.MaxPool2d(2))
      hw //= 2
    c_in = c
  layers += [
    torch.nn.Flatten(),
    torch.nn.Linear(c_in * hw * hw, hidden),
    torch.nn.ReLU(),
    torch.nn.Linear(hidden, 10),
  ]
  return torch.nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------
# timing


def load_average() -> float | None:
  """The 1-minute load average (None where unknown)."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Seconds per call of ``fn`` (which blocks on its result), after ``warmup`` calls."""
  for _ in range(warmup):
    fn()
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t) / steps


def time_chain(
  step: Callable[[Any], Any], state: Any, steps: int, warmup: int
) -> tuple[float, Any]:
  """Seconds per step of ``state = step(state)`` (blocking once at the end, as a training loop
  does), after ``warmup`` steps; returns the last state too."""
  for _ in range(warmup):
    state = step(state)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(steps):
    state = step(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - t) / steps, state


def synthetic_batch(batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch_size, 28, 28, 1), dtype=np.float32)
  return x, rng.integers(0, 10, batch_size).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# the cimjax stages, built as cimjax.train.runner builds them


class StageBench:
  """The default run's training config, optimizers, policies and step functions for a model."""

  def __init__(self, model: ModelDef, batch_size: int):
    from cimjax import pipeline  # pylint: disable=g-import-not-at-top
    from cimjax.train import policies as pol_lib  # pylint: disable=g-import-not-at-top
    from cimjax.train import stages as stages_lib  # pylint: disable=g-import-not-at-top

    self.model, self.batch_size = model, batch_size
    self.config = pipeline.default_config().train
    self.config.batch_size = batch_size
    self.config.bits.cell_bits = 2  # the default target rram_64_c2
    names = tuple(s.name for s in trace_specs(model))
    b = self.config.bits
    mask = pol_lib.bits_mask(
      len(names),
      min_bits=b.min_bits,
      max_bits=b.max_bits,
      constraint=b.constraint,
      cell_bits=b.cell_bits,
    )
    given = np.asarray(FINETUNE_POLICY[: len(names)], np.int32)
    if len(given) != len(names):
      given = np.asarray(pol_lib.extreme_policy(mask, "max"))
    self.policies = stages_lib.StagePolicies(
      num_layers=len(names),
      layer_names=names,
      mask=mask,
      max_policy=pol_lib.extreme_policy(mask, "max"),
      min_policy=pol_lib.extreme_policy(mask, "min"),
      given=given,
      model_name=model.name,
    )
    self.spe = 55000 // batch_size  # the default run's train split

  def trainer(self, stage: str) -> Any:
    from cimjax.train.runner import stage_trainer  # pylint: disable=g-import-not-at-top

    n = max(int(round(self.config[stage].epochs * self.spe)), 1)
    return stage_trainer(self.model, self.config, stage, n, self.spe, self.policies.max_policy)

  def step_fn(self, stage: str, trainer: Any) -> Callable[..., Any]:
    from cimjax.train import stages as stages_lib  # pylint: disable=g-import-not-at-top

    spec = stages_lib.get_stage(stage)
    return spec.steps(trainer, self.config, self.policies, spec.policy(self.policies))

  def state(self, trainer: Any, seed: int = 0) -> Any:
    from cimjax.train.state import create_state  # pylint: disable=g-import-not-at-top
    from cimjax.variables import init_variables  # pylint: disable=g-import-not-at-top

    key = jax.random.PRNGKey(seed)
    v = init_variables(self.model, key)
    return create_state(v["params"], v.get("batch_stats", {}), trainer.tx, key)


# ----------------------------------------------------------------------------------------------
# the parts


def _torch_setup(arch: str, batch: tuple[np.ndarray, np.ndarray], threads: int, cfg: Any):
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  net = torch_model(arch)
  decay = [p for n, p in net.named_parameters() if n.endswith("weight")]
  rest = [p for n, p in net.named_parameters() if not n.endswith("weight")]
  opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": cfg.fp32.weight_decay}, {"params": rest, "weight_decay": 0}],
    lr=cfg.fp32.lr,
  )
  x = torch.from_numpy(np.ascontiguousarray(batch[0].transpose(0, 3, 1, 2)))
  y = torch.from_numpy(batch[1].astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    return loss.item()  # one host sync a step, like reading the loss

  return step


def bench_train(model: ModelDef, arch: str, sb: StageBench, a: dict[str, Any]) -> dict[str, Any]:
  """fp32 step of cimjax vs PyTorch, back to back, ``repeats`` rounds."""
  trainer = sb.trainer("fp32")
  step_fn = sb.step_fn("fp32", trainer)
  batch = jax.device_put(synthetic_batch(a["batch_size"]))
  state = sb.state(trainer)
  sb_fast = StageBench(build_model(arch, fast_pool=True), a["batch_size"])
  trainer_f = sb_fast.trainer("fp32")
  step_f = sb_fast.step_fn("fp32", trainer_f)
  state_f = sb_fast.state(trainer_f)
  tstep = (
    _torch_setup(arch, synthetic_batch(a["batch_size"]), a["torch_threads"], sb.config)
    if a["torch"]
    else None
  )
  rounds = []
  for _ in range(a["repeats"]):
    dt, state = time_chain(lambda s: step_fn(s, batch)[0], state, a["steps"], a["warmup"])
    r = {"cimjax_s": dt, "load": load_average()}
    r["fast_pool_s"], state_f = time_chain(
      lambda s: step_f(s, batch)[0], state_f, a["steps"], a["warmup"]
    )
    if tstep is not None:
      r["torch_s"] = time_calls(tstep, a["steps"], a["warmup"])
    rounds.append(r)
    print(
      f"  round: cimjax {a['batch_size'] / dt:7.1f} img/s, fast pool "
      f"{a['batch_size'] / r['fast_pool_s']:7.1f} img/s"
      + (f", torch {a['batch_size'] / r['torch_s']:7.1f} img/s" if tstep else ""),
      flush=True,
    )
  out = {
    "rounds": rounds,
    "cimjax_img_s": a["batch_size"] / statistics.median(r["cimjax_s"] for r in rounds),
  }
  out["fast_pool_img_s"] = a["batch_size"] / statistics.median(r["fast_pool_s"] for r in rounds)
  out["fast_pool_speedup"] = out["fast_pool_img_s"] / out["cimjax_img_s"]
  same = jax.tree.map(
    lambda u, v: bool(np.array_equal(np.asarray(u).view(np.uint32), np.asarray(v).view(np.uint32))),
    state.params,
    state_f.params,
  )
  out["fast_pool_params_identical"] = all(jax.tree.leaves(same))
  out["steps_compared"] = int(state.step)
  if tstep is not None:
    out["torch_img_s"] = a["batch_size"] / statistics.median(r["torch_s"] for r in rounds)
    out["ratio"] = out["cimjax_img_s"] / out["torch_img_s"]
    out["fast_pool_ratio"] = out["fast_pool_img_s"] / out["torch_img_s"]
  return out


def _plain_cnn(arch: str, precision: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """A plain-JAX CNN (lax.conv, no quantization machinery): ``(init, loss)``."""
  chans, pools, hidden = _layout(arch)

  def init(key):
    ps, c_in, hw = [], 1, 28
    for c, pool in zip(chans, pools):
      key, k = jax.random.split(key)
      ps.append((jax.random.normal(k, (3, 3, c_in, c)) * (2 / (9 * c_in)) ** 0.5, jnp.zeros(c)))
      c_in, hw = c, hw // 2 if pool else hw
    for n_in, n_out in ((c_in * hw * hw, hidden), (hidden, 10)):
      key, k = jax.random.split(key)
      ps.append((jax.random.normal(k, (n_in, n_out)) * n_in**-0.5, jnp.zeros(n_out)))
    return ps

  def loss(ps, x, y):
    for (w, b), pool in zip(ps[:3], pools):
      x = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
      )
      x = jax.nn.relu(x + b)
      if pool:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(jnp.dot(x, ps[3][0], precision=precision) + ps[3][1])
    logits = jnp.dot(x, ps[4][0], precision=precision) + ps[4][1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  return init, loss


def _op_inputs(arch: str, bs: int) -> list[dict[str, Any]]:
  """Random operands of the step's big ops, one dict a layer (NHWC / HWIO, float32 numpy):
  ``x`` the conv's input, ``w`` its kernel, ``g`` its output cotangent, ``gp`` the pooled
  cotangent where the layer pools; the last entry is fc1's ``x``, ``w``, ``g``."""
  chans, pools, hidden = _layout(arch)
  rng = np.random.default_rng(1)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
  layers, c_in, hw = [], 1, 28
  for c, pool in zip(chans, pools):
    d = {
      "x": normal(bs, hw, hw, c_in),
      "w": normal(3, 3, c_in, c) * 0.1,
      "g": normal(bs, hw, hw, c),
    }
    if pool:
      d["gp"] = normal(bs, hw // 2, hw // 2, c)
      hw //= 2
    layers.append(d)
    c_in = c
  n_in = c_in * hw * hw
  layers.append({"x": normal(bs, n_in), "w": normal(n_in, hidden) * 0.01, "g": normal(bs, hidden)})
  return layers


def _op_fns(arch: str, bs: int) -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
  """The step's big ops alone, jitted: each conv's forward, input and filter gradient (and the
  two operand transposes XLA:CPU puts before the filter gradient's convolution); each relu +
  max pool's gradient (``select_and_scatter``) and :func:`max_pool_2x2`'s; fc1."""

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )

  out: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
  *convs, fc = _op_inputs(arch, bs)
  for i, d in enumerate(convs):
    x, w, g = (jnp.asarray(d[k]) for k in "xwg")
    out[f"op: conv{i + 1} forward"] = (jax.jit(conv), (x, w))
    if i:  # conv1's input gradient is never computed (the image needs none)
      out[f"op: conv{i + 1} input gradient"] = (
        jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0]),
        (x, w, g),
      )
    out[f"op: conv{i + 1} filter gradient"] = (
      jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]),
      (x, w, g),
    )
    # XLA:CPU computes it as one convolution of x as (C, H, W, N) by g as (H, W, N, C')
    out[f"op: conv{i + 1} filter gradient, its 2 transposes"] = (
      jax.jit(lambda x, g: (jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)))),
      (x, g),
    )
    if "gp" in d:
      gp = jnp.asarray(d["gp"])
      for label, p in (
        ("nn.max_pool", lambda v: nn.max_pool(v, (2, 2), (2, 2))),
        ("max_pool_2x2", max_pool_2x2),
      ):
        f = jax.jit(lambda y, gp, p=p: jax.vjp(lambda v: p(nn.relu(v)), y)[1](gp)[0])
        out[f"op: relu+pool{i + 1} gradient, {label}"] = (f, (g, gp))
  x, w, g = (jnp.asarray(fc[k]) for k in "xwg")
  dot = lambda x, w: jnp.dot(x, w, precision="highest")  # noqa: E731
  out["op: fc1 forward + both gradients"] = (
    jax.jit(lambda x, w, g: (dot(x, w), jax.vjp(dot, x, w)[1](g))),
    (x, w, g),
  )
  return out


def _torch_op_fns(arch: str, bs: int, threads: int) -> dict[str, Callable[[], Any]]:
  """The same ops in PyTorch on the same operands (NCHW, as the PyTorch step runs them), keyed
  like :func:`_op_fns` (``torch op: ...``); each returns its results in cimjax's layout
  (NHWC / HWIO) so tests can compare the two."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  F = torch.nn.functional  # noqa: N806
  bwd = torch.ops.aten.convolution_backward
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
  hwio = lambda t: t.permute(2, 3, 1, 0).numpy()  # noqa: E731
  out: dict[str, Callable[[], Any]] = {}
  *convs, fc = _op_inputs(arch, bs)
  for i, d in enumerate(convs):
    x, g = nchw(d["x"]), nchw(d["g"])
    w = torch.from_numpy(np.ascontiguousarray(d["w"].transpose(3, 2, 0, 1)))

    def grad(which, x=x, w=w, g=g):
      mask = [which == 0, False, which == 1]
      r = bwd(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
      return nhwc(r[0]) if which == 0 else hwio(r[1])

    out[f"torch op: conv{i + 1} forward"] = lambda x=x, w=w: nhwc(F.conv2d(x, w, padding=1))
    if i:
      out[f"torch op: conv{i + 1} input gradient"] = lambda grad=grad: grad(0)
    out[f"torch op: conv{i + 1} filter gradient"] = lambda grad=grad: grad(1)
    if "gp" in d:
      gp, y = nchw(d["gp"]), g.clone().requires_grad_(True)

      def pool_grad(y=y, gp=gp):
        y.grad = None
        F.max_pool2d(F.relu(y), 2).backward(gp)
        return nhwc(y.grad)

      out[f"torch op: relu+pool{i + 1} gradient"] = pool_grad
  x, w = (torch.from_numpy(fc[k].copy()).requires_grad_(True) for k in "xw")
  gf = torch.from_numpy(fc["g"])

  def fc1():
    x.grad = w.grad = None
    y = x @ w
    y.backward(gf)
    return y.detach().numpy(), (x.grad.numpy(), w.grad.numpy())

  out["torch op: fc1 forward + both gradients"] = fc1
  return out


def bench_breakdown(
  model: ModelDef, arch: str, sb: StageBench, a: dict[str, Any]
) -> dict[str, Any]:
  """Parts of the fp32 step and of fit()'s host work, each timed alone (seconds a step)."""
  from cimjax import data as data_lib  # pylint: disable=g-import-not-at-top
  from cimjax.models import forward  # pylint: disable=g-import-not-at-top
  from cimjax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from cimjax.train.loop import fit  # pylint: disable=g-import-not-at-top
  from cimjax.train.state import cross_entropy, variables_dict  # pylint: disable=g-import-not-at-top

  bs, n, w = a["batch_size"], max(2, a["steps"] // 2), a["warmup"]
  trainer = sb.trainer("fp32")
  config = trainer.config
  state = sb.state(trainer)
  xb, yb = synthetic_batch(bs)
  x, y = jax.device_put((xb, yb))
  mod = model.module

  def loss_fn(params, x, y):
    logits, _ = steps_lib._apply(mod, params, state.batch_stats, x, None)  # noqa: SLF001
    return jnp.mean(cross_entropy(logits, y))

  fwd = jax.jit(lambda p, x: forward(mod, variables_dict(p, {}), x, None, train=True)[0])
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
  grads = jax.block_until_ready(fwd_bwd(state.params, x, y)[1])
  upd = jax.jit(lambda s, g: steps_lib._update(config, s, g, s.batch_stats))  # noqa: SLF001
  real = steps_lib.JITTED[False]["train"]
  donated = jax.jit(steps_lib.train_step, static_argnames="config", donate_argnames="state")
  plain = {}
  for label, prec in (("default", None), ("highest", jax.lax.Precision.HIGHEST)):
    init, pl = _plain_cnn(arch, prec)
    plain[label] = (jax.jit(jax.value_and_grad(pl)), init(jax.random.key(0)))

  # fit's host work: the in-memory split of the default run's size
  rng = np.random.default_rng(0)
  ds = data_lib.Dataset(
    rng.standard_normal((55000, 28, 28, 1), dtype=np.float32),
    rng.integers(0, 10, 55000).astype(np.int32),
    np.arange(55000),
  )
  batches = data_lib.train_batches(ds, bs, np.asarray([0, 0], np.uint32))
  metrics = real(state, (x, y), None, config=config)[1]

  ops = _op_fns(arch, bs)
  torch_ops = _torch_op_fns(arch, bs, a["torch_threads"]) if a["torch"] else {}
  parts: dict[str, list[float]] = {}

  def add(name: str, seconds: float) -> None:
    parts.setdefault(name, []).append(seconds)

  for _ in range(a["repeats"]):
    add(
      "step (real jitted fp32 step)",
      time_chain(lambda s: real(s, (x, y), None, config=config)[0], state, n, w)[0],
    )
    st2 = jax.tree.map(jnp.copy, state)
    add(
      "step, state donated",
      time_chain(lambda s: donated(s, (x, y), None, config=config)[0], st2, n, w)[0],
    )
    add("forward only", time_calls(lambda: fwd(state.params, x).block_until_ready(), n, w))
    add(
      "forward+backward",
      time_calls(lambda: jax.block_until_ready(fwd_bwd(state.params, x, y)), n, w),
    )
    add(
      "optimizer update alone", time_calls(lambda: jax.block_until_ready(upd(state, grads)), n, w)
    )
    for label, (f, ps) in plain.items():
      add(
        f"plain-JAX CNN fwd+bwd, precision {label}",
        time_calls(lambda f=f, ps=ps: jax.block_until_ready(f(ps, x, y)), n, w),
      )
    add("host: batch gather (fit)", time_calls(lambda: next(batches), n * 10, w))
    add(
      "host: device_put batch",
      time_calls(lambda: jax.block_until_ready(jax.device_put((xb, yb))), n * 10, w),
    )
    add(
      "host: metrics fetch",
      time_calls(lambda: {k: float(v) for k, v in jax.device_get(metrics).items()}, n * 10, w),
    )
    for name, (f, args) in ops.items():
      add(name, time_calls(lambda f=f, args=args: jax.block_until_ready(f(*args)), n, w))
    for name, f in torch_ops.items():
      add(name, time_calls(f, n, w))
    fit_state = jax.tree.map(jnp.copy, state)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
      _, stats = fit(
        lambda s, b: real(s, b, None, config=config),
        fit_state,
        ds,
        num_steps=n + w,
        batch_size=bs,
        data_seed=[0, 0],
        log_every=max(w, 1),
        progress=False,
      )
    finally:
      logging.set_verbosity(verbosity)
    add("fit() end to end (its own img/s window)", bs / stats["images_per_s"])
    print(f"  breakdown round done (load {load_average()})", flush=True)
  med = {k: statistics.median(v) for k, v in parts.items()}
  return {
    "seconds": med,
    "ms": {k: 1000 * v for k, v in med.items()},
    "img_s": {k: bs / v for k, v in med.items()},
    "rounds": parts,
  }


def bench_stages(model: ModelDef, sb: StageBench, a: dict[str, Any]) -> dict[str, Any]:
  """img/s of each stage's step (the default run's settings)."""
  bs, n = a["batch_size"], max(2, a["steps"] // 2)
  batch = jax.device_put(synthetic_batch(bs))
  fns = {}
  for stage in a["stages"]:
    trainer = sb.trainer(stage)
    fns[stage] = (sb.step_fn(stage, trainer), sb.state(trainer))
  secs: dict[str, list[float]] = {s: [] for s in fns}
  for _ in range(a["repeats"]):
    for stage, (fn, st) in fns.items():
      dt, st = time_chain(lambda s, fn=fn: fn(s, batch)[0], st, n, a["warmup"])
      fns[stage] = (fn, st)
      secs[stage].append(dt)
    print(
      "  stages round: " + ", ".join(f"{s} {bs / v[-1]:.1f}" for s, v in secs.items()) + " img/s",
      flush=True,
    )
  return {s: {"img_s": bs / statistics.median(v), "rounds_s": v} for s, v in secs.items()}


def format_table(r: dict[str, Any]) -> str:
  lines = [
    f"bench_train: {r['arch']} CNN ({r['model']}), batch {r['batch_size']}, backend "
    f"{r['backend']}, jax {r['jax']}, torch {r.get('torch_version')}, load {r['load_start']} -> "
    f"{r['load_end']}; medians of {r['repeats']} rounds",
    f"XLA_FLAGS: {r['xla_flags'] or '(none)'}",
  ]
  t = r.get("train")
  if t:
    lines.append(f"{'fp32 step':44s} {'img/s':>9}")
    lines.append(f"{'  cimjax (real fp32 step)':44s} {t['cimjax_img_s']:9.1f}")
    lines.append(
      f"{'  cimjax, max_pool_2x2 gradient':44s} {t['fast_pool_img_s']:9.1f}  "
      f"({t['fast_pool_speedup']:.2f}x; params after {t['steps_compared']} steps bit-identical: "
      f"{t['fast_pool_params_identical']})"
    )
    if "torch_img_s" in t:
      lines.append(
        f"{'  pytorch (AdamW, %d threads)' % r['torch_threads']:44s} {t['torch_img_s']:9.1f}"
      )
      lines.append(f"{'  cimjax / pytorch':44s} {t['ratio']:9.2f}x")
      lines.append(
        f"{'  cimjax, max_pool_2x2 gradient / pytorch':44s} {t['fast_pool_ratio']:9.2f}x"
      )
  b = r.get("breakdown")
  if b:
    lines.append(f"{'breakdown (cimjax fp32)':44s} {'ms':>9} {'img/s':>9}")
    for k, v in b["ms"].items():
      if not k.startswith("torch op: "):
        lines.append(f"  {k:42s} {v:9.2f} {b['img_s'][k]:9.1f}")
    pairs = op_pairs(b["ms"])
    if pairs:
      lines.append(
        f"{'ops alone, cimjax vs pytorch (ms)':44s} {'cimjax':>9} {'pytorch':>9} {'ratio':>7}"
      )
      for k, (mine, theirs) in pairs.items():
        lines.append(f"  {k:42s} {mine:9.2f} {theirs:9.2f} {theirs / mine:6.2f}x")
  s = r.get("stages")
  if s:
    lines.append(f"{'stage step (default-run settings)':44s} {'img/s':>9}")
    for k, v in s.items():
      lines.append(f"  {k:42s} {v['img_s']:9.1f}")
  return "\n".join(lines)


def op_pairs(ms: dict[str, float]) -> dict[str, tuple[float, float]]:
  """``{op: (cimjax ms, pytorch ms)}`` for every op timed in both (the pool gradient against
  cimjax's :func:`max_pool_2x2`, what the zoo trains with)."""
  out = {}
  for k, theirs in ms.items():
    if k.startswith("torch op: "):
      op = k.removeprefix("torch op: ")
      mine = ms.get(f"op: {op}", ms.get(f"op: {op}, max_pool_2x2"))
      if mine is not None:
        out[op] = (mine, theirs)
  return out


def summary(r: dict[str, Any]) -> dict[str, Any]:
  """The headline img/s figures of a result (one JSON line)."""
  out: dict[str, Any] = {}
  if "train" in r:
    out["fp32_cimjax_img_s"] = round(r["train"]["cimjax_img_s"], 1)
    out["fp32_fast_pool_img_s"] = round(r["train"]["fast_pool_img_s"], 1)
    out["fast_pool_params_identical"] = r["train"]["fast_pool_params_identical"]
    if "torch_img_s" in r["train"]:
      out["fp32_torch_img_s"] = round(r["train"]["torch_img_s"], 1)
      out["fp32_fast_pool_vs_torch"] = round(r["train"]["fast_pool_ratio"], 3)
  for k, v in r.get("stages", {}).items():
    out[f"{k}_img_s"] = round(v["img_s"], 1)
  return out


def run_benchmark(a: dict[str, Any]) -> dict[str, Any]:
  """All parts; ``a`` holds the flag values."""
  model = build_model(a["arch"])
  sb = StageBench(model, a["batch_size"])
  try:
    import torch  # pylint: disable=g-import-not-at-top

    torch_version = torch.__version__
  except ImportError:
    torch_version, a["torch"] = None, False
  r: dict[str, Any] = {
    "arch": a["arch"],
    "model": model.name,
    "batch_size": a["batch_size"],
    "repeats": a["repeats"],
    "steps": a["steps"],
    "torch_threads": a["torch_threads"],
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "torch_version": torch_version,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    "load_start": load_average(),
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  if "train" in a["parts"]:
    print("fp32 step: cimjax vs pytorch", flush=True)
    r["train"] = bench_train(model, a["arch"], sb, a)
  if "breakdown" in a["parts"]:
    print("breakdown of the cimjax fp32 step", flush=True)
    r["breakdown"] = bench_breakdown(model, a["arch"], sb, a)
  if "stages" in a["parts"]:
    print("stage steps", flush=True)
    r["stages"] = bench_stages(model, sb, a)
  r["load_end"] = load_average()
  return r


def main(argv: Sequence[str]) -> int:
  """absl entry point."""

  def body() -> None:
    cli_lib.no_positional(argv)
    if FLAGS.xla_flags:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags).strip()
    a = {k: FLAGS[k].value for k in FLAGS}
    result = run_benchmark(a)
    cli_lib.emit_result(result, format_table(result), FLAGS.out, summary(result))

  return cli_lib.run_main(PROG, body)


def run() -> None:
  """Entry point of ``python -m launch.bench_train``."""
  cli_lib.run_console(main, cli_lib.flags_parser(FLAGS, PROG))


if __name__ == "__main__":
  run()
