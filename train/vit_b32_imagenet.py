"""ViT-B/32 on ImageNet, the reference work's flow: pretrained FP32 -> INT8 -> mixed precision.

The shared part (data layout, splits, weights, stages, CIM-AQ's constraints) is
``train/imagenet_common.py``; read its docstring first. Here: AdamW, weight decay 0.05 (kernels
only), peak lr 1e-5 (INT8 QAT) / 2e-5 (any-precision) / 1e-5 (fine-tune), cosine decay, global
batch 256. The position embedding fixes the input at 224x224 (50 tokens at patch 32): keep
``train.data.crop_size=224`` with pretrained weights.

One GPU (``ROOT`` is ImageNet's own layout, ``ROOT/train`` and ``ROOT/val``)::

  cimjax --config=train/vit_b32_imagenet.py --config.train.data.path=ROOT \
      --config.train.pretrained=/weights/vit_b32.safetensors --workdir=runs/vit_b32_imagenet

8 GPUs on one host: the same command. The stream is data parallel over every local device
(the global batch of 256 is 32 a device); keep ``train.batch_size`` a multiple of the device
count, and raise ``train.data.workers`` to keep the GPUs fed (about 16-24 decoding processes
for 8 GPUs; each needs ~150 MB plus its batches, ``cimjax/data/stream.py``).
``--config.train.batch_size=1024 --config.train.int8.lr=4e-4`` (linear scaling) shortens an
epoch further.

TPU pod slice / several hosts: see ``train/imagenet_common.py`` ("Several hosts").

Expected cost. MEASURED (2026-12-01, 2-core x86-64 CPU, no GPU, load average 8-10 from other
jobs; batch 8, 224x224, 1000 classes): train step float 9.14 s, QAT 8/8 9.65 s, any-precision
25-81 s (median 54.9 s, heavily contended); XLA FLOPs a step 212 / 217 / 651 G; XLA temporary
buffers 0.16 / 0.72 / 3.03 GB, parameters and optimizer state 0.72 GB. ESTIMATE for one H200
(no GPU figures yet; the assumption of train/resnet18_imagenet.py: 18 TFLOP/s sustained = this
CPU's measured 27% of matmul peak applied to the H200's 67 TFLOP/s float32): QAT ~1.5 ms/img
(~660 img/s, INT8 and fine-tune epochs ~32 min each), any-precision ~4.5 ms/img (~95 min an
epoch), search ~41 min (1,000 x 5,000 images x 8.8 GFLOP), evaluations ~5 min: about 3.4 h.
Host memory and start-up decoding as for ResNet-18. Device memory (temporary buffers scaled
linearly from batch 8): one GPU at batch 256 QAT ~23 GB, any-precision ~97 GB (lower
``train.batch_size`` if it does not fit); 8 GPUs (32 a device) ~3 / 12 GB. Estimates.
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
    "vit_b32",
    optimizer="adamw",
    lrs={"int8": 1e-5, "anyprec": 2e-5, "finetune": 1e-5},
    weight_decay=0.05,
  )
