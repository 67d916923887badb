"""The reference agent: DDPG as in HAQ / CIM-AQ, pure and jittable.

One episode = one candidate policy, built layer by layer with two steps per layer (weight bits,
then activation bits). Layers and halves with a single allowed value (forced first/last layers)
are not steps: they are masked out of the action space instead of being overwritten after the
episode as the reference does. Settings follow the reference script:

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
  horizon: the reference's inconsistency, kept here on purpose.)

Minibatches are sampled uniformly with replacement (the reference samples without replacement
once the buffer is large enough; the difference is negligible at 64 of >= 128 x L).

Structure (pure functions of explicit state): the networks (:func:`actor_init`,
:func:`actor_apply`, :func:`critic_init`, :func:`critic_apply`, :func:`soft_update`), the
:class:`ReplayBuffer` (:func:`replay_init`, :func:`replay_add`, :func:`replay_sample`),
exploration and episodes (:func:`explore`, :func:`rollout` over an :class:`Episode`) and the
learning step (:func:`ddpg_update`); :func:`ddpg_init`, :func:`ddpg_ask` and :func:`ddpg_tell`
wire them over a :class:`DDPGState` with the constants in a :class:`DDPGSetup`, and
:func:`make_ddpg` returns them as an :class:`~cimjax.search.agent.Agent`.
"""

from __future__ import annotations

import dataclasses
import functools
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


class ReplayBuffer(NamedTuple):
  """A ring buffer of transitions (capacity ``C``, ``F`` state features).

  Attributes:
    s: float32 ``[C, F]`` states.
    a: float32 ``[C]`` actions in [0, 1].
    r: float32 ``[C]`` rewards (the episode's final reward).
    s1: float32 ``[C, F]`` next states.
    done: float32 ``[C]`` 1 on an episode's last step.
    ptr: int32 ``[]`` the next row written.
    size: int32 ``[]`` rows filled (at most ``C``).
  """

  s: jax.Array
  a: jax.Array
  r: jax.Array
  s1: jax.Array
  done: jax.Array
  ptr: jax.Array
  size: jax.Array


class DDPGState(NamedTuple):
  """Agent state (all arrays; orbax saves it as is).

  Attributes:
    actor: actor weights (:func:`actor_init`).
    critic: critic weights (:func:`critic_init`).
    actor_target: the actor's soft-updated target copy.
    critic_target: the critic's soft-updated target copy.
    actor_opt: the actor's Adam state.
    critic_opt: the critic's Adam state.
    replay: the :class:`ReplayBuffer`.
    moving_avg: float32 ``[]`` the reward baseline.
    has_avg: bool ``[]`` whether the baseline has been set.
    episode: int32 ``[]`` episodes done.
  """

  actor: Any
  critic: Any
  actor_target: Any
  critic_target: Any
  actor_opt: Any
  critic_opt: Any
  replay: ReplayBuffer
  moving_avg: jax.Array
  has_avg: jax.Array
  episode: jax.Array


class Episode(NamedTuple):
  """The static steps of an episode (``S`` free decisions, :func:`make_episode`).

  Attributes:
    feats: float32 ``[S, 10]`` HAQ state features (feature 8 is filled during the episode).
    layer: int32 ``[S]`` the step's layer.
    kind: int32 ``[S]`` 0: weight bits, 1: activation bits.
    options: int32 ``[S, 8]`` allowed bits, ascending, padded with the largest.
    num_options: int32 ``[S]`` real entries of ``options``.
    contiguous: bool ``[S]`` the options are a range (HAQ binning) rather than a list.
    base_policy: int32 ``[L, 2]`` the policy before the steps (single-option values).
  """

  feats: jax.Array
  layer: jax.Array
  kind: jax.Array
  options: jax.Array
  num_options: jax.Array
  contiguous: jax.Array
  base_policy: jax.Array

  @property
  def num_steps(self) -> int:
    return self.layer.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class DDPGSetup:
  """The constants of one DDPG agent (closed over by its functions, never traced).

  Attributes:
    config: the hyperparameters.
    episode: the episode's steps.
    capacity: replay capacity in transitions (``replay_episodes * S``).
    max_bits: the space's largest bit-width (scales the previous-action feature).
    actor_tx: the actor's optimiser.
    critic_tx: the critic's optimiser.
  """

  config: DDPGConfig
  episode: Episode
  capacity: int
  max_bits: float
  actor_tx: optax.GradientTransformation
  critic_tx: optax.GradientTransformation


