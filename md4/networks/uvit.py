"""U-ViT: MD4's 64x64 ImageNet network, a U-Net whose middle is a DiT.

Follows google-deepmind/md4 (`md4/networks/uvit.py` with its `dit.py`): every
channel's token embedded with one (vocab_size + 1)-row table and the channel
embeddings of a pixel concatenated; a 3x3 conv to `channels`; num_res_blocks
res blocks per level (an average-pooling res block between levels); a DiT over
the p x p patches of the lowest level (learned positions initialised 2D
sin-cos, attention output without bias); num_res_blocks + 1 res blocks per
level on the way up, each after concatenating a skip (a nearest-neighbour res
block between levels); a conditioned GroupNorm, swish and a zero-initialised
3x3 conv to the logits. Every GroupNorm is conditioned: no affine parameters
of its own, scale and shift from a zero-initialised projection of the
conditioning vector (sinusoidal t*1000 [cond_dim] -> Dense(4 cond_dim) ->
swish -> Dense(cond_dim)), which the DiT's adaLN reads through a swish. The
reference's ImageNet 64x64 config: channels=256 (its feature_dim, also the
token embedding and conditioning width), channel_mult=(1,), 8 res blocks, a
DiT of 20 blocks, width 768, 12 heads, patch 2, dropout 0.1.

Differences, on purpose: class labels add a learned embedding to the
conditioning vector (the reference concatenates one before its MLP), the DiT
has no dropout on attention probabilities (fused attention kernels have
none), and the logit head runs in float32.
"""

import flax.linen as nn
import jax.numpy as jnp

from md4.networks import dit
from md4.networks import layers
from md4.networks import unet

Array = jnp.ndarray
partitioned = layers.partitioned


def downsample(x: Array) -> Array:
  """2x2 average pooling: [B, H, W, C] -> [B, H/2, W/2, C]."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class CondGroupNorm(nn.Module):
  """GroupNorm of x [B, H, W, C] without affine parameters, x (1 + scale) + shift from cond [B, E]."""

  groups: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    modulation = nn.Dense(
        2 * x.shape[-1], dtype=self.dtype,
        kernel_init=partitioned(nn.initializers.zeros, "embed", "conv_out"),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"), name="modulation")(cond)
    scale, shift = jnp.split(modulation[:, None, None, :], 2, axis=-1)
    h = nn.GroupNorm(num_groups=self.groups, use_bias=False, use_scale=False,
                     dtype=self.dtype, name="norm")(x)
    return h * (1.0 + scale) + shift


class ResBlock(nn.Module):
  """CondGN-swish-[resample]-conv, CondGN-swish-dropout-conv, + skip (projected if widths differ).

  features None keeps the input width; resample "down" or "up" halves or
  doubles H and W of both the branch and the skip.
  """

  features: int | None
  groups: int
  dropout: float
  resample: str = ""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool) -> Array:
    features = self.features or x.shape[-1]
    h = nn.swish(CondGroupNorm(self.groups, self.dtype, name="norm_in")(x, cond))
    if self.resample:
      resample = downsample if self.resample == "down" else unet.upsample
      h, x = resample(h), resample(x)
    h = unet.conv3x3(features, self.dtype, "conv_in")(h)
    h = nn.swish(CondGroupNorm(self.groups, self.dtype, name="norm_out")(h, cond))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = unet.conv3x3(features, self.dtype, "conv_out", zero_init=True)(h)
    if x.shape[-1] != features:
      x = unet.skip_dense(features, self.dtype)(x)
    return x + h


class UViT(unet.Levels):
  """U-ViT over pixel tokens: z [B, H, W, C] -> logits [B, H, W, C, vocab_size].

  Attributes (and those of `unet.Levels`), named as the config.model keys:
    width, num_layers, num_heads, mlp_ratio: the middle DiT's width, blocks,
      heads and MLP hidden width / width.
    patch_size: the DiT's patch side, at the lowest level.
  """

  width: int = 768
  num_layers: int = 20
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 2

  @nn.compact
  def logits(self, z: Array, t: Array, label: Array | None, train: bool) -> Array:
    groups, dtype, dropout = self.unet_norm_groups, self.dtype, self.dropout_rate
    cond, h = self.stem(z, t, label)
    channels, channel_mult = self.unet_channels, self.unet_channel_mult
    skips = [h]
    last_level = len(channel_mult) - 1
    for level, mult in enumerate(channel_mult):
      for i in range(self.unet_num_res_blocks):
        h = ResBlock(channels * mult, groups, dropout, dtype=dtype,
                     name=f"down_{level}_res_{i}")(h, cond, train)
        skips.append(h)
      if level != last_level:
        h = ResBlock(None, groups, dropout, "down", dtype,
                     name=f"down_{level}_resample")(h, cond, train)
        skips.append(h)

    h = dit.PatchDiT(
        self.patch_size, self.width, self.num_layers, self.num_heads, self.mlp_ratio,
        dropout, h.shape[-1], learned_positions=True, attention_out_bias=False,
        dtype=dtype, out_dtype=dtype, out_axis="conv_out", attention_impl=self.attention_impl,
        custom_kernels=self.custom_kernels, name="middle")(h, nn.swish(cond), train)

    for level in reversed(range(len(channel_mult))):
      for i in range(self.unet_num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(channels * channel_mult[level], groups, dropout,
                     dtype=dtype, name=f"up_{level}_res_{i}")(h, cond, train)
      if level != 0:
        h = ResBlock(None, groups, dropout, "up", dtype,
                     name=f"up_{level}_resample")(h, cond, train)

    h = nn.swish(CondGroupNorm(groups, dtype, name="norm_out")(h, cond))
    return unet.logit_head(h, z.shape[-1], self.vocab_size)
