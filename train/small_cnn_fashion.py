"""Small CNN (5 quantizable layers) on full Fashion-MNIST: FP32 -> INT8 -> any-precision.

Needs the Debian package ``dataset-fashion-mnist`` (or ``CIMJAX_DATA_DIR``). Run from the repo
root, one stage after the other (each resumes if interrupted and is skipped once finished)::

  W=/tmp/cnn_fashion
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=fp32
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=int8
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=anyprec
  python -m launch.train --config=train/small_cnn_fashion.py --workdir=$W --stage=finetune \
      --policy=policy.npy

Data: 55,000 train, 5,000 search-validation (held out from the train file), 10,000 test.
Results land in ``$W/<stage>/result.json`` (val and test accuracy) and ``metrics.jsonl``.
Expected figures on the 2-core development CPU: see BUILD_NOTES.md ("Training"). For a quick
run on a subset: ``--config.data.train_size=10000``.
"""

from cimjax.train import default_config


def get_config():
  c = default_config()
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
  return c
