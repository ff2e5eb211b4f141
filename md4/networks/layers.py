"""Building blocks shared by the backbones (`transformer`, `unet`, `dit`).

Every parameter carries logical axis names (`nn.with_logical_partitioning`);
the training loop maps them to mesh axes with rules. The names used:

    vocab     rows of the token table (vocab_size + 1, last = mask) and of
              the class-label table (num_classes + 1, last = null); logits
    embed     model / conditioning width
    mlp       hidden width of MLPs and of the adaLN modulation
    heads     attention heads
    head_dim  per-head width
    conv_in   input channels of a convolution (or 1x1 projection)
    conv_out  output channels of a convolution (or 1x1 projection)
    norm      scales and offsets of normalisation layers
    None      spatial kernel axes and the sinusoidal-frequency axis

"vocab", "embed", "mlp", "heads" and "head_dim" mean what they mean in
`md4.networks.transformer`, so one set of rules serves every network.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4.networks import kernels

Array = jnp.ndarray
Dtype = Any

AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "head_dim", "conv_in",
              "conv_out", "norm")


def partitioned(init: Callable, *names: str | None) -> Callable:
  """`init` whose parameter carries the logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


def default_init(scale: float = 1.0) -> Callable:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def _value_range(x: Array) -> tuple[int, int] | None:
  """(min, max) of x when its values are at hand on this host, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  values = np.asarray(x)
  return int(values.min()), int(values.max())


def check_inputs(z: Array, t: Array, label: Array | None, *, vocab_size: int,
                 num_classes: int) -> None:
  """Raises ValueError naming the argument for malformed network inputs.

  z int [B, H, W, C] in {0..vocab_size} (vocab_size = mask id), t float [B],
  label int [B] in {0..num_classes} (num_classes = null id) or None. Value
  ranges are checked only for concrete (non-traced) arrays.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
    raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
  if not jnp.issubdtype(jnp.asarray(z).dtype, jnp.integer):
    raise ValueError(f"z must hold integer token ids, got dtype {z.dtype}")
  if jnp.ndim(z) != 4:
    raise ValueError(f"z must have shape [B, H, W, C], got {jnp.shape(z)}")
  batch_size = z.shape[0]
  if jnp.shape(t) != (batch_size,):
    raise ValueError(f"t must have shape [B] = ({batch_size},), got {jnp.shape(t)}")
  z_range = _value_range(z)
  if z_range is not None:
    low, high = z_range
    if low < 0 or high > vocab_size:
      raise ValueError(f"z has token ids in [{low}, {high}], outside "
                       f"[0, {vocab_size}] (mask id {vocab_size})")
  if label is None:
    return
  if num_classes == 0:
    raise ValueError("label must be None for an unconditional network "
                     "(num_classes=0)")
  if not jnp.issubdtype(jnp.asarray(label).dtype, jnp.integer):
    raise ValueError(f"label must hold integer class ids, got dtype {label.dtype}")
  if jnp.shape(label) != (batch_size,):
    raise ValueError(
        f"label must have shape [B] = ({batch_size},), got {jnp.shape(label)}")
  label_range = _value_range(label)
  if label_range is not None:
    low, high = label_range
    if low < 0 or high > num_classes:
      raise ValueError(f"label has ids in [{low}, {high}], outside "
                       f"[0, {num_classes}] (null id {num_classes})")


