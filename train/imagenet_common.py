"""The part shared by the ImageNet run configs (``train/{resnet18,vgg16,vit_b32}_imagenet.py``).

The reference work's flow (CIM-AQ, arXiv 2601.21737; its ImageNet configs
``run/configs/q{resnet18,vgg16}_imagenet.yaml`` in rpelke/cim-aq-dev): a torchvision model
pretrained on ImageNet -> INT8 QAT -> mixed precision on the ``rram_256_c4`` target (256x256
crossbars, 4-bit cells, 1-bit DAC) with 1.0 point of allowed top-1 drop from INT8
(``max_accuracy_drop: 1.0``), bits 2..8, first and last layer forced to 8/8
(``force_first_last_layer``) and weight bits a multiple of the cell bits
(``consider_cell_resolution``): cimjax's ``both`` constraint. CIM-AQ's latency model is the
``serial`` mode of ``rram_256_c4`` exactly; the reward is its reward. CIM-AQ fine-tunes 30
epochs a stage on ImageNet; these configs do 1 epoch a stage (any-precision QAT replaces its
per-candidate fine-tuning), a budget to raise for a final number.

Data: ``train.data.path=ROOT`` is ImageNet's own layout, ``ROOT/train/<synset>/*.JPEG`` (1,000
class folders, 1,281,167 images) and ``ROOT/val/<synset>/*.JPEG`` (the 50,000 validation images,
class-per-subfolder as torchvision's ``ImageFolder`` reads them). ``data.val_folder = "test"``
reads ``ROOT/val`` as the run's **test** split (final numbers only), and the search's
validation split is held out of the training set, so the search never tunes on the benchmark's
images. A validation folder of another size: ``--config.train.data.test_size=-1`` (all of it).

Splits: test = all of ``ROOT/val``; val = 10,000 training images held out by a seeded
permutation (``data.val_size``, ``split_seed``); train = the other 1,271,167, streamed
(``data.stream``: grain, decoded and augmented on the fly: random resized crop 224 + flip for
training; resize 256 + centre crop 224 for val and test, which are decoded once into host
memory). Normalisation: ImageNet's mean/std (torchvision's). Classes: the sorted synset folder
names, which is torchvision's class order, so the pretrained head is used as it is; the number
of classes comes from the folder (1,000; a file with another head size is a one-line shape
error naming ``fc.weight`` / ``classifier.6.weight`` / ``heads.head.weight``).

Weights: ``train.pretrained`` must name a torchvision ``state_dict()`` file (``.safetensors``,
or ``.pth`` where torch is installed; docs/pretrained.md says how to write one); nothing is
ever downloaded. Left unset, the check before the first stage fails with one line naming
``config.train.pretrained`` (its default is a sentence saying what to set, not a file).
Training from scratch instead is ``--config.train.pretrained= --config.train.fp32.epochs=90
--config.train.fp32.lr=0.1`` (not tuned here).

Several hosts (a TPU pod slice, a GPU cluster): run the same command on every host with
``--distributed`` (``jax.distributed.initialize()`` finds the pod or the SLURM job), or with
``--num_processes=P --process_id=I --coordinator_address=HOST0:PORT``, and one shared
``--workdir`` (a network file system). Every training stage is data parallel over all
processes' devices (each host streams its own rows of the global batch and saves its iterator
state in the checkpoint), the search splits every batch of candidates between the processes,
and process 0 alone evaluates, compiles and writes the report (docs/multihost.md; tested with
two loopback CPU processes, bit-identical to one process with two devices).

Stages:

* ``fp32``: 0 steps: the pretrained weights are loaded, saved and evaluated on val and test
  (torchvision's batch-norm running statistics are kept: they are already those of the
  evaluation transform, so no re-estimation is needed).
* ``int8``: MSE calibration of every clip, then 1 epoch of QAT at 8/8.
* ``anyprec``: 1 epoch of any-precision QAT (max, min and one sampled policy a step).
* ``search``: PG, 1,000 unique candidates (CIM-AQ: 600 DDPG episodes), each scored on the first
  5,000 held-out val images; the 64 best re-evaluated on the other 5,000, the best of them
  there chosen; INT8 reference and allowed drop as above.
* ``finetune``: 1 epoch of QAT of the chosen policy (batch norm re-estimated first).
* ``evaluate``: FP32, INT8, the search proxy and the fine-tuned model on val and test.
* ``compile``: crossbar program, bit-exact check on 8 test images, crossbar-simulated accuracy
  on 500.

Every field is overridable (``--config.train.int8.epochs=2``, ``--config.search.budget=3000``).
"""

