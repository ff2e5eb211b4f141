"""DiT: a transformer over image patches with adaLN-zero conditioning.

Follows Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023):
patchify, fixed 2D sin-cos position embedding, blocks of
x + gate * Attention(modulate(LayerNorm(x))) and the same for an MLP, where
shift/scale/gate come from a zero-initialised projection of the conditioning
vector (time, plus class), and a final adaLN layer with a zero-initialised
linear head. MD4's 64x64 ImageNet network (google-deepmind/md4) wraps such
DiT blocks in a U-Net (U-ViT); this is the plain DiT, our own code. Input:
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
  """adaLN-zero transformer block on x [B, N, width], cond [B, E]."""

  num_heads: int
  mlp_ratio: float
  dropout: float
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = ""
  custom_kernels: bool = True

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool) -> Array:
    width = x.shape[-1]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = _adaln(
        6, width, self.dtype, cond, "adaln")
    h = _modulate(_layer_norm(self.dtype, "norm_attention")(x), shift_a, scale_a)
    h = layers.SelfAttention(self.num_heads, attention_impl=self.attention_impl,
                             dtype=self.dtype, custom_kernels=self.custom_kernels,
                             name="attention")(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    x = x + gate_a * h

    h = _modulate(_layer_norm(self.dtype, "norm_mlp")(x), shift_m, scale_m)
    h = nn.Dense(int(self.mlp_ratio * width), dtype=self.dtype,
                 kernel_init=partitioned(layers.default_init(), "embed", "mlp"),
                 bias_init=partitioned(nn.initializers.zeros, "mlp"),
                 name="mlp_in")(h)
    h = nn.Dense(width, dtype=self.dtype,
                 kernel_init=partitioned(layers.default_init(), "mlp", "embed"),
                 bias_init=partitioned(nn.initializers.zeros, "embed"),
                 name="mlp_out")(nn.gelu(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return x + gate_m * h


class DiT(nn.Module):
  """DiT over pixel tokens: z [B, H, W, C] -> logits [B, H, W, C, vocab_size].

  Attributes:
    vocab_size: token values per channel (256); vocab_size is the mask id.
    patch_size: p; H and W must be multiples of p (H/p * W/p positions).
    width: transformer width (a multiple of 4 and of num_heads).
    depth: number of DiT blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / width.
    dropout: dropout on the attention and MLP outputs (train=True only).
    token_embed_dim: width of each channel's token embedding.
    frequency_dim: number of sinusoidal time features.
    num_classes: class labels 0..num_classes-1, null id num_classes;
      0 = unconditional.
    dtype: compute dtype (parameters stay float32).
    attention_impl: "" (cuDNN on GPU in half precision, else XLA), "xla" or "cudnn".
    custom_kernels: the custom VJPs and Pallas kernel of `kernels`; False: library ops.
  """

  vocab_size: int = 256
  patch_size: int = 4
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  token_embed_dim: int = 64
  frequency_dim: int = 256
  num_classes: int = 0
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = ""
  custom_kernels: bool = True

  @nn.compact
  def __call__(self, z: Array, t: Array, label: Array | None = None, *,
               train: bool = False) -> Array:
    """Logits float32 [B, H, W, C, vocab_size] for tokens z, times t [B]."""
    layers.check_inputs(z, t, label, vocab_size=self.vocab_size,
                        num_classes=self.num_classes)
    batch, height, width, image_channels = z.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"z's H x W = {height} x {width} must be divisible by "
                       f"patch_size={p}")
    grid_h, grid_w = height // p, width // p
    dtype = self.dtype

    cond = layers.ConditionEmbed(self.width, frequency_dim=self.frequency_dim,
                                 num_classes=self.num_classes, dtype=dtype,
                                 name="condition")(t, label)
    cond = nn.swish(cond)

    h = layers.TokenEmbed(self.vocab_size, self.token_embed_dim, dtype=dtype,
                          name="token_embed")(z)
    h = nn.Conv(self.width, (p, p), strides=p, padding="VALID", dtype=dtype,
                kernel_init=partitioned(layers.default_init(), None, None,
                                        "conv_in", "embed"),
                bias_init=partitioned(nn.initializers.zeros, "embed"),
                name="patch_embed")(h)
    h = h.reshape(batch, grid_h * grid_w, self.width)
    h = h + jnp.asarray(sincos_position_embedding(grid_h, grid_w, self.width), dtype)

    for i in range(self.depth):
      h = DiTBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype,
                   self.attention_impl, self.custom_kernels, name=f"block_{i}")(h, cond, train)

    shift, scale = _adaln(2, self.width, dtype, cond, "adaln_out")
    h = _modulate(_layer_norm(dtype, "norm_out")(h), shift, scale)
    # Logits in float32: bf16 rounding of the logits would blur the likelihood.
    logits = nn.Dense(p * p * image_channels * self.vocab_size, dtype=jnp.float32,
                      kernel_init=partitioned(nn.initializers.zeros, "embed", "vocab"),
                      bias_init=partitioned(nn.initializers.zeros, "vocab"),
                      name="head")(h.astype(jnp.float32))
    logits = logits.reshape(batch, grid_h, grid_w, p, p, image_channels,
                            self.vocab_size)
    logits = logits.transpose(0, 1, 3, 2, 4, 5, 6)
    return logits.reshape(batch, height, width, image_channels, self.vocab_size)
