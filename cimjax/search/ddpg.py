"""The reference agent: DDPG as in HAQ / CIM-AQ (digest section B), pure and jittable.

One episode = one candidate policy, built layer by layer with two steps per layer (weight bits,
then activation bits). Layers and halves with a single allowed value (forced first/last layers)
are not steps: they are masked out of the action space instead of being overwritten after the
episode (digest G3). Settings follow the reference script:

- state: the 10 HAQ features of the step (:func:`cimjax.search.features.haq_features`), with
  feature 9 the previous step's bits / max_bits;
- actor ``state -> 300 -> 300 -> 1`` (ReLU, sigmoid), critic ``relu(fc(state) + fc(action))
  -> 300 -> 1``; fan-in uniform initialisation, last layers uniform(+-3e-3);
- Adam, actor lr 5e-5, critic lr 1e-3; soft target updates ``tau = 0.01``; batch 64;
- replay ring buffer of ``64`` episodes (``128 x L`` transitions when no layer is forced);
- warm-up: episodes ``0 .. warmup`` (inclusive, 31 with the default 30) take uniform random
  actions and do not update;
- exploration: truncated normal on [0, 1] around the actor's output with
  ``sigma = 0.6 * 0.997 ** (episode - warmup)``;
- action -> bits: ``round((b_max - b_min + 1) * a + b_min - 0.5)`` (HAQ's equal-width bins,
  NumPy's round-half-to-even); with the cell rule, weight steps map to
  ``valid[min(floor(a * |valid|), |valid| - 1)]`` over the multiples of ``cell_bits``;
- every step of the episode is stored with the episode's final reward; after warm-up each
  stored transition is followed by one update;
- reward baseline: a moving average (``alpha = 0.5``) of the batch-mean reward is subtracted;
  critic target ``r + gamma * (1 - done) * Q'(s', mu'(s'))`` with ``gamma = 1``. (With every
  step given the terminal reward and gamma = 1 the targets still bootstrap, so Q grows with the
  horizon: the reference's inconsistency, digest G4, kept here on purpose.)

Minibatches are sampled uniformly with replacement (the reference samples without replacement
once the buffer is large enough; the difference is negligible at 64 of >= 128 x L).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cimjax.search import features as feat_lib
from cimjax.search import space as space_lib
from cimjax.search.agent import Agent, standard_promotion
from cimjax.spec import LayerSpec


@dataclasses.dataclass(frozen=True)
class DDPGConfig:
  """Hyperparameters (defaults: the CIM-AQ search script).

  Attributes:
    hidden: width of the actor's and critic's two hidden layers.
    actor_lr: actor Adam learning rate.
    critic_lr: critic Adam learning rate.
    tau: soft target update rate.
    gamma: discount.
    batch_size: minibatch size.
    replay_episodes: replay capacity in episodes (x steps per episode).
    warmup: episodes ``0..warmup`` act uniformly at random and do not update.
    init_sigma: initial exploration std.
    sigma_decay: per-episode decay of the exploration std.
    ma_alpha: moving-average rate of the reward baseline.
    init_w: range of the last layers' uniform initialisation.
  """

  hidden: int = 300
  actor_lr: float = 5e-5
  critic_lr: float = 1e-3
  tau: float = 0.01
  gamma: float = 1.0
  batch_size: int = 64
  replay_episodes: int = 64
  warmup: int = 30
  init_sigma: float = 0.6
  sigma_decay: float = 0.997
  ma_alpha: float = 0.5
  init_w: float = 3e-3


class DDPGState(NamedTuple):
  """Agent state (all arrays; orbax saves it as is)."""

  actor: Any
  critic: Any
  actor_target: Any
  critic_target: Any
  actor_opt: Any
  critic_opt: Any
  buf_s: jax.Array  # [cap, 10]
  buf_a: jax.Array  # [cap]
  buf_r: jax.Array  # [cap]
  buf_s1: jax.Array  # [cap, 10]
  buf_done: jax.Array  # [cap]
  buf_ptr: jax.Array  # int32
  buf_size: jax.Array  # int32
  moving_avg: jax.Array  # float32
  has_avg: jax.Array  # bool
  episode: jax.Array  # int32


def _dense_init(
  key: jax.Array, din: int, dout: int, last: bool, init_w: float
) -> dict[str, jax.Array]:
  kw, kb = jax.random.split(key)
  bound = init_w if last else 1.0 / np.sqrt(din)
  return {
    "w": jax.random.uniform(kw, (din, dout), jnp.float32, -bound, bound),
    "b": jax.random.uniform(kb, (dout,), jnp.float32, -1.0 / np.sqrt(din), 1.0 / np.sqrt(din)),
  }


def action_to_bits(
  action: jax.Array, options: jax.Array, num_options: jax.Array, contiguous: jax.Array
) -> jax.Array:
  """Maps actions in [0, 1] to bits as CIM-AQ does (jittable, elementwise over steps).

  Args:
    action: float ``[...]`` in [0, 1].
    options: int32 ``[..., 8]`` the step's allowed bits, ascending, padded.
    num_options: int32 ``[...]`` how many entries of ``options`` are real.
    contiguous: bool ``[...]``: the options are a range ``lo..hi`` (HAQ binning) rather than
      a list (cell-resolution weights: equal bins over the list).

  Returns:
    int32 ``[...]`` bits.
  """
  a = jnp.asarray(action, jnp.float32)
  lo = options[..., 0].astype(jnp.float32)
  hi = jnp.take_along_axis(options, (num_options - 1)[..., None], axis=-1)[..., 0]
  hi_f = hi.astype(jnp.float32)
  haq = jnp.round((hi_f - lo + 1.0) * a + lo - 0.5)  # half to even, as np.round
  haq = jnp.clip(haq, lo, hi_f).astype(jnp.int32)
  k = jnp.minimum(jnp.floor(a * num_options.astype(jnp.float32)).astype(jnp.int32), num_options - 1)
  k = jnp.clip(k, 0, 7)
  listed = jnp.take_along_axis(options, k[..., None], axis=-1)[..., 0]
  return jnp.where(contiguous, haq, listed).astype(jnp.int32)


def make_ddpg(
  space: space_lib.SearchSpace, specs: Sequence[LayerSpec], config: DDPGConfig = DDPGConfig()
) -> Agent:
  """Builds the DDPG agent (population 1: one candidate per episode).

  Args:
    space: the search space.
    specs: layer geometry (state features).
    config: hyperparameters.

  Returns:
    The :class:`~cimjax.search.agent.Agent` (``name="ddpg"``).
  """
  cfg = config
  steps = feat_lib.haq_steps(space)
  num_steps = len(steps)
  if num_steps == 0:
    raise ValueError("the search space has no free decision (every layer is forced)")
  feats = jnp.asarray(feat_lib.haq_features(specs, space))  # [S, 10]
  step_layer = jnp.asarray([l for l, _ in steps], jnp.int32)
  step_kind = jnp.asarray([k for _, k in steps], jnp.int32)
  opts = np.zeros((num_steps, 8), np.int32)
  nopt = np.zeros((num_steps,), np.int32)
  contig = np.zeros((num_steps,), bool)
  for i, (l, k) in enumerate(steps):
    o = (space.w_options if k == 0 else space.a_options)[l]
    opts[i, : len(o)] = o
    opts[i, len(o) :] = o[-1]
    nopt[i] = len(o)
    contig[i] = bool(np.all(np.diff(o) == 1))
  opts_j, nopt_j, contig_j = jnp.asarray(opts), jnp.asarray(nopt), jnp.asarray(contig)
  # the policy of single-option layers/halves (fixed values)
  base_pol = np.stack(
    [np.asarray([o[-1] for o in space.w_options]), np.asarray([o[-1] for o in space.a_options])],
    axis=1,
  ).astype(np.int32)
  base_pol_j = jnp.asarray(base_pol)
  cap = cfg.replay_episodes * num_steps
  nf = feat_lib.NUM_HAQ_FEATURES
  max_bits = float(space.max_bits)
  actor_tx = standard_promotion(optax.adam(cfg.actor_lr))
  critic_tx = standard_promotion(optax.adam(cfg.critic_lr))

  def actor_apply(p, s):
    x = jax.nn.relu(s @ p[0]["w"] + p[0]["b"])
    x = jax.nn.relu(x @ p[1]["w"] + p[1]["b"])
    return jax.nn.sigmoid(x @ p[2]["w"] + p[2]["b"])[..., 0]

  def critic_apply(p, s, a):
    x = jax.nn.relu(s @ p[0]["w"] + p[0]["b"] + a[..., None] @ p[1]["w"] + p[1]["b"])
    x = jax.nn.relu(x @ p[2]["w"] + p[2]["b"])
    return (x @ p[3]["w"] + p[3]["b"])[..., 0]

  def init(key: jax.Array) -> DDPGState:
    ka, kc = jax.random.split(key)
    k = jax.random.split(ka, 3)
    h = cfg.hidden
    iw = cfg.init_w
    actor = [
      _dense_init(k[0], nf, h, False, iw),
      _dense_init(k[1], h, h, False, iw),
      _dense_init(k[2], h, 1, True, iw),
    ]
    k = jax.random.split(kc, 4)
    critic = [
      _dense_init(k[0], nf, h, False, iw),
      _dense_init(k[1], 1, h, False, iw),
      _dense_init(k[2], h, h, False, iw),
      _dense_init(k[3], h, 1, True, iw),
    ]
    return DDPGState(
      actor=actor,
      critic=critic,
      actor_target=actor,
      critic_target=critic,
      actor_opt=actor_tx.init(actor),
      critic_opt=critic_tx.init(critic),
      buf_s=jnp.zeros((cap, nf), jnp.float32),
      buf_a=jnp.zeros((cap,), jnp.float32),
      buf_r=jnp.zeros((cap,), jnp.float32),
      buf_s1=jnp.zeros((cap, nf), jnp.float32),
      buf_done=jnp.zeros((cap,), jnp.float32),
      buf_ptr=jnp.zeros((), jnp.int32),
      buf_size=jnp.zeros((), jnp.int32),
      moving_avg=jnp.zeros((), jnp.float32),
      has_avg=jnp.zeros((), bool),
      episode=jnp.zeros((), jnp.int32),
    )

  def sigma(episode: jax.Array) -> jax.Array:
    return cfg.init_sigma * cfg.sigma_decay ** (episode - cfg.warmup).astype(jnp.float32)

  def ask(state: DDPGState, key: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    warm = state.episode <= cfg.warmup
    sd = sigma(state.episode)
    keys = jax.random.split(key, num_steps)

    def body(prev_bits, xs):
      t, k = xs
      s = feats[t].at[8].set(prev_bits.astype(jnp.float32) / max_bits)
      mu = actor_apply(state.actor, s)
      ku, kn = jax.random.split(k)
      lo, hi = (0.0 - mu) / sd, (1.0 - mu) / sd
      noisy = mu + sd * jax.random.truncated_normal(kn, lo, hi, (), jnp.float32)
      rand = jax.random.uniform(ku, (), jnp.float32)
      a = jnp.clip(jnp.where(warm, rand, noisy), 0.0, 1.0)
      bits = action_to_bits(a, opts_j[t], nopt_j[t], contig_j[t])
      return bits, (s, a, bits)

    _, (states, actions, bits) = jax.lax.scan(
      body, jnp.zeros((), jnp.int32), (jnp.arange(num_steps), keys)
    )
    pol = base_pol_j.at[step_layer, step_kind].set(bits)
    return pol[None], (states, actions)

  def update(state: DDPGState, key: jax.Array) -> tuple[DDPGState, dict[str, jax.Array]]:
    idx = jax.random.randint(key, (cfg.batch_size,), 0, jnp.maximum(state.buf_size, 1))
    s, a, r = state.buf_s[idx], state.buf_a[idx], state.buf_r[idx]
    s1, done = state.buf_s1[idx], state.buf_done[idx]
    next_q = critic_apply(state.critic_target, s1, actor_apply(state.actor_target, s1))
    bm = jnp.mean(r)
    ma = jnp.where(state.has_avg, state.moving_avg + cfg.ma_alpha * (bm - state.moving_avg), bm)
    target = jax.lax.stop_gradient((r - ma) + cfg.gamma * (1.0 - done) * next_q)

    def critic_loss(p):
      return jnp.mean((critic_apply(p, s, a) - target) ** 2)

    cl, cg = jax.value_and_grad(critic_loss)(state.critic)
    cu, critic_opt = critic_tx.update(cg, state.critic_opt, state.critic)
    critic = optax.apply_updates(state.critic, cu)

    def actor_loss(p):
      return -jnp.mean(critic_apply(critic, s, actor_apply(p, s)))

    al, ag = jax.value_and_grad(actor_loss)(state.actor)
    au, actor_opt = actor_tx.update(ag, state.actor_opt, state.actor)
    actor = optax.apply_updates(state.actor, au)
    soft = lambda t, x: (1.0 - cfg.tau) * t + cfg.tau * x  # noqa: E731
    return state._replace(
      actor=actor,
      critic=critic,
      actor_opt=actor_opt,
      critic_opt=critic_opt,
      actor_target=jax.tree.map(soft, state.actor_target, actor),
      critic_target=jax.tree.map(soft, state.critic_target, critic),
      moving_avg=ma,
      has_avg=jnp.ones((), bool),
    ), {"critic_loss": cl, "actor_loss": al}

  def tell(
    state: DDPGState, policies: jax.Array, out: Any, aux: Any, key: jax.Array
  ) -> tuple[DDPGState, dict[str, jax.Array]]:
    del policies
    states, actions = aux
    r = jnp.asarray(out.reward, jnp.float32)[0]
    ok = jnp.asarray(out.valid)[0]
    learn = state.episode > cfg.warmup
    # next states: s_{t+1} (the last step's next state is unused: done = 1)
    s1 = jnp.concatenate([states[1:], states[-1:]], axis=0)
    done = (jnp.arange(num_steps) == num_steps - 1).astype(jnp.float32)
    keys = jax.random.split(key, num_steps)

    def body(st, xs):
      s, a, sn, d, k = xs
      p = st.buf_ptr
      st = st._replace(
        buf_s=st.buf_s.at[p].set(s),
        buf_a=st.buf_a.at[p].set(a),
        buf_r=st.buf_r.at[p].set(r),
        buf_s1=st.buf_s1.at[p].set(sn),
        buf_done=st.buf_done.at[p].set(d),
        buf_ptr=(p + 1) % cap,
        buf_size=jnp.minimum(st.buf_size + 1, cap),
      )
      zero = jnp.zeros((), jnp.float32)
      st, m = jax.lax.cond(
        learn, update, lambda st_, k_: (st_, {"critic_loss": zero, "actor_loss": zero}), st, k
      )
      return st, (m["critic_loss"], m["actor_loss"])

    new_state, (cl, al) = jax.lax.scan(body, state, (states, actions, s1, done, keys))
    new_state = new_state._replace(episode=state.episode + 1)
    out = jax.tree.map(lambda x, y: jnp.where(ok, x, y), new_state, state)
    metrics = {
      "critic_loss": jnp.mean(cl),
      "actor_loss": jnp.mean(al),
      "sigma": sigma(state.episode),
    }
    return out, metrics

  return Agent(
    name="ddpg",
    population=1,
    init=init,
    ask=ask,
    tell=tell,
    config={"agent": "ddpg", **dataclasses.asdict(cfg), "steps": num_steps, "replay_capacity": cap},
  )


__all__ = ["DDPGConfig", "DDPGState", "action_to_bits", "make_ddpg"]
