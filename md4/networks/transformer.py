"""Bidirectional DiT-style transformer over sequences.

Reads input ids z through the embedding module the caller gives it (ids
[B, L] by `layers.SequenceEmbed`, positions of K slots [B, L, K] by
`layers.SlotEmbed`), the time t [B] and an optional class label [B]; returns
logits [B, L, vocab_size]. Time and class condition every block through
adaLN-zero from a cond_dim-wide vector; positions through rotary embeddings.
Every parameter carries logical axis names ("vocab", "embed", "heads",
"head_dim", "mlp", "layers") for the mesh rules.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4.networks import kernels
from md4.networks import layers

Array = jnp.ndarray
Dtype = jnp.dtype

OUTPUT_ALIGNMENT = 128
# Logical axes of the residual stream [B, L, width]; only "batch" has a mesh axis (sharding.py).
ACTIVATION_AXES = ("batch", "length", "activation_embed")
FEATURES = "features"  # The collection where Transformer sows its output layer's input.

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


# The gate activation of each gated MLP type; "gelu" is the ungated MLP.
MLP_ACTIVATIONS = {"swiglu": nn.silu, "geglu": nn.gelu, "glu": nn.sigmoid, "gelu": nn.gelu}
# What the adaLN projections read the conditioning vector through: the MD4
# reference's gate activation, and silu (as MDLM) before the ungated MLP.
ADALN_ACTIVATIONS = MLP_ACTIVATIONS | {"gelu": nn.silu}


Initializer = nn.initializers.Initializer


def md4_kernel_init(kind: str, num_layers: int, num_in_axes: int,
                    num_out_axes: int) -> Initializer:
  """md4's: normal, std 0.02 into the blocks, 0.02 / sqrt(2 num_layers) out of them (GPT-2's)."""
  del num_in_axes, num_out_axes
  outward = kind in ("attention_out", "mlp_out")
  return nn.initializers.normal(0.02 / math.sqrt(2 * num_layers) if outward else 0.02)


def reference_kernel_init(kind: str, num_layers: int, num_in_axes: int,
                          num_out_axes: int) -> Initializer:
  """The MD4 reference's: truncated normal of variance scale / fan_in (flax's lecun_normal).

  Scale 1 for the attention kernels; 2 / num_layers for both MLP kernels,
  its depth_scaled_init, which its text configs set.
  """
  scale = 2.0 / num_layers if kind in ("mlp_in", "mlp_out") else 1.0
  return nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=tuple(range(num_in_axes)),
      out_axis=tuple(range(-num_out_axes, 0)))


# config.model.kernel_init -> the law of a block kernel of a kind ("qkv", "attention_out",
# "mlp_in", "mlp_out"), given the depth and the kernel's input and output axis counts.
KERNEL_INITS = {"md4": md4_kernel_init, "reference": reference_kernel_init}


def mlp_hidden_dim(width: int, mlp_ratio: float, multiple_of: int) -> int:
  """int(mlp_ratio * width) rounded up to a multiple of multiple_of (LLaMA's rule at 8/3, 32)."""
  return -(-int(mlp_ratio * width) // multiple_of) * multiple_of


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN: x [B, L, D] with per-sequence shift and scale [B, D]."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


class Linear(nn.Module):
  """Bias-free x [..., *in] -> [..., *features] over x's last num_in_axes axes, by `kernels.dense`.

  The kernel [*in, *features] is nn.DenseGeneral's, so checkpoints carry over.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  kernel_init: Initializer
  dtype: Dtype
  custom_kernels: bool
  num_in_axes: int = 1

  def kernel(self, in_shape: tuple[int, ...]) -> Array:
    """The kernel [*in_shape, *features], in the compute dtype."""
    init = nn.with_logical_partitioning(self.kernel_init, self.kernel_axes)
    return self.param("kernel", init, in_shape + self.features, jnp.float32).astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.kernel(x.shape[x.ndim - self.num_in_axes:])
    return kernels.dense(x.astype(self.dtype), kernel, self.num_in_axes,
                         custom_kernels=self.custom_kernels)


class MlpIn(Linear):
  """The MLP's input projection and activation, x [..., D] -> [..., F].

  features = (num_in, F): the kernel [D, num_in, F] makes gate and up for
  "swiglu", "geglu" and "glu" (sigmoid gate; `kernels.gated_dense`), one
  input for "gelu".
  """

  mlp_type: str = "swiglu"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    activation = MLP_ACTIVATIONS[self.mlp_type]
    kernel = self.kernel(x.shape[-1:])
    x = x.astype(self.dtype)
    if self.mlp_type == "gelu":
      return activation(kernels.dense(x, kernel[:, 0], custom_kernels=self.custom_kernels))
    return kernels.gated_dense(x, kernel, activation, custom_kernels=self.custom_kernels)


class Block(nn.Module):
  """Pre-norm attention + MLP, modulated (adaLN-zero) by an activated conditioning vector [B, C].

  channel_dropout: dropout zeroes a feature across all positions of a sequence
  (the MD4 reference's Dropout1d), not single elements.
  kernel_init: the kernels' initial laws, one of KERNEL_INITS, for a stack of num_layers blocks.
  """

  num_heads: int
  mlp_dim: int
  mlp_type: str
  dropout_rate: float
  channel_dropout: bool
  kernel_init: str
  num_layers: int
  attention_impl: str
  custom_kernels: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool) -> Array:
    # Activations stay split by batch: fsdp then gathers weights rather than split activations.
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    width = x.shape[-1]
    head_dim = width // self.num_heads
    part = nn.with_logical_partitioning
    modulation = nn.Dense(
        6 * width, dtype=self.dtype, name="adaln",
        kernel_init=part(nn.initializers.zeros_init(), ("embed", "mlp")),
        bias_init=part(nn.initializers.zeros_init(), ("mlp",)))(cond)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(modulation, 6, axis=-1)
    dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(1,) if self.channel_dropout else ())

    norm = functools.partial(nn.LayerNorm, use_bias=False, use_scale=False, dtype=self.dtype)
    h = modulate(norm(name="norm_attention")(x), shift_a, scale_a)
    custom = self.custom_kernels
    init = functools.partial(KERNEL_INITS[self.kernel_init], num_layers=self.num_layers)
    qkv = Linear((3, self.num_heads, head_dim), ("embed", None, "heads", "head_dim"),
                 init("qkv", num_in_axes=1, num_out_axes=3), self.dtype, custom, name="qkv")(h)
    # One split, whose gradient is one concatenate rather than three pads and adds.
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
    q, k = (kernels.rotary(a, custom_kernels=custom) for a in (q, k))
    attended = kernels.dot_product_attention(q, k, v, self.attention_impl, custom_kernels=custom)
    h = Linear((width,), ("heads", "head_dim", "embed"),
               init("attention_out", num_in_axes=2, num_out_axes=1), self.dtype, custom,
               num_in_axes=2, name="attention_out")(attended)
    h = dropout(h, deterministic=not train)
    x = x + gate_a[:, None] * h

    h = modulate(norm(name="norm_mlp")(x), shift_m, scale_m)
    num_in = 1 if self.mlp_type == "gelu" else 2
    h = MlpIn((num_in, self.mlp_dim), ("embed", None, "mlp"),
              init("mlp_in", num_in_axes=1, num_out_axes=2), self.dtype, custom,
              mlp_type=self.mlp_type, name="mlp_in")(h)
    h = Linear((width,), ("mlp", "embed"), init("mlp_out", num_in_axes=1, num_out_axes=1),
               self.dtype, custom, name="mlp_out")(h)
    h = dropout(h, deterministic=not train)
    return x + gate_m[:, None] * h


class ScannedBlock(Block):
  """A Block with the (carry, _) -> (carry, None) signature nn.scan expects."""

  @nn.compact
  def __call__(self, x: Array, cond: Array, train: bool):  # pytype: disable=signature-mismatch
    return super().__call__(x, cond, train), None


class Transformer(nn.Module):
  """Transformer over ids z [B, L, ...], t [B] -> logits [B, L, vocab_size].

  Attributes (named as the config.model keys where config.model has them):
    embed: the module mapping the ids z to embeddings [B, L, width], e.g.
      `layers.SequenceEmbed` or `layers.SlotEmbed`; its parameters sit under "embed".
    vocab_size: logits per position (the token values).
    mlp_type: "swiglu", "geglu", "glu" (gated by silu, gelu, sigmoid) or "gelu".
    mlp_ratio, mlp_multiple_of: the MLP's hidden width is int(mlp_ratio * width)
      rounded up to a multiple of mlp_multiple_of.
    cond_dim: width of the conditioning vector: sinusoidal(t) [cond_dim] ->
      Dense(4 cond_dim) -> swish -> Dense(cond_dim), as the MD4 reference's
      CondEmbedding, plus the class embedding; every adaLN reads it through
      ADALN_ACTIVATIONS[mlp_type].
    time_conditioning: "adaln" (the conditioning reads t) or "none" (it reads
      t = 0 whatever t is, as MDLM without time conditioning: the same
      parameters, and the output does not depend on t).
    num_classes: class labels for conditioning (0 = none); id num_classes is
      the null label used by classifier-free guidance.
    channel_dropout: see `Block`.
    kernel_init: the block kernels' initial laws, one of KERNEL_INITS: "md4"
      (normal, std 0.02, outputs 0.02 / sqrt(2 num_layers)) or "reference" (the
      MD4 reference's fan-in laws, `reference_kernel_init`).
    custom_kernels: the custom VJPs and Pallas kernel of `kernels`; False: library ops.
  """

  embed: nn.Module
  vocab_size: int
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  mlp_multiple_of: int = 1
  mlp_type: str = "swiglu"
  cond_dim: int = 128
  time_conditioning: str = "adaln"
  num_classes: int = 0
  dropout_rate: float = 0.0
  channel_dropout: bool = False
  kernel_init: str = "md4"
  attention_impl: str = ""
  remat_policy: str = "none"
  scan_layers: bool = False
  custom_kernels: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array, t: Array, label: Array | None = None, *,
               train: bool = False) -> Array:
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}")
    if self.mlp_type not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_type must be one of {sorted(MLP_ACTIVATIONS)}, "
                       f"got {self.mlp_type!r}")
    if self.kernel_init not in KERNEL_INITS:
      raise ValueError(f"kernel_init must be one of {sorted(KERNEL_INITS)}, "
                       f"got {self.kernel_init!r}")
    if self.time_conditioning not in ("adaln", "none"):
      raise ValueError(f"time_conditioning must be 'adaln' or 'none', got "
                       f"{self.time_conditioning!r}")
    x = self.embed(z)
    if x.shape[-1] != self.width:
      raise ValueError(f"embed gives embeddings of width {x.shape[-1]}, not width={self.width}")
    if self.time_conditioning == "none":
      t = jnp.zeros_like(t)
    cond = layers.ConditionEmbed(
        self.cond_dim, frequency_dim=self.cond_dim, hidden_dim=4 * self.cond_dim,
        num_classes=self.num_classes, dtype=self.dtype, name="condition")(t, label)
    cond = ADALN_ACTIVATIONS[self.mlp_type](cond)
    block_kwargs = dict(
        num_heads=self.num_heads,
        mlp_dim=mlp_hidden_dim(self.width, self.mlp_ratio, self.mlp_multiple_of),
        mlp_type=self.mlp_type, dropout_rate=self.dropout_rate,
        channel_dropout=self.channel_dropout, kernel_init=self.kernel_init,
        num_layers=self.num_layers,
        attention_impl=self.attention_impl, custom_kernels=self.custom_kernels, dtype=self.dtype)
    block_class = ScannedBlock if self.scan_layers else Block
    if self.remat_policy != "none":
      block_class = nn.remat(block_class, policy=REMAT_POLICIES[self.remat_policy],
                             static_argnums=(3,))
    if self.scan_layers:
      scanned = nn.scan(block_class, variable_axes={"params": 0}, split_rngs={
          "params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast),
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**block_kwargs, name="blocks")(x, cond, train)
    else:
      for layer in range(self.num_layers):
        x = block_class(**block_kwargs, name=f"block{layer}")(x, cond, train)

    part = nn.with_logical_partitioning
    shift, scale = jnp.split(nn.Dense(
        2 * self.width, dtype=self.dtype, name="final_adaln",
        kernel_init=part(nn.initializers.zeros_init(), ("embed", "mlp")),
        bias_init=part(nn.initializers.zeros_init(), ("mlp",)))(cond), 2, axis=-1)
    x = modulate(nn.LayerNorm(use_bias=False, use_scale=False, dtype=self.dtype)(x), shift, scale)
    # What `output_logits` reads: a loss can then make the logits a chunk at a time.
    self.sow(FEATURES, "output_input", x)
    # The output width is padded to a multiple of 128 (50257 -> 50304): matmuls with odd
    # widths miss the GPU's fast kernels, and the padded axis can be sharded.
    padded_outputs = -(-self.vocab_size // OUTPUT_ALIGNMENT) * OUTPUT_ALIGNMENT
    logits = nn.Dense(padded_outputs, use_bias=False, dtype=self.dtype, name="output",
                      kernel_init=part(nn.initializers.zeros_init(), ("embed", "vocab")))(x)
    return logits[..., :self.vocab_size].astype(jnp.float32)


def output_logits(params: dict, features: Array, num_outputs: int, dtype: Dtype) -> Array:
  """Transformer's output layer alone: features [..., width] -> logits float32 [..., num_outputs].

  params are the Transformer's; features what it sows in FEATURES.
  """
  kernel = params["output"]["kernel"]
  logits = nn.Dense(kernel.shape[-1], use_bias=False, dtype=dtype).apply(
      {"params": {"kernel": kernel}}, features)
  return logits[..., :num_outputs].astype(jnp.float32)
