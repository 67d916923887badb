"""Joint mode: one jitted step samples candidates, trains the shared weights on them, scores
them and updates the agent."""

import dataclasses

import jax
import numpy as np
import pytest

from cimjax import cost as cost_lib
from cimjax import data as data_lib
from cimjax import hw as hw_lib
from cimjax import models, trace
from cimjax import train as train_lib
from cimjax.search import env as env_lib
from cimjax.search import joint
from cimjax.search import pg as pg_lib
from cimjax.search import space as space_lib


@pytest.mark.slow
def test_joint_steps_train_weights_and_agent():
  splits = data_lib.load_dataset("digits")
  model = dataclasses.replace(
    models.get_model("small_cnn", channels=(4, 8, 8), hidden=16), input_shape=splits.input_shape
  )
  specs = trace.trace_specs(model)
  hw = hw_lib.load_hw("rram_64_c2")
  table = cost_lib.cost_tables(specs, hw, xp=np).latency_us
  space = space_lib.make_space(len(specs), "both", hw.cell_bits)
  variables = train_lib.init_variables(model, jax.random.PRNGKey(0))
  tx = train_lib.make_optimizer("adamw", 1e-3, 10)
  trainer = train_lib.Trainer(model, tx)
  state = train_lib.create_state(
    variables["params"], variables.get("batch_stats", {}), tx, jax.random.PRNGKey(1)
  )
  agent = pg_lib.make_pg(space, specs, table, pg_lib.PGConfig(population=8, plan=0, prior=False))
  params = env_lib.make_params(table, acc_target=0.0)
  batches = data_lib.train_batches(splits.train, 32, 0)
  res = joint.run_joint(
    trainer,
    agent,
    params,
    state,
    batches,
    splits.val.images[:64],
    splits.val.labels[:64],
    steps=3,
    train_k=2,
    top_k=3,
  )
  assert res.evaluations == 24 and len(res.rewards) == 3
  before = jax.tree.leaves(state.params)
  after = jax.tree.leaves(res.state.train.params)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))
  assert not np.array_equal(np.asarray(res.state.agent.policy.params["theta_w"]), 0.0)
  assert int(res.state.train.step) == 3
  for c in res.candidates:
    assert space.contains(np.asarray(c["policy"])[None]).all()
  assert space.contains(res.best_policy[None]).all()
