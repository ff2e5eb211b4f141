"""DiT: a transformer over image patches with adaLN-zero conditioning.

Follows Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023):
patchify, fixed 2D sin-cos position embedding, blocks of
x + gate * Attention(modulate(LayerNorm(x))) and the same for an MLP, where
shift/scale/gate come from a zero-initialised projection of the conditioning
vector (time, plus class), and a final adaLN layer with a zero-initialised
linear head. MD4's 64x64 ImageNet network (google-deepmind/md4) wraps such
DiT blocks in a U-Net (`md4.networks.uvit`, from `PatchDiT` here); this is
the plain DiT, our own code. Input:
every channel's token is embedded with one (vocab_size + 1)-row table and the
channel embeddings of a pixel concatenated; a p x p stride-p convolution maps
each patch to the model width. Output: per patch, logits for the p * p * C
tokens it covers.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from md4.networks import layers

Array = jnp.ndarray
partitioned = layers.partitioned


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2D sin-cos embedding [grid_h * grid_w, dim], row-major positions.

  Half of the features encode the row, half the column (each as sin | cos of
  position times geometric frequencies).
  """
  if dim % 4:
    raise ValueError(
        f"width must be divisible by 4 for 2D sin-cos positions, got {dim}")
  quarter = dim // 4
  freqs = 1.0 / 10_000**(np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

  def encode(pos: np.ndarray) -> np.ndarray:
    angles = pos.reshape(-1, 1) * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

  return np.concatenate([encode(rows), encode(cols)], axis=-1).astype(np.float32)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1.0 + scale) + shift


def _layer_norm(dtype: layers.Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm without affine parameters (adaLN supplies shift and scale)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype,
                      name=name)


def _adaln(num_outputs: int, width: int, dtype: layers.Dtype, cond: Array,
           name: str) -> list[Array]:
  """num_outputs zero-initialised projections [B, 1, width] of cond [B, E]."""
  out = nn.Dense(num_outputs * width, dtype=dtype,
                 kernel_init=partitioned(nn.initializers.zeros, "embed", "mlp"),
                 bias_init=partitioned(nn.initializers.zeros, "mlp"),
                 name=name)(cond)
  return jnp.split(out[:, None, :], num_outputs, axis=-1)