def make_episode(space: space_lib.SearchSpace, specs: Sequence[LayerSpec]) -> Episode:
  """The :class:`Episode` of a space (:func:`cimjax.search.features.haq_steps`).

  Raises:
    ValueError: every layer is forced (no step).
  """
  steps = feat_lib.haq_steps(space)
  num_steps = len(steps)
  if num_steps == 0:
    raise ValueError("the search space has no free decision (every layer is forced)")
  opts = np.zeros((num_steps, 8), np.int32)
  nopt = np.zeros((num_steps,), np.int32)
  contig = np.zeros((num_steps,), bool)
  for i, (l, k) in enumerate(steps):
    o = (space.w_options if k == 0 else space.a_options)[l]
    opts[i, : len(o)] = o
    opts[i, len(o) :] = o[-1]
    nopt[i] = len(o)
    contig[i] = bool(np.all(np.diff(o) == 1))
  base_pol = np.stack(
    [np.asarray([o[-1] for o in space.w_options]), np.asarray([o[-1] for o in space.a_options])],
    axis=1,
  ).astype(np.int32)
  return Episode(
    feats=jnp.asarray(feat_lib.haq_features(specs, space)),
    layer=jnp.asarray([l for l, _ in steps], jnp.int32),
    kind=jnp.asarray([k for _, k in steps], jnp.int32),
    options=jnp.asarray(opts),
    num_options=jnp.asarray(nopt),
    contiguous=jnp.asarray(contig),
    base_policy=jnp.asarray(base_pol),
  )


# ----------------------------------------------------------------------------------------------
# Networks


def dense_init(
  key: jax.Array, din: int, dout: int, last: bool, init_w: float
) -> dict[str, jax.Array]:
  """Fan-in uniform weights and biases (``uniform(+-init_w)`` weights on a last layer)."""
  kw, kb = jax.random.split(key)
  bound = init_w if last else 1.0 / np.sqrt(din)
  return {
    "w": jax.random.uniform(kw, (din, dout), jnp.float32, -bound, bound),
    "b": jax.random.uniform(kb, (dout,), jnp.float32, -1.0 / np.sqrt(din), 1.0 / np.sqrt(din)),
  }


def _dense_stack(
  key: jax.Array, shapes: Sequence[tuple[int, int]], init_w: float
) -> list[dict[str, jax.Array]]:
  keys = jax.random.split(key, len(shapes))
  last = len(shapes) - 1
  return [dense_init(k, i, o, j == last, init_w) for j, (k, (i, o)) in enumerate(zip(keys, shapes))]


def actor_init(
  key: jax.Array, num_features: int, hidden: int, init_w: float
) -> list[dict[str, jax.Array]]:
  """Actor weights: ``state [F] -> hidden -> hidden -> 1``."""
  return _dense_stack(key, [(num_features, hidden), (hidden, hidden), (hidden, 1)], init_w)


def critic_init(
  key: jax.Array, num_features: int, hidden: int, init_w: float
) -> list[dict[str, jax.Array]]:
  """Critic weights: ``fc(state [F]) + fc(action [1]) -> hidden -> 1``."""
  shapes = [(num_features, hidden), (1, hidden), (hidden, hidden), (hidden, 1)]
  return _dense_stack(key, shapes, init_w)


def actor_apply(params: Any, s: jax.Array) -> jax.Array:
  """Actions in (0, 1) ``[...]`` of states ``[..., F]`` (ReLU, ReLU, sigmoid)."""
  x = jax.nn.relu(s @ params[0]["w"] + params[0]["b"])
  x = jax.nn.relu(x @ params[1]["w"] + params[1]["b"])
  return jax.nn.sigmoid(x @ params[2]["w"] + params[2]["b"])[..., 0]


def critic_apply(params: Any, s: jax.Array, a: jax.Array) -> jax.Array:
  """Q-values ``[...]`` of states ``[..., F]`` and actions ``[...]``."""
  p = params
  x = jax.nn.relu(s @ p[0]["w"] + p[0]["b"] + a[..., None] @ p[1]["w"] + p[1]["b"])
  x = jax.nn.relu(x @ p[2]["w"] + p[2]["b"])
  return (x @ p[3]["w"] + p[3]["b"])[..., 0]


def soft_update(target: Any, online: Any, tau: float) -> Any:
  """``(1 - tau) * target + tau * online``, leaf by leaf."""
  return jax.tree.map(lambda t, x: (1.0 - tau) * t + tau * x, target, online)


# ----------------------------------------------------------------------------------------------
# Replay buffer


def replay_init(capacity: int, num_features: int) -> ReplayBuffer:
  """An empty :class:`ReplayBuffer`."""
  return ReplayBuffer(
    s=jnp.zeros((capacity, num_features), jnp.float32),
    a=jnp.zeros((capacity,), jnp.float32),
    r=jnp.zeros((capacity,), jnp.float32),
    s1=jnp.zeros((capacity, num_features), jnp.float32),
    done=jnp.zeros((capacity,), jnp.float32),
    ptr=jnp.zeros((), jnp.int32),
    size=jnp.zeros((), jnp.int32),
  )


