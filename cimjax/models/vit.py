"""Vision Transformer (ViT-B/32 by default) with quantized attention.

Each attention block contributes four quantizable entries in order: the QKV projection, Q.K^T,
A.V and the output projection; each MLP its two dense layers (docs/architecture.md, section 3).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimjax.layers import QuantContext, QuantConv, QuantDense, QuantMatMul


class QuantSelfAttention(nn.Module):
  """Multi-head self-attention: QKV Dense, Q.K^T MatMul, softmax (float), A.V MatMul, out Dense.

  K^T and V are the matrices programmed into the crossbar (quantized with the weight bits); Q
  (scaled by 1/sqrt(head_dim)) and the attention probabilities are the streamed inputs.
  """

  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args: x ``[B, T, D]`` (after LayerNorm). Returns ``[B, T, D]``."""
    b, t, d = x.shape
    hd = d // self.num_heads
    qkv = QuantDense(3 * d, signed_input=True, name="qkv")(x, ctx)
    qkv = qkv.reshape(b, t, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
    q, k, v = qkv[0] * (hd**-0.5), qkv[1], qkv[2]
    logits = QuantMatMul(signed_input=True, name="qk")(q, jnp.swapaxes(k, -1, -2), ctx)
    attn = jax.nn.softmax(logits, axis=-1)
    out = QuantMatMul(signed_input=False, a_clip_init=1.0, name="av")(attn, v, ctx)
    out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
    return QuantDense(d, signed_input=True, name="out")(out, ctx)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args and returns ``[B, T, D]``."""
    y = nn.LayerNorm(name="ln1")(x)
    x = x + QuantSelfAttention(self.num_heads, name="attn")(y, ctx)
    y = nn.LayerNorm(name="ln2")(x)
    # Exact (erf) GELU, as torchvision's nn.GELU(); flax's default is the tanh approximation.
    y = nn.gelu(QuantDense(self.mlp_dim, signed_input=True, name="mlp1")(y, ctx), approximate=False)
    y = QuantDense(x.shape[-1], signed_input=True, name="mlp2")(y, ctx)
    return x + y


class ViT(nn.Module):
  """ViT with a class token and learned position embeddings.

  Attributes:
    patch: patch size (the patch embedding is a conv with kernel = stride = patch).
    hidden: embedding width D.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: MLP width.
    num_classes: logits.
  """

  patch: int = 32
  hidden: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
    """Args: x ``[B, H, W, C]``. Returns logits ``[B, num_classes]`` from the class token."""
    p = (self.patch, self.patch)
    x = QuantConv(self.hidden, p, p, padding="VALID", signed_input=True, name="embed")(x, ctx)
    b = x.shape[0]
    x = x.reshape(b, -1, self.hidden)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden)), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.hidden))
    x = x + pos
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i + 1}")(x, ctx)
    x = nn.LayerNorm(name="ln_final")(x)
    return QuantDense(self.num_classes, signed_input=True, name="head")(x[:, 0], ctx)
