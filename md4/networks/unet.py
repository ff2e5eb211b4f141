"""Convolutional U-Net with self-attention over pixel tokens.

What this follows. MD4's CIFAR-10 network (google-deepmind/md4,
`md4/networks/unet.py`, "adapted from" the VDM U-Net of google-research/vdm)
is a U-Net without downsampling: a 3x3 input conv, 32 residual blocks of 128
channels at 32x32, a middle ResBlock-Attention-ResBlock, 33 up blocks that each
concatenate a skip, GroupNorm-swish-conv head, dropout 0.1, and a 128-wide
conditioning vector (sinusoidal t*1000 [128] -> Dense(512) -> swish ->
Dense(128)) projected, bias-free and zero-initialised, and added after each
block's first conv. Its input embeds every channel's token with one
(257-row) table and concatenates the three channel embeddings per pixel.
This module is our own code for the DDPM-style generalisation of that design:
`channel_mult` levels with a strided conv down / nearest-neighbour-and-conv
up between them, and attention after the res blocks at
`attention_resolutions`. The defaults, channel_mult=(1,), num_res_blocks=32,
no extra attention, reproduce the MD4 CIFAR-10 network and its parameter
count; DDPM's CIFAR-10 network is channels=128, channel_mult=(1, 2, 2, 2),
num_res_blocks=2, attention_resolutions=(16,).

Differences from the reference, on purpose: class labels add a learned
embedding to the conditioning vector, the attention's output projection
starts at zero, and the logit head runs in float32.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from md4.networks import layers

Array = jnp.ndarray
partitioned = layers.partitioned


def conv3x3(features: int, dtype: layers.Dtype, name: str, *, stride: int = 1,
            zero_init: bool = False, out_axis: str = "conv_out") -> nn.Conv:
  kernel_init = nn.initializers.zeros if zero_init else layers.default_init()
  return nn.Conv(features, (3, 3), strides=stride, dtype=dtype,
                 kernel_init=partitioned(kernel_init, None, None, "conv_in", out_axis),
                 bias_init=partitioned(nn.initializers.zeros, out_axis),
                 name=name)


def group_norm(groups: int, dtype: layers.Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, dtype=dtype,
                      scale_init=partitioned(nn.initializers.ones, "norm"),
                      bias_init=partitioned(nn.initializers.zeros, "norm"),
                      name=name)


def skip_dense(features: int, dtype: layers.Dtype) -> nn.Dense:
  """The 1x1 projection ("skip") of a res block's input whose width is not features."""
  return nn.Dense(features, dtype=dtype,
                  kernel_init=partitioned(layers.default_init(), "conv_in", "conv_out"),
                  bias_init=partitioned(nn.initializers.zeros, "conv_out"), name="skip")


def logit_head(h: Array, image_channels: int, vocab_size: int) -> Array:
  """Zero-initialised 3x3 conv ("conv_out") of h [B, H, W, D] -> logits [B, H, W, C, V], float32."""
  # Logits in float32: bf16 rounding of the logits would blur the likelihood.
  logits = conv3x3(image_channels * vocab_size, jnp.float32, "conv_out",
                   zero_init=True, out_axis="vocab")(h.astype(jnp.float32))
  return logits.reshape(*h.shape[:3], image_channels, vocab_size)


def upsample(x: Array) -> Array:
  """Nearest-neighbour x2: [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def check_levels(channels: int, channel_mult: Sequence[int], norm_groups: int, height: int,
                 width: int) -> None:
  """Raises ValueError unless norm_groups divides every level's width and H, W halve at each."""
  if not channel_mult:
    raise ValueError("unet_channel_mult must have at least one level")
  for mult in channel_mult:
    if (channels * mult) % norm_groups:
      raise ValueError(f"unet_norm_groups={norm_groups} must divide every level's "
                       f"width unet_channels * unet_channel_mult = {channels * mult}")
  factor = 2**(len(channel_mult) - 1)
  if height % factor or width % factor:
    raise ValueError(f"z's H x W = {height} x {width} must be divisible by "
                     f"{factor} for unet_channel_mult={tuple(channel_mult)}")