def replay_add(
  buf: ReplayBuffer, s: jax.Array, a: jax.Array, r: jax.Array, s1: jax.Array, done: jax.Array
) -> ReplayBuffer:
  """Writes one transition at ``ptr`` (overwriting the oldest once full)."""
  cap = buf.a.shape[0]
  p = buf.ptr
  return ReplayBuffer(
    s=buf.s.at[p].set(s),
    a=buf.a.at[p].set(a),
    r=buf.r.at[p].set(r),
    s1=buf.s1.at[p].set(s1),
    done=buf.done.at[p].set(done),
    ptr=(p + 1) % cap,
    size=jnp.minimum(buf.size + 1, cap),
  )


def replay_sample(
  buf: ReplayBuffer, key: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """A minibatch ``(s, a, r, s1, done)`` drawn uniformly with replacement from the filled rows."""
  idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buf.size, 1))
  return buf.s[idx], buf.a[idx], buf.r[idx], buf.s1[idx], buf.done[idx]


# ----------------------------------------------------------------------------------------------
# Exploration and episodes


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


def exploration_sigma(episode: jax.Array, config: DDPGConfig) -> jax.Array:
  """float32 ``[]`` ``init_sigma * sigma_decay ** (episode - warmup)``."""
  return config.init_sigma * config.sigma_decay ** (episode - config.warmup).astype(jnp.float32)


def explore(key: jax.Array, mu: jax.Array, sd: jax.Array, warm: jax.Array) -> jax.Array:
  """An action in [0, 1]: uniform while ``warm``, else truncated normal on [0, 1] around ``mu``."""
  ku, kn = jax.random.split(key)
  lo, hi = (0.0 - mu) / sd, (1.0 - mu) / sd
  noisy = mu + sd * jax.random.truncated_normal(kn, lo, hi, (), jnp.float32)
  rand = jax.random.uniform(ku, (), jnp.float32)
  return jnp.clip(jnp.where(warm, rand, noisy), 0.0, 1.0)


