"""Tiny smoke config: the small CNN on scikit-learn digits (8x8), a few dozen steps a stage.

A run config (:func:`cimjax.pipeline.default_config`) meant for the training stages: its
``train`` part is the training config (the training defaults of
:func:`cimjax.train.default_config`, not the embedded run's short schedules). Run the
training stages (each takes a few seconds on a 2-core CPU, most of it compilation)::

  cimjax --config=train/tiny.py --workdir=/tmp/tiny --stages=fp32,int8,anyprec

or one stage at a time (``--config.<field>`` overrides a field of ``config.train`` there)::

  python -m launch.train --config=train/tiny.py --workdir=/tmp/tiny --stage=fp32
  python -m launch.train --config=train/tiny.py --workdir=/tmp/tiny --stage=int8
  python -m launch.train --config=train/tiny.py --workdir=/tmp/tiny --stage=anyprec
  python -m launch.train --config=train/tiny.py --workdir=/tmp/tiny --stage=finetune \
      --policy=policy.npy

Expect about 90% float test accuracy on digits after the fp32 stage and similar at 8/8; the
accuracies at 2-3 bits are low (a few dozen steps). The unit tests use this config, with
``--config.data.name=fashion_mnist_subset`` (``cimjax``: ``--config.train.data.name=...``) as
an alternative real-image set.
"""

from cimjax import pipeline
from cimjax import train as train_lib


def get_config():
  c = train_lib.default_config()
  c.model = "small_cnn"
  c.model_kwargs.channels = (8, 16, 16)
  c.model_kwargs.hidden = 32
  c.data.name = "digits"
  c.batch_size = 64
  c.eval_batch_size = 512
  c.checkpoint_every = 10
  c.log_every = 10
  c.eval_every = -1
  c.bn_recal_batches = 2
  c.calib_images = 128
  c.progress = False
  c.fast_compile = True
  c.fp32.steps = 40
  c.fp32.lr = 3e-3
  c.fp32.warmup_epochs = 0.0
  c.int8.steps = 10
  c.int8.lr = 5e-4
  c.anyprec.steps = 10
  c.anyprec.lr = 5e-4
  c.anyprec.num_policies = 1  # max-bits + one sampled policy a step: a smaller graph to compile
  c.anyprec.include_min = False
  c.finetune.steps = 10  # the same settings as int8: one compiled step serves both
  c.finetune.lr = 5e-4
  run = pipeline.default_config()
  run.train = c
  return run