def timestep_embedding(t: Array, dim: int, scale: float = 1000.0,
                       max_period: float = 10_000.0) -> Array:
  """Sinusoidal features [B, dim] of t [B] (t scaled to [0, scale] first)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = scale * t.astype(jnp.float32)[:, None] * freqs[None, :]
  features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(features, ((0, 0), (0, dim - 2 * half)))


# Tables up to this many rows are read by a one-hot matmul (see Embed).
ONE_HOT_MAX_IDS = 1024


# The token tables' initial laws, by config.model.embed_init: md4's unit normal, or the MD4
# reference's (flax nn.Embed's default, normal of std 1/sqrt(width of the table)).
EMBED_INITS = {
    "md4": nn.initializers.normal(1.0),
    "reference": nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
}


def table_init(embed_init: str) -> Callable:
  """The init (with logical axes) of a token table; embed_init names one of EMBED_INITS."""
  if embed_init not in EMBED_INITS:
    raise ValueError(f"embed_init={embed_init!r}; valid: {', '.join(EMBED_INITS)}")
  return partitioned(EMBED_INITS[embed_init], "vocab", "embed")


class Embed(nn.Module):
  """nn.Embed (same parameter) whose gradient avoids contended scatter-adds: ids -> [..., features].

  The gradient of a gather is a scatter-add, and where many tokens share few
  rows (27 characters, 257 pixel values) GPU atomics serialise on those rows,
  bf16 ones worst (compare-and-swap loops). Small tables are therefore read by
  a one-hot matmul, whose gradient is a matmul; larger ones are gathered in
  float32, which GPUs add atomically in hardware, and then cast.
  """

  num_embeddings: int
  features: int
  embedding_init: Callable
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param("embedding", self.embedding_init,
                       (self.num_embeddings, self.features), jnp.float32)
    if self.num_embeddings <= ONE_HOT_MAX_IDS:
      one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=self.dtype)
      # HIGHEST: each output is exactly one table entry, also where f32 matmuls default to TF32.
      return jnp.dot(one_hot, table.astype(self.dtype), precision=jax.lax.Precision.HIGHEST)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class SequenceEmbed(nn.Module):
  """Embeds a sequence of ids [B, L] in 0..num_ids-1 -> [B, L, features], one `Embed` table.

  table_dim = 0 (or features): the table is [num_ids, features]. Otherwise a
  narrower table [num_ids, table_dim] and a Dense to features ("project"), as
  the MD4 reference's text8 model embeds its 28 ids in 64 features.
  embed_init: the table's initial law, one of EMBED_INITS.
  """

  num_ids: int
  features: int
  table_dim: int = 0
  embed_init: str = "md4"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table_dim = self.table_dim or self.features
    table = Embed(self.num_ids, table_dim, table_init(self.embed_init), self.dtype)
    # The table's parameter is this module's "embedding", as if it were the Embed itself.
    nn.share_scope(self, table)
    h = table(ids)
    if table_dim == self.features:
      return h
    return nn.Dense(self.features, dtype=self.dtype, name="project",
                    kernel_init=partitioned(default_init(), None, "embed"),
                    bias_init=partitioned(nn.initializers.zeros, "embed"))(h)


class SlotEmbed(nn.Module):
  """Embeds positions made of K = num_slots slots: ids [B, L, K] -> [B, L, features].

  Each slot has its own table ("slot0", "slot1", ...) of width
  ceil(features / K); a position's K embeddings are concatenated, and
  projected bias-free to features ("project") only when K does not divide it.
  embed_init: the tables' initial law, one of EMBED_INITS.
  """

  num_ids: int
  num_slots: int
  features: int
  embed_init: str = "md4"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    if ids.shape[-1] != self.num_slots:
      raise ValueError(f"ids must have num_slots={self.num_slots} slots in their last axis, "
                       f"got shape {ids.shape}")
    slot_width = -(-self.features // self.num_slots)
    h = jnp.concatenate([
        Embed(self.num_ids, slot_width, table_init(self.embed_init), self.dtype,
              name=f"slot{j}")(ids[..., j])
        for j in range(self.num_slots)
    ], axis=-1)
    if self.num_slots * slot_width == self.features:
      return h
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="project",
                    kernel_init=partitioned(nn.initializers.normal(0.02), "embed", None))(h)


class TokenEmbed(nn.Module):
  """Embeds each channel's token (table of vocab_size + 1 rows, mask last).

  z int [B, H, W, C] -> [B, H, W, C * features]: the C channel embeddings of a
  pixel are concatenated, so one table serves every channel.
  """

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    table = Embed(self.vocab_size + 1, self.features, table_init("md4"), self.dtype, name="table")
    x = table(z)
    return x.reshape(z.shape[:-1] + (z.shape[-1] * self.features,))


class ConditionEmbed(nn.Module):
  """Time (and class) conditioning vector [B, features].

  sinusoidal(t) [B, frequency_dim] -> Dense(hidden_dim) -> swish ->
  Dense(features), plus a learned class embedding when num_classes > 0 (label
  None means the null class num_classes). hidden_dim 0 means features.
  """

  features: int
  frequency_dim: int = 256
  hidden_dim: int = 0
  num_classes: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, label: Array | None) -> Array:
    h = timestep_embedding(t, self.frequency_dim).astype(self.dtype)
    h = nn.Dense(self.hidden_dim or self.features, dtype=self.dtype,
                 kernel_init=partitioned(default_init(), None, "mlp"),
                 bias_init=partitioned(nn.initializers.zeros, "mlp"),
                 name="time_in")(h)
    h = nn.Dense(self.features, dtype=self.dtype,
                 kernel_init=partitioned(default_init(), "mlp", "embed"),
                 bias_init=partitioned(nn.initializers.zeros, "embed"),
                 name="time_out")(nn.swish(h))
    if self.num_classes == 0:
      return h
    if label is None:
      label = jnp.full(t.shape, self.num_classes, jnp.int32)
    label_table = nn.Embed(
        self.num_classes + 1, self.features, dtype=self.dtype,
        embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
        name="label")
    return h + label_table(label)


class Projection(nn.Module):
  """x [..., *in] -> [..., *features] over x's last num_in_axes axes, plus a bias [*features].

  nn.DenseGeneral's parameters, but the kernel [*in, *features] is drawn and
  annotated at the shape it is stored in: nn.DenseGeneral draws it flattened
  to 2-D, where the names of its axes fail under a mesh's logical-axis rules.
  kernel_init: None for default_init (fan-in over the in axes), else an init.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_in_axes: int = 1
  kernel_init: Callable | None = None
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.num_in_axes:]
    in_axes = tuple(range(self.num_in_axes))
    out_axes = tuple(range(self.num_in_axes, self.num_in_axes + len(self.features)))
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes)
    kernel = self.param("kernel", partitioned(init, *self.kernel_axes),
                        in_shape + self.features, jnp.float32)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), self.num_in_axes)
    if not self.use_bias:
      return y
    bias = self.param("bias", partitioned(nn.initializers.zeros,
                                          *self.kernel_axes[self.num_in_axes:]),
                      self.features, jnp.float32)
    return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention over x [B, N, D] -> [B, N, D].

  Softmax attention by `kernels.dot_product_attention` (attention_impl: ""
  picks, or "xla" / "cudnn"; custom_kernels: False for the library op).
  zero_init_out starts the output projection at zero (an ungated residual
  branch then starts as identity); leave it off behind a zero-initialised
  gate, where two zeros in a row would leave both without gradient.
  out_bias: whether the output projection has a bias.
  """

  num_heads: int
  zero_init_out: bool = False
  out_bias: bool = True
  attention_impl: str = ""
  dtype: Dtype = jnp.float32
  custom_kernels: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the attention "
                       f"width {width}")
    head_dim = width // self.num_heads
    q, k, v = (Projection((self.num_heads, head_dim), ("embed", "heads", "head_dim"),
                          dtype=self.dtype, name=name)(x) for name in ("query", "key", "value"))
    h = kernels.dot_product_attention(  # [B, N, heads, head_dim]
        q, k, v, self.attention_impl, custom_kernels=self.custom_kernels)
    return Projection((width,), ("heads", "head_dim", "embed"), num_in_axes=2,
                      kernel_init=nn.initializers.zeros if self.zero_init_out else None,
                      use_bias=self.out_bias, dtype=self.dtype, name="out")(h)


class PixelNetwork(nn.Module):
  """What the image backbones share: z [B, H, W, C], t [B], label -> logits [B, H, W, C, V].

  Subclasses implement `logits`; the inputs are checked first (`check_inputs`).
  Their fields carry the names of the config.model keys they read.

  Attributes:
    vocab_size: token values per channel (256); vocab_size is the mask id.
    num_classes: class labels 0..num_classes-1, null id num_classes; 0 = unconditional.
    dropout_rate: dropout in the blocks (train=True only).
    dtype: compute dtype (parameters stay float32).
    attention_impl: "" (cuDNN on GPU in half precision, else XLA), "xla" or "cudnn".
    custom_kernels: the custom VJPs and Pallas kernel of `kernels`; False: library ops.
  """

  vocab_size: int = 256
  num_classes: int = 0
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: str = ""
  custom_kernels: bool = True

  def __call__(self, z: Array, t: Array, label: Array | None = None, *,
               train: bool = False) -> Array:
    """Logits float32 [B, H, W, C, vocab_size] for tokens z, times t [B]."""
    check_inputs(z, t, label, vocab_size=self.vocab_size, num_classes=self.num_classes)
    return self.logits(z, t, label, train)

  def logits(self, z: Array, t: Array, label: Array | None, train: bool) -> Array:
    raise NotImplementedError