def rollout(
  actor: Any, episode: Episode, key: jax.Array, warm: jax.Array, sd: jax.Array, max_bits: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One episode: each step's state carries the previous step's bits (feature 8).

  Returns:
    ``(policy int32 [L, 2], states float32 [S, 10], actions float32 [S])``.
  """
  ep = episode

  def body(prev_bits, xs):
    t, k = xs
    s = ep.feats[t].at[8].set(prev_bits.astype(jnp.float32) / max_bits)
    a = explore(k, actor_apply(actor, s), sd, warm)
    bits = action_to_bits(a, ep.options[t], ep.num_options[t], ep.contiguous[t])
    return bits, (s, a, bits)

  xs = (jnp.arange(ep.num_steps), jax.random.split(key, ep.num_steps))
  _, (states, actions, bits) = jax.lax.scan(body, jnp.zeros((), jnp.int32), xs)
  return ep.base_policy.at[ep.layer, ep.kind].set(bits), states, actions


# ----------------------------------------------------------------------------------------------
# Agent


def ddpg_init(setup: DDPGSetup, key: jax.Array) -> DDPGState:
  """Fresh networks (targets equal), Adam states and an empty replay buffer."""
  cfg = setup.config
  nf = feat_lib.NUM_HAQ_FEATURES
  ka, kc = jax.random.split(key)
  actor = actor_init(ka, nf, cfg.hidden, cfg.init_w)
  critic = critic_init(kc, nf, cfg.hidden, cfg.init_w)
  return DDPGState(
    actor=actor,
    critic=critic,
    actor_target=actor,
    critic_target=critic,
    actor_opt=setup.actor_tx.init(actor),
    critic_opt=setup.critic_tx.init(critic),
    replay=replay_init(setup.capacity, nf),
    moving_avg=jnp.zeros((), jnp.float32),
    has_avg=jnp.zeros((), bool),
    episode=jnp.zeros((), jnp.int32),
  )


def ddpg_ask(
  setup: DDPGSetup, state: DDPGState, key: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """One candidate: ``(policies int32 [1, L, 2], (states [S, 10], actions [S]))``."""
  warm = state.episode <= setup.config.warmup
  sd = exploration_sigma(state.episode, setup.config)
  pol, states, actions = rollout(state.actor, setup.episode, key, warm, sd, setup.max_bits)
  return pol[None], (states, actions)


def ddpg_update(
  setup: DDPGSetup, state: DDPGState, key: jax.Array
) -> tuple[DDPGState, dict[str, jax.Array]]:
  """One critic and one actor step on a replay minibatch, then the soft target updates.

  The critic's target is ``(r - baseline) + gamma * (1 - done) * Q'(s', mu'(s'))`` with the
  baseline a moving average of the minibatch-mean reward.
  """
  cfg = setup.config
  s, a, r, s1, done = replay_sample(state.replay, key, cfg.batch_size)
  next_q = critic_apply(state.critic_target, s1, actor_apply(state.actor_target, s1))
  bm = jnp.mean(r)
  ma = jnp.where(state.has_avg, state.moving_avg + cfg.ma_alpha * (bm - state.moving_avg), bm)
  target = jax.lax.stop_gradient((r - ma) + cfg.gamma * (1.0 - done) * next_q)

  def critic_loss(p):
    return jnp.mean((critic_apply(p, s, a) - target) ** 2)

  cl, cg = jax.value_and_grad(critic_loss)(state.critic)
  cu, critic_opt = setup.critic_tx.update(cg, state.critic_opt, state.critic)
  critic = optax.apply_updates(state.critic, cu)

  def actor_loss(p):
    return -jnp.mean(critic_apply(critic, s, actor_apply(p, s)))

  al, ag = jax.value_and_grad(actor_loss)(state.actor)
  au, actor_opt = setup.actor_tx.update(ag, state.actor_opt, state.actor)
  actor = optax.apply_updates(state.actor, au)
  return state._replace(
    actor=actor,
    critic=critic,
    actor_opt=actor_opt,
    critic_opt=critic_opt,
    actor_target=soft_update(state.actor_target, actor, cfg.tau),
    critic_target=soft_update(state.critic_target, critic, cfg.tau),
    moving_avg=ma,
    has_avg=jnp.ones((), bool),
  ), {"critic_loss": cl, "actor_loss": al}


def ddpg_tell(
  setup: DDPGSetup, state: DDPGState, policies: jax.Array, out: Any, aux: Any, key: jax.Array
) -> tuple[DDPGState, dict[str, jax.Array]]:
  """Stores the episode's steps with its reward; after warm-up each is followed by an update.

  An invalid candidate (over budget) changes nothing.

  Returns:
    ``(state, {"critic_loss", "actor_loss", "sigma"})`` (losses averaged over the steps).
  """
  del policies
  states, actions = aux
  num_steps = setup.episode.num_steps
  r = jnp.asarray(out.reward, jnp.float32)[0]
  ok = jnp.asarray(out.valid)[0]
  learn = state.episode > setup.config.warmup
  # next states: s_{t+1} (the last step's next state is unused: done = 1)
  s1 = jnp.concatenate([states[1:], states[-1:]], axis=0)
  done = (jnp.arange(num_steps) == num_steps - 1).astype(jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  update = functools.partial(ddpg_update, setup)
  skip = lambda st, _: (st, {"critic_loss": zero, "actor_loss": zero})

  def body(st, xs):
    s, a, sn, d, k = xs
    st = st._replace(replay=replay_add(st.replay, s, a, r, sn, d))
    st, m = jax.lax.cond(learn, update, skip, st, k)
    return st, (m["critic_loss"], m["actor_loss"])

  keys = jax.random.split(key, num_steps)
  new_state, (cl, al) = jax.lax.scan(body, state, (states, actions, s1, done, keys))
  new_state = new_state._replace(episode=state.episode + 1)
  new_state = jax.tree.map(lambda x, y: jnp.where(ok, x, y), new_state, state)
  metrics = {
    "critic_loss": jnp.mean(cl),
    "actor_loss": jnp.mean(al),
    "sigma": exploration_sigma(state.episode, setup.config),
  }
  return new_state, metrics


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
  episode = make_episode(space, specs)
  cap = config.replay_episodes * episode.num_steps
  setup = DDPGSetup(
    config=config,
    episode=episode,
    capacity=cap,
    max_bits=float(space.max_bits),
    actor_tx=standard_promotion(optax.adam(config.actor_lr)),
    critic_tx=standard_promotion(optax.adam(config.critic_lr)),
  )
  return Agent(
    name="ddpg",
    population=1,
    init=functools.partial(ddpg_init, setup),
    ask=functools.partial(ddpg_ask, setup),
    tell=functools.partial(ddpg_tell, setup),
    config={
      "agent": "ddpg",
      **dataclasses.asdict(config),
      "steps": episode.num_steps,
      "replay_capacity": cap,
    },
  )


__all__ = [
  "DDPGConfig",
  "DDPGSetup",
  "DDPGState",
  "Episode",
  "ReplayBuffer",
  "action_to_bits",
  "actor_apply",
  "actor_init",
  "critic_apply",
  "critic_init",
  "ddpg_ask",
  "ddpg_init",
  "ddpg_tell",
  "ddpg_update",
  "dense_init",
  "exploration_sigma",
  "explore",
  "make_ddpg",
  "make_episode",
  "replay_add",
  "replay_init",
  "replay_sample",
  "rollout",
  "soft_update",
]
