"""Automatic layer geometry checked against geometry derived by hand from each architecture."""

import flax.linen as nn
import pytest

from cimjax import layers, models, trace


def _geom(specs):
  return [(s.kind, s.m, s.n, s.invocations, s.repeat) for s in specs]


def _resnet18_expected():
  g = [("Conv2D", 64, 3 * 7 * 7, 112 * 112, 1)]
  g += [("Conv2D", 64, 64 * 9, 56 * 56, 1)] * 4
  cin = 64
  for width, hw in ((128, 28), (256, 14), (512, 7)):
    g += [
      ("Conv2D", width, cin, hw * hw, 1),  # projection shortcut first
      ("Conv2D", width, cin * 9, hw * hw, 1),  # conv_a (stride 2)
      ("Conv2D", width, width * 9, hw * hw, 1),
    ]  # conv_b
    g += [("Conv2D", width, width * 9, hw * hw, 1)] * 2  # second block
    cin = width
  return g + [("Dense", 1000, 512, 1, 1)]


def _resnet20_expected():
  g = [("Conv2D", 16, 27, 1024, 1)] + [("Conv2D", 16, 144, 1024, 1)] * 6
  cin = 16
  for width, hw in ((32, 16), (64, 8)):
    g += [
      ("Conv2D", width, cin, hw * hw, 1),
      ("Conv2D", width, cin * 9, hw * hw, 1),
      ("Conv2D", width, width * 9, hw * hw, 1),
    ]
    g += [("Conv2D", width, width * 9, hw * hw, 1)] * 4
    cin = width
  return g + [("Dense", 10, 64, 1, 1)]


def _vgg16_expected():
  convs = [
    (64, 3, 224),
    (64, 64, 224),
    (128, 64, 112),
    (128, 128, 112),
    (256, 128, 56),
    (256, 256, 56),
    (256, 256, 56),
    (512, 256, 28),
    (512, 512, 28),
    (512, 512, 28),
    (512, 512, 14),
    (512, 512, 14),
    (512, 512, 14),
  ]
  g = [("Conv2D", co, ci * 9, hw * hw, 1) for co, ci, hw in convs]
  return g + [
    ("Dense", 4096, 512 * 7 * 7, 1, 1),
    ("Dense", 4096, 4096, 1, 1),
    ("Dense", 1000, 4096, 1, 1),
  ]


def _vit_b32_expected():
  t = 1 + (224 // 32) ** 2  # class token + 49 patches
  g = [("Conv2D", 768, 3 * 32 * 32, 49, 1)]
  block = [
    ("Dense", 3 * 768, 768, t, 1),
    ("MatMul", t, 64, t, 12),
    ("MatMul", 64, t, t, 12),
    ("Dense", 768, 768, t, 1),
    ("Dense", 3072, 768, t, 1),
    ("Dense", 768, 3072, t, 1),
  ]
  return g + block * 12 + [("Dense", 1000, 768, 1, 1)]


EXPECTED = {
  "small_cnn": [
    ("Conv2D", 16, 9, 784, 1),
    ("Conv2D", 32, 144, 196, 1),
    ("Conv2D", 32, 288, 49, 1),
    ("Dense", 64, 288, 1, 1),
    ("Dense", 10, 64, 1, 1),
  ],
  "resnet20": _resnet20_expected(),
  "resnet18": _resnet18_expected(),
  "vgg16": _vgg16_expected(),
  "vit_b32": _vit_b32_expected(),
}
COUNTS = {"small_cnn": 5, "resnet20": 22, "resnet18": 21, "vgg16": 16, "vit_b32": 74}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_zoo_geometry_matches_hand_derivation(name):
  specs = trace.trace_specs(models.get_model(name))
  assert len(specs) == COUNTS[name]
  assert _geom(specs) == EXPECTED[name]
  assert len({s.name for s in specs}) == len(specs)  # unique names


def test_resnet_block_order_and_names():
  names = trace.layer_names(trace.trace_specs(models.get_model("resnet18")))
  assert names[:8] == [
    "conv1",
    "stage1_block1/conv_a",
    "stage1_block1/conv_b",
    "stage1_block2/conv_a",
    "stage1_block2/conv_b",
    "stage2_block1/shortcut",
    "stage2_block1/conv_a",
    "stage2_block1/conv_b",
  ]
  assert names[-1] == "fc"


def test_signedness():
  specs = trace.trace_specs(models.get_model("resnet20"))
  assert specs[0].signed_input and not any(s.signed_input for s in specs[1:])
  vit = trace.trace_specs(models.get_model("vit_b32"))
  av = [s for s in vit if s.name.endswith("attn/av")]
  assert len(av) == 12 and not any(s.signed_input for s in av)
  assert all(s.signed_input for s in vit if not s.name.endswith("attn/av"))


def test_grouped_conv_repeat_and_input_shape_override():

  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):
      x = layers.QuantConv(32, (3, 3), (2, 2), padding="SAME", groups=4, name="g")(x, ctx)
      return layers.QuantDense(7, name="d")(x.reshape(x.shape[0], -1, 32), ctx)

  specs = trace.trace_specs(Grouped(), (10, 12, 8))
  assert _geom(specs) == [("Conv2D", 8, 2 * 9, 5 * 6, 4), ("Dense", 7, 32, 30, 1)]
  assert specs[0].groups == 4 and specs[0].weight_count == 8 * 18 * 4
  small = trace.trace_specs(models.get_model("resnet18", image_size=64))
  assert small[0].invocations == 32 * 32 and small[-1].invocations == 1


def test_trace_needs_input_shape_for_bare_module():
  with pytest.raises(ValueError, match="input_shape"):
    trace.trace_specs(models.SmallCNN())