from __future__ import annotations

import ml_collections

from cimjax import pipeline

IMAGENET_VAL_IMAGES = 50_000  # ImageNet-1k's validation set, the run's test split
HELD_OUT_VAL = 10_000  # training images held out as the search's validation split
SEARCH_IMAGES = 5_000  # of those, the search scores on these; the rest re-evaluate the best


def weights_unset(model: str) -> str:
  """The default of ``train.pretrained``: not a file, so the check names the flag to set."""
  return (
    f"<unset: give --config.train.pretrained=/path/to/{model}.safetensors, torchvision's "
    f"ImageNet state_dict (docs/pretrained.md)>"
  )


def imagenet_config(
  model: str,
  *,
  optimizer: str,
  lrs: dict[str, float],
  weight_decay: float,
  batch_size: int = 256,
  eval_batch_size: int = 500,
) -> ml_collections.ConfigDict:
  """The ImageNet run config of a zoo model (module docstring).

  Args:
    model: ``resnet18``, ``vgg16`` or ``vit_b32``.
    optimizer: ``sgd`` (momentum 0.9, Nesterov) or ``adamw`` for the QAT stages.
    lrs: peak learning rate of ``int8``, ``anyprec`` and ``finetune`` (cosine decay to 0).
    weight_decay: of the QAT stages (kernels only).
    batch_size: the global batch (per-device batch x devices x hosts).
    eval_batch_size: evaluation batch (per process).

  Returns:
    The run config (:func:`cimjax.pipeline.default_config` schema).
  """
  c = pipeline.default_config()
  t = c.train
  t.model = model
  t.pretrained = weights_unset(model)
  d = t.data
  d.source = "folder"
  d.path = ""  # required: --config.train.data.path=ROOT (ROOT/train, ROOT/val)
  d.val_folder = "test"  # ImageNet's val/ is the benchmark: the run's test split
  d.stream = True
  d.workers = 8
  d.prefetch = 2
  d.threads = 1
  d.augment = True
  d.crop_size = 224
  d.resize_size = 256
  d.min_scale = 0.08
  d.normalize = "imagenet"
  d.channels = 3  # ImageNet has a few grey and CMYK JPEGs: all become RGB
  d.num_classes = 0  # from the class folders
  d.val_size = HELD_OUT_VAL
  d.test_size = IMAGENET_VAL_IMAGES
  d.test_fraction = 0.0  # the test split is ROOT/val; nothing else is held out for it
  d.train_size = -1
  d.split_seed = 0
  t.batch_size = batch_size
  t.eval_batch_size = eval_batch_size
  t.checkpoint_every = 1000
  t.max_to_keep = 2
  t.log_every = 100
  t.eval_every = 0  # validation (10,000 images) once an epoch
  t.bn_recal_batches = 10
  t.calib_images = 512
  t.fp32.epochs = 0.0
  t.fp32.steps = 0  # pretrained: load, save, evaluate
  for stage in ("int8", "anyprec", "finetune"):
    s = t[stage]
    s.epochs = 1.0
    s.steps = 0
    s.optimizer = optimizer
    s.lr = float(lrs[stage])
    s.warmup_epochs = 0.0
    s.end_lr_frac = 0.0
    s.weight_decay = float(weight_decay)
    s.momentum = 0.9
    s.nesterov = True
  t.anyprec.num_policies = 1
  t.anyprec.include_min = True
  t.finetune.source = "anyprec"
  t.bits.min_bits = 2
  t.bits.max_bits = 8
  t.eval_bits = (8, 6, 4)
  c.hw = "rram_256_c4"
  sc = c.search
  sc.agent = "pg"
  sc.budget = 1000
  sc.acc_drop = 1.0
  sc.constraint = "both"
  sc.search_images = SEARCH_IMAGES
  sc.final_top_k = 64
  c.compile.num_verify = 8
  c.compile.eval_images = 500
  return c