class DiTBlock(nn.Module):
  """adaLN-zero transformer block on x [B, N, width], cond [B, E].

  Dropout as in the MD4 reference's DiT: on the attention output one mask per
  sequence and feature (its Dropout1d), in the MLP after the activation and
  after the output projection.
  """

  num_heads: int
  mlp_ratio: float
  dropout: float
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = ""
  custom_kernels: bool = True
  attention_out_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool) -> Array:
    width = x.shape[-1]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = _adaln(
        6, width, self.dtype, cond, "adaln")
    h = _modulate(_layer_norm(self.dtype, "norm_attention")(x), shift_a, scale_a)
    h = layers.SelfAttention(self.num_heads, out_bias=self.attention_out_bias,
                             attention_impl=self.attention_impl, dtype=self.dtype,
                             custom_kernels=self.custom_kernels, name="attention")(h)
    h = nn.Dropout(self.dropout, broadcast_dims=(1,))(h, deterministic=not train)
    x = x + gate_a * h

    h = _modulate(_layer_norm(self.dtype, "norm_mlp")(x), shift_m, scale_m)
    h = nn.Dense(int(self.mlp_ratio * width), dtype=self.dtype,
                 kernel_init=partitioned(layers.default_init(), "embed", "mlp"),
                 bias_init=partitioned(nn.initializers.zeros, "mlp"),
                 name="mlp_in")(h)
    h = nn.Dropout(self.dropout)(nn.gelu(h), deterministic=not train)
    h = nn.Dense(width, dtype=self.dtype,
                 kernel_init=partitioned(layers.default_init(), "mlp", "embed"),
                 bias_init=partitioned(nn.initializers.zeros, "embed"),
                 name="mlp_out")(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return x + gate_m * h


class PatchDiT(nn.Module):
  """DiT over the p x p patches of features x [B, H, W, C] -> [B, H, W, out_features].

  A p x p stride-p convolution maps each patch to the width, a 2D sin-cos
  position embedding is added (fixed, or a parameter it initialises when
  learned_positions), then the blocks, a final adaLN and a zero-initialised
  linear head giving each patch's p * p * out_features values, in out_dtype,
  whose output axis has the logical name out_axis. cond [B, E] feeds every
  adaLN as it is given.
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  dropout: float
  out_features: int
  learned_positions: bool = False
  attention_out_bias: bool = True
  dtype: layers.Dtype = jnp.float32
  out_dtype: layers.Dtype = jnp.float32
  out_axis: str = "vocab"
  attention_impl: str = ""
  custom_kernels: bool = True

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool) -> Array:
    batch, height, width, _ = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"the DiT's input H x W = {height} x {width} must be divisible by "
                       f"patch_size={p}")
    grid_h, grid_w = height // p, width // p
    h = nn.Conv(self.width, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                kernel_init=partitioned(layers.default_init(), None, None,
                                        "conv_in", "embed"),
                bias_init=partitioned(nn.initializers.zeros, "embed"),
                name="patch_embed")(x)
    h = h.reshape(batch, grid_h * grid_w, self.width)
    sincos = sincos_position_embedding(grid_h, grid_w, self.width)
    positions = sincos
    if self.learned_positions:
      positions = self.param("pos_embed", partitioned(lambda *_: jnp.asarray(sincos),
                                                      None, "embed"), sincos.shape)
    h = h + jnp.asarray(positions, self.dtype)

    for i in range(self.depth):
      h = DiTBlock(self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                   self.attention_impl, self.custom_kernels, self.attention_out_bias,
                   name=f"block_{i}")(h, cond, train)

    shift, scale = _adaln(2, self.width, self.dtype, cond, "adaln_out")
    h = _modulate(_layer_norm(self.dtype, "norm_out")(h), shift, scale)
    out = nn.Dense(p * p * self.out_features, dtype=self.out_dtype,
                   kernel_init=partitioned(nn.initializers.zeros, "embed", self.out_axis),
                   bias_init=partitioned(nn.initializers.zeros, self.out_axis),
                   name="head")(h.astype(self.out_dtype))
    out = out.reshape(batch, grid_h, grid_w, p, p, self.out_features)
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, self.out_features)


class DiT(layers.PixelNetwork):
  """DiT over pixel tokens: z [B, H, W, C] -> logits [B, H, W, C, vocab_size].

  Attributes (and those of `layers.PixelNetwork`), named as the config.model keys:
    patch_size: p; H and W must be multiples of p (H/p * W/p positions).
    width: transformer width (a multiple of 4 and of num_heads).
    num_layers: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / width.
  Not config keys:
    token_embed_dim: width of each channel's token embedding.
    frequency_dim: number of sinusoidal time features.
  """

  patch_size: int = 4
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  token_embed_dim: int = 64
  frequency_dim: int = 256

  @nn.compact
  def logits(self, z: Array, t: Array, label: Array | None, train: bool) -> Array:
    batch, height, width, image_channels = z.shape
    cond = layers.ConditionEmbed(self.width, frequency_dim=self.frequency_dim,
                                 num_classes=self.num_classes, dtype=self.dtype,
                                 name="condition")(t, label)
    h = layers.TokenEmbed(self.vocab_size, self.token_embed_dim, dtype=self.dtype,
                          name="token_embed")(z)
    body = PatchDiT(self.patch_size, self.width, self.num_layers, self.num_heads, self.mlp_ratio,
                    self.dropout_rate, image_channels * self.vocab_size, dtype=self.dtype,
                    attention_impl=self.attention_impl, custom_kernels=self.custom_kernels)
    # Its parameters sit at this module's top level, as if its layers were this module's.
    nn.share_scope(self, body)
    # Logits in float32: bf16 rounding of the logits would blur the likelihood.
    logits = body(h, nn.swish(cond), train)
    return logits.reshape(batch, height, width, image_channels, self.vocab_size)
