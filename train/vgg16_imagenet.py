"""VGG-16 on ImageNet, the reference work's flow: pretrained FP32 -> INT8 -> mixed precision.

The shared part (data layout, splits, weights, stages, CIM-AQ's constraints) is
``train/imagenet_common.py``; read its docstring first. Here: SGD (momentum 0.9, Nesterov),
weight decay 5e-4 (torchvision's VGG recipe), peak lr 1e-4 (INT8 QAT) / 2e-4 (any-precision) /
1e-4 (fine-tune), cosine decay, global batch 256. The zoo VGG-16 has no dropout (torchvision's
has 0.5 after fc1 and fc2 in training, docs/pretrained.md); at 224x224 its forward equals
torchvision's.

One GPU (``ROOT`` is ImageNet's own layout, ``ROOT/train`` and ``ROOT/val``)::

  cimjax --config=train/vgg16_imagenet.py --config.train.data.path=ROOT \
      --config.train.pretrained=/weights/vgg16.safetensors --workdir=runs/vgg16_imagenet

8 GPUs on one host: the same command. The stream is data parallel over every local device
(the global batch of 256 is 32 a device); keep ``train.batch_size`` a multiple of the device
count, and raise ``train.data.workers`` to keep the GPUs fed (about 16-24 decoding processes
for 8 GPUs; each needs ~150 MB plus its batches, ``cimjax/data/stream.py``).
``--config.train.batch_size=1024 --config.train.int8.lr=4e-4`` (linear scaling) shortens an
epoch further.

TPU pod slice / several hosts: see ``train/imagenet_common.py`` ("Several hosts").

Expected cost. MEASURED (2026-12-01, 2-core x86-64 CPU, no GPU, load average 9-10 from other
jobs; batch 8, 224x224, 1000 classes): QAT 8/8 train step 86.9 s (81-93 s, contended: 8.4
GFLOP/s), 726 GFLOP (XLA), XLA temporary buffers 1.73 GB, parameters and optimizer state
1.11 GB; the float and any-precision steps were not measured (out of time). ESTIMATE for one
H200 (no GPU figures yet; the assumption of train/resnet18_imagenet.py: 18 TFLOP/s sustained =
this CPU's 27% of matmul peak measured on ResNet-18, applied to the H200's 67 TFLOP/s float32):
QAT ~5 ms/img (~200 img/s, INT8 and fine-tune epochs ~1.8 h each), any-precision ~3x that
(~5.3 h an epoch; 3.0x the FLOPs for the other two models), search ~2.3 h (1,000 x 5,000
images x ~30 GFLOP), evaluations ~17 min: about 11.5 h. Device memory (temporary buffers scaled
linearly from batch 8): QAT ~55 GB at batch 256 on one GPU; any-precision 3.4-4.2x that (the
ratio of the other two) does not fit one 141 GB GPU at 256: on one GPU use
``--config.train.batch_size=128`` (or 96); on 8 GPUs (32 a device) ~7 GB QAT, ~24-29 GB
any-precision. Host memory and start-up decoding as for ResNet-18. Estimates.
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
    "vgg16",
    optimizer="sgd",
    lrs={"int8": 1e-4, "anyprec": 2e-4, "finetune": 1e-4},
    weight_decay=5e-4,
  )