class ResBlock(nn.Module):
  """GN-swish-conv, + projected condition (bias-free, from zero), GN-swish-dropout-conv, + skip."""

  features: int
  groups: int
  dropout: float
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool) -> Array:
    h = nn.swish(group_norm(self.groups, self.dtype, "norm_in")(x))
    h = conv3x3(self.features, self.dtype, "conv_in")(h)
    cond_proj = nn.Dense(
        self.features, use_bias=False, dtype=self.dtype,
        kernel_init=partitioned(nn.initializers.zeros, "embed", "conv_out"), name="cond")
    h = h + cond_proj(cond)[:, None, None, :]
    h = nn.swish(group_norm(self.groups, self.dtype, "norm_out")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(self.features, self.dtype, "conv_out", zero_init=True)(h)
    if x.shape[-1] != self.features:
      x = skip_dense(self.features, self.dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """x + SelfAttention(GroupNorm(x)) over the H*W positions of x [B, H, W, C]."""

  num_heads: int
  groups: int
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = ""
  custom_kernels: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, self.dtype, "norm")(x)
    h = layers.SelfAttention(self.num_heads, zero_init_out=True,
                             attention_impl=self.attention_impl, dtype=self.dtype,
                             custom_kernels=self.custom_kernels, name="attention")(
        h.reshape(batch, height * width, channels))
    return x + h.reshape(x.shape)


class Levels(layers.PixelNetwork):
  """The convolutional levels' fields and input stem, which the U-Net and the U-ViT share.

  Attributes (and those of `layers.PixelNetwork`), named as the config.model keys:
    unet_channels: base width; level i has unet_channels * unet_channel_mult[i].
    unet_channel_mult: one entry per resolution level (len 1 = no downsampling).
    unet_num_res_blocks: res blocks per level on the way down (one more going up).
    unet_norm_groups: GroupNorm groups; must divide every level's width.
    embed_dim: width of each channel's token embedding (0: unet_channels).
    cond_dim: width of the time/label conditioning vector (sinusoidal [cond_dim]
      -> Dense(4 cond_dim) -> swish -> Dense(cond_dim)).
  """

  unet_channels: int = 128
  unet_channel_mult: Sequence[int] = (1,)
  unet_num_res_blocks: int = 32
  unet_norm_groups: int = 32
  embed_dim: int = 0
  cond_dim: int = 128

  def stem(self, z: Array, t: Array, label: Array | None) -> tuple[Array, Array]:
    """(conditioning vector [B, cond_dim], the first level's input [B, H, W, unet_channels])."""
    _, height, width, _ = z.shape
    check_levels(self.unet_channels, self.unet_channel_mult, self.unet_norm_groups, height,
                 width)
    cond = layers.ConditionEmbed(self.cond_dim, frequency_dim=self.cond_dim,
                                 hidden_dim=4 * self.cond_dim,
                                 num_classes=self.num_classes, dtype=self.dtype,
                                 name="condition")(t, label)
    h = layers.TokenEmbed(self.vocab_size, self.embed_dim or self.unet_channels,
                          dtype=self.dtype, name="token_embed")(z)
    return cond, conv3x3(self.unet_channels, self.dtype, "conv_in")(h)


class UNet(Levels):
  """U-Net over pixel tokens: z [B, H, W, C] -> logits [B, H, W, C, vocab_size].

  Attributes (and those of `Levels`), named as the config.model keys:
    unet_attention_resolutions: spatial sizes (H) after whose res blocks
      attention is added; the middle always has one attention block.
    num_heads: attention heads.
  """

  unet_attention_resolutions: Sequence[int] = ()
  num_heads: int = 1

  @nn.compact
  def logits(self, z: Array, t: Array, label: Array | None, train: bool) -> Array:
    channels, channel_mult = self.unet_channels, self.unet_channel_mult
    groups, dtype, custom = self.unet_norm_groups, self.dtype, self.custom_kernels
    cond, h = self.stem(z, t, label)
    skips = [h]
    last_level = len(channel_mult) - 1
    for level, mult in enumerate(channel_mult):
      for i in range(self.unet_num_res_blocks):
        h = ResBlock(channels * mult, groups, self.dropout_rate, dtype,
                     name=f"down_{level}_res_{i}")(h, cond, train)
        if h.shape[1] in self.unet_attention_resolutions:
          h = AttentionBlock(self.num_heads, groups, dtype, self.attention_impl, custom,
                             name=f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level != last_level:
        h = conv3x3(h.shape[-1], dtype, f"down_{level}_resample", stride=2)(h)
        skips.append(h)

    h = ResBlock(h.shape[-1], groups, self.dropout_rate, dtype, name="mid_res_0")(
        h, cond, train)
    h = AttentionBlock(self.num_heads, groups, dtype, self.attention_impl, custom,
                       name="mid_attn")(h)
    h = ResBlock(h.shape[-1], groups, self.dropout_rate, dtype, name="mid_res_1")(
        h, cond, train)

    for level in reversed(range(len(channel_mult))):
      for i in range(self.unet_num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(channels * channel_mult[level], groups,
                     self.dropout_rate, dtype, name=f"up_{level}_res_{i}")(h, cond, train)
        if h.shape[1] in self.unet_attention_resolutions:
          h = AttentionBlock(self.num_heads, groups, dtype, self.attention_impl, custom,
                             name=f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = conv3x3(h.shape[-1], dtype, f"up_{level}_resample")(upsample(h))

    h = nn.swish(group_norm(groups, dtype, "norm_out")(h))
    return logit_head(h, z.shape[-1], self.vocab_size)
