"""Small CNN (5 quantizable layers) on full Fashion-MNIST: FP32 -> INT8 -> any-precision.

A run config (:func:`cimjax.pipeline.default_config`) meant for the training stages: its
``train`` part holds the longer schedules below (on the training defaults of
:func:`cimjax.train.default_config`). Needs the Debian package ``dataset-fashion-mnist`` (or
``CIMJAX_DATA_DIR``). Run from the repo root (each stage resumes if interrupted and is skipped
once finished)::

  cimjax --config=train/small_cnn_fashion.py --workdir=/tmp/cnn_fashion --stages=fp32,int8,anyprec

or one stage after the other (``--config.<field>`` overrides a field of ``config.train``)::

  W=/tmp/cnn_fashion
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=fp32
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=int8
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=anyprec
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=finetune \
      --policy=policy.npy

Data: 55,000 train, 5,000 search-validation (held out from the train file), 10,000 test.
Results land in ``$W/<stage>/result.json`` (val and test accuracy) and ``metrics.jsonl``.

Measured with these settings (test accuracy; training seconds on the 2-core development CPU
while other jobs kept its load average at 6-7, so an idle machine is 2-3x faster):

  fp32     8 epochs      91.17%                                    610 s (760 img/s)
  int8     0.25 epoch    91.13% at 8/8 (calibration alone: 91.56% val = FP32 val)   28 s
  anyprec  1 epoch       8/8 91.01, 6/6 90.91, 4/4 90.32, 3/3 88.37, 2/2 84.51     207 s
  finetune 1 epoch       (4,4),(2,3),(2,2),(2,2),(4,4): 87.20% before -> 88.74%    86 s

FP32 reaches 90.25% after 4 epochs. A quick run (about 5 minutes under that load):
``--config.fp32.epochs=2 --config.int8.epochs=0.1 --config.anyprec.epochs=0.5
--config.finetune.epochs=0.25`` gives FP32 89.10%, INT8 88.86%, anyprec 88.72 / 88.65 /
87.76 / 86.42 / 82.65% at 8/6/4/3/2 bits (140 + 22 + 120 s of training).
"""

from cimjax import pipeline
from cimjax import train as train_lib


def get_config():
  c = train_lib.default_config()
  c.model = "small_cnn"
  c.model_kwargs.channels = (16, 32, 32)
  c.model_kwargs.hidden = 64
  c.data.name = "fashion_mnist"
  c.data.val_size = 5000
  c.batch_size = 128
  c.checkpoint_every = 500
  c.log_every = 100
  c.fp32.epochs = 8
  c.fp32.optimizer = "adamw"
  c.fp32.lr = 3e-3
  c.fp32.warmup_epochs = 0.3
  c.fp32.weight_decay = 1e-4
  c.int8.epochs = 0.25
  c.int8.lr = 2e-4
  c.anyprec.epochs = 1
  c.anyprec.lr = 5e-4
  c.finetune.epochs = 1
  c.finetune.lr = 2e-4
  run = pipeline.default_config()
  run.train = c
  return run
