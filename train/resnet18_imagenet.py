"""ResNet-18 on ImageNet, the reference work's flow: pretrained FP32 -> INT8 -> mixed precision.

The shared part (data layout, splits, weights, stages, CIM-AQ's constraints) is
``train/imagenet_common.py``; read its docstring first. Here: SGD (momentum 0.9, Nesterov),
weight decay 1e-4, peak lr 1e-4 (INT8 QAT) / 2e-4 (any-precision) / 1e-4 (fine-tune), cosine
decay, global batch 256.

One GPU (``ROOT`` is ImageNet's own layout, ``ROOT/train`` and ``ROOT/val``)::

  cimjax --config=train/resnet18_imagenet.py --config.train.data.path=ROOT \
      --config.train.pretrained=/weights/resnet18.safetensors --workdir=runs/r18_imagenet

8 GPUs on one host: the same command. The stream is data parallel over every local device
(the global batch of 256 is 32 a device); keep ``train.batch_size`` a multiple of the device
count, and raise ``train.data.workers`` to keep the GPUs fed (about 16-24 decoding processes
for 8 GPUs; each needs ~150 MB plus its batches, ``cimjax/data/stream.py``).
``--config.train.batch_size=1024 --config.train.int8.lr=4e-4`` (linear scaling) shortens an
epoch further.

TPU pod slice / several hosts: see ``train/imagenet_common.py`` ("Several hosts").

Expected cost. MEASURED (2026-12-01, 2-core x86-64 CPU, no GPU, load average 8-10 from other
jobs; batch 8, 224x224, 1000 classes, ``launch``-free script over ``cimjax.train.steps``): train
step float 4.23 s, QAT 8/8 4.57 s, any-precision (max + min + 1 sampled policy) 21.8 s; XLA
FLOPs a step 79.6 / 82.4 / 247 G; XLA temporary buffers 0.27 / 0.41 / 1.40 GB, parameters and
optimizer state 0.10 GB. This CPU's 2048x2048 f32 matmul: 64-68 GFLOP/s, so the QAT step ran at
~27% of it. ESTIMATE for one H200 (the team has no GPU figures yet): the same 27% of its float32
peak (67 TFLOP/s; the quantized layers multiply at ``precision=HIGHEST``), i.e. 18 TFLOP/s on the
measured FLOPs: QAT ~0.6 ms/img (~1,750 img/s, INT8 and fine-tune epochs ~12 min each),
any-precision ~1.7 ms/img (~36 min an epoch), search ~16 min (1,000 candidates x 5,000 images x
3.3 GFLOP), evaluations ~2 min: about 1.3 h of accelerator time, if the input keeps up. It may
not: one decoding process here did random-resized-crop of a 500x375 JPEG in 25-31 ms (under that
load), so 8 workers feed ~300 img/s on such cores; use ``train.data.workers`` = the host's cores.
The val/test/sample arrays (62,560 images) are decoded once, in one process, at start (5-30 min)
and held in host memory (~38 GB float32, plus the stream's ~9 GB, ``cimjax/data/stream.py``).
Device memory (temporary buffers scaled linearly from batch 8): one GPU at batch 256 QAT ~13 GB,
any-precision ~45 GB; 8 GPUs (32 a device) ~1.7 / 5.6 GB. Estimates, not measurements.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
  "cimjax_imagenet_common", Path(__file__).with_name("imagenet_common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config():
  return common.imagenet_config(
    "resnet18",
    optimizer="sgd",
    lrs={"int8": 1e-4, "anyprec": 2e-4, "finetune": 1e-4},
    weight_decay=1e-4,
  )
