"""Per-layer bit-width search: environment, reward, agents, baselines and the search loop.

Public API (see the modules for details):

- space and reward: :func:`make_space`, :class:`SearchSpace`, :mod:`cimjax.search.reward`
  (the function ``reward.reward`` is not re-exported: it would shadow its module);
- accuracy sources: :class:`SyntheticAccuracy`, :class:`DataAccuracy`, :class:`TableAccuracy`,
  :class:`MemoAccuracy`, :class:`MultiProcessAccuracy`, :func:`exhaustive_table`;
- environment: :class:`SearchEnv`, :func:`evaluate_in_graph`, :class:`History`;
- agents: :func:`make_pg` (policy gradient, the main agent; its pieces in
  :mod:`cimjax.search.reinforce`, :mod:`cimjax.search.planner` and :mod:`cimjax.search.mutation`),
  :func:`make_ddpg` (CIM-AQ's reference), :func:`make_random`, :func:`make_exhaustive`; exact
  optima :func:`dp_optimum`, :func:`exhaustive_optimum`;
- the loop: :func:`run_search`, :func:`search_loop`, :class:`SearchConfig`,
  :class:`SearchResult`; joint search + any-precision training: :func:`run_joint`.
"""

from cimjax.search.accuracy import (
  SYNTHETIC_KINDS,
  AccuracySource,
  DataAccuracy,
  MemoAccuracy,
  MultiProcessAccuracy,
  SyntheticAccuracy,
  TableAccuracy,
  exhaustive_table,
)
from cimjax.search.agent import Agent, iteration_keys
from cimjax.search.baselines import (
  Optimum,
  dp_optimum,
  exhaustive_optimum,
  make_exhaustive,
  make_random,
)
from cimjax.search.ddpg import DDPGConfig, DDPGState, ReplayBuffer, action_to_bits, make_ddpg
from cimjax.search.env import (
  EnvParams,
  EvalOut,
  History,
  SearchEnv,
  best_index,
  empty_history,
  evaluate_in_graph,
  pareto_front,
)
from cimjax.search.joint import JointResult, JointState, make_joint_step, run_joint
from cimjax.search.pg import PGConfig, PGState, make_pg, utilities
from cimjax.search.planner import ModelState, PlannerConfig
from cimjax.search.reinforce import ReinforceState
from cimjax.search.reward import accuracy_target
from cimjax.search.runner import (
  AGENTS,
  MODES,
  SearchConfig,
  SearchResult,
  evals_to_reach,
  make_agent,
  make_env,
  run_search,
  search_loop,
  write_outputs,
)
from cimjax.search.space import SearchSpace, make_space, policy_keys
from cimjax.search.state import LoopState, SearchCheckpointer

__all__ = [
  "AGENTS",
  "AccuracySource",
  "Agent",
  "DDPGConfig",
  "DDPGState",
  "DataAccuracy",
  "EnvParams",
  "EvalOut",
  "History",
  "JointResult",
  "JointState",
  "LoopState",
  "MODES",
  "ModelState",
  "MemoAccuracy",
  "MultiProcessAccuracy",
  "Optimum",
  "PGConfig",
  "PGState",
  "PlannerConfig",
  "ReinforceState",
  "ReplayBuffer",
  "SYNTHETIC_KINDS",
  "SearchCheckpointer",
  "SearchConfig",
  "SearchEnv",
  "SearchResult",
  "SearchSpace",
  "SyntheticAccuracy",
  "TableAccuracy",
  "accuracy_target",
  "action_to_bits",
  "best_index",
  "dp_optimum",
  "empty_history",
  "evals_to_reach",
  "evaluate_in_graph",
  "exhaustive_optimum",
  "exhaustive_table",
  "iteration_keys",
  "make_ddpg",
  "make_exhaustive",
  "make_joint_step",
  "make_pg",
  "make_random",
  "make_agent",
  "make_env",
  "make_space",
  "pareto_front",
  "policy_keys",
  "run_joint",
  "run_search",
  "search_loop",
  "utilities",
  "write_outputs",
]
