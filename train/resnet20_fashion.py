"""ResNet-20 (22 quantizable layers, batch norm) on Fashion-MNIST padded to 32x32x3.

ResNet-20 is the CIFAR network and expects 32x32x3 inputs, so the data loader pads each 28x28
image with two background pixels a side and repeats the grey channel three times
(``data.image_size=32``, ``data.channels=3``); the CIM geometry then matches the CIFAR model.

A run config (:func:`cimjax.pipeline.default_config`) meant for the training stages: its
``train`` part holds the schedules below (on the training defaults of
:func:`cimjax.train.default_config`). Run from the repo root (each stage resumes if interrupted
and is skipped once finished)::

  cimjax --config=train/resnet20_fashion.py --workdir=/tmp/resnet20_fashion \
      --stages=fp32,int8,anyprec

or one stage after the other (``--config.<field>`` overrides a field of ``config.train``)::

  W=/tmp/resnet20_fashion
  python -m launch.train --config=train/resnet20_fashion.py --workdir=$W --stage=fp32
  python -m launch.train --config=train/resnet20_fashion.py --workdir=$W --stage=int8
  python -m launch.train --config=train/resnet20_fashion.py --workdir=$W --stage=anyprec
  python -m launch.train --config=train/resnet20_fashion.py --workdir=$W --stage=finetune \
      --policy=policy.npy

Batch norm stays in float after each integer conv; before every evaluation of a policy its
running statistics are re-estimated on ``bn_recal_batches`` training batches
(``cimjax.train.recalibrate_bn``). SGD with Nesterov momentum, cosine schedule.

Measured on one H200 GPU (jax 0.11.2) with shorter stages than these defaults
(``--config.fp32.epochs=8``, ``--config.int8.epochs=1``, ``--config.anyprec.epochs=2``), test
accuracy: FP32 93.68% (38 s, 19k img/s), INT8 93.63% (22 s), any-precision 8/8 93.51,
6/6 93.53, 4/4 92.31, 3/3 90.25, 2/2 89.00% (60 s, 6.6k img/s); each stage also spends
15-50 s compiling. On the 2-core development CPU training runs at about 45 images/s (float)
under load, over 20 minutes an epoch: use a GPU. Smoke run on the CPU:
``--config.data.name=fashion_mnist_subset --config.data.val_size=400 --config.fp32.steps=20``.
"""

from cimjax import pipeline
from cimjax import train as train_lib


def get_config():
  c = train_lib.default_config()
  c.model = "resnet20"
  c.data.name = "fashion_mnist"
  c.data.val_size = 5000
  c.data.image_size = 32
  c.data.channels = 3
  c.batch_size = 128
  c.eval_batch_size = 500
  c.checkpoint_every = 200
  c.log_every = 50
  c.bn_recal_batches = 20
  c.fp32.epochs = 15
  c.fp32.optimizer = "sgd"
  c.fp32.lr = 0.1
  c.fp32.warmup_epochs = 1.0
  c.fp32.weight_decay = 5e-4
  c.int8.epochs = 2
  c.int8.optimizer = "sgd"
  c.int8.lr = 0.005
  c.int8.weight_decay = 5e-4
  c.anyprec.epochs = 5
  c.anyprec.optimizer = "sgd"
  c.anyprec.lr = 0.01
  c.anyprec.weight_decay = 5e-4
  c.finetune.epochs = 2
  c.finetune.optimizer = "sgd"
  c.finetune.lr = 0.005
  c.finetune.weight_decay = 5e-4
  run = pipeline.default_config()
  run.train = c
  return run
