"""Tiny end-to-end run for tests: the whole pipeline on scikit-learn digits in well under a minute.

Run::

  python -m launch.run --config=train/run_tiny.py --workdir=/tmp/run_tiny

Expect a report with a speedup over 8/8 and a passing bit-exact verification; the accuracies
are low (a few dozen training steps on 8x8 digits), the point is exercising every stage.
"""

from cimjax.pipeline import default_config


def get_config():
  c = default_config()
  t = c.train
  t.model_kwargs.channels = (8, 16, 16)
  t.model_kwargs.hidden = 32
  t.data.name = "digits"
  t.data.train_size = -1
  t.data.val_size = -1
  t.batch_size = 64
  t.eval_batch_size = 512
  t.checkpoint_every = 10
  t.log_every = 10
  t.eval_every = -1
  t.bn_recal_batches = 2
  t.calib_images = 128
  t.progress = False
  t.fast_compile = True
  t.fp32.epochs = 0.0
  t.fp32.steps = 40
  t.fp32.lr = 3e-3
  t.fp32.warmup_epochs = 0.0
  for stage in ("int8", "anyprec", "finetune"):
    t[stage].epochs = 0.0
    t[stage].steps = 10
    t[stage].lr = 5e-4
  t.anyprec.num_policies = 1
  t.anyprec.include_min = False
  c.search.budget = 48
  c.search.search_images = 100
  c.compile.num_verify = 4
  c.compile.eval_images = 200
  return c
