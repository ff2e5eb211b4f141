"""Whether a config's first training step fits in memory, estimated before anything big is built.

A config that cannot fit (`--config.seq_len=10000000`) would otherwise trace
the model and read the first batch for minutes, growing, before it fails or
is killed. `check` refuses it with one line naming the keys to change. The
estimates, in bytes:

  batches      per host: the first batch and those read ahead
               (md4.data.pipeline.PREFETCH_BATCHES), int32 ids.
  activations  per device, a lower bound: the input of every layer,
               [b, positions, width] in model.dtype, which the backward pass
               keeps, the float32 logits [b, N, V + 1] (of loss_chunk_size
               positions at a time when set) and, for the transformer on
               XLA's attention, one layer's float32 scores [b, heads, L, L];
               b is one device's share of a micro-batch.
  state        per device: parameters, optimizer state and EMA parameters,
               exact from their shapes and sharding.

CPU devices share the host's memory; an accelerator's is its own.
"""

import dataclasses
import math
import os

import jax
import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import pipeline
from md4.networks import kernels
from md4.runtime import sharding as sharding_lib

# Where a cgroup (a container, a SLURM job) caps the host memory a process may use.
_CGROUP_LIMIT = "/sys/fs/cgroup/memory.max"
_FLOAT32_BYTES = 4
_INT32_BYTES = 4
# The keys that size the state, most effective first.
_STATE_KEYS = ("model.width", "model.num_layers")
_NAMES = {"activations": "activations", "batches": "first batch and those read ahead",
          "state": "parameters and optimizer state"}


@dataclasses.dataclass(frozen=True)
class Memory:
  """What a host offers.

  Attributes:
    host_bytes: the host's memory (or its cgroup's limit, when lower).
    device_bytes: one device's memory; None where devices share the host's (CPU).
    devices_per_host: the devices of one process.
    device_kind: the devices' kind, for messages.
  """

  host_bytes: int
  device_bytes: int | None
  devices_per_host: int
  device_kind: str


def available() -> Memory:
  """This host's Memory."""
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if os.path.exists(_CGROUP_LIMIT):
    with open(_CGROUP_LIMIT) as limit:
      text = limit.read().strip()
    if text.isdigit():
      host = min(host, int(text))
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  device_bytes = stats.get("bytes_limit") if stats else None
  return Memory(host, device_bytes, jax.local_device_count(), device.device_kind)


def first_step(config: ml_collections.ConfigDict, example_shape: tuple[int, ...],
               vocab_size: int, rows_per_device: int, local_rows: int,
               attention: str) -> dict[str, int]:
  """{"batches": bytes per host, "activations": bytes per device} (module docstring).

  rows_per_device: one device's rows of a micro-batch; local_rows: this
  host's rows of the batch; attention: the kernel the transformer uses
  ("xla" keeps the scores).
  """
  num_tokens = math.prod(example_shape)
  # An image network sees a width-wide vector per pixel, a sequence model per token.
  positions = num_tokens // example_shape[-1] if len(example_shape) == 3 else num_tokens
  logit_positions = min(num_tokens, config.loss_chunk_size or num_tokens)
  layer_input = np.dtype(config.model.dtype).itemsize * positions * config.model.width
  activations = rows_per_device * (config.model.num_layers * layer_input
                                   + _FLOAT32_BYTES * logit_positions * (vocab_size + 1))
  if config.model.backbone == "transformer" and attention == "xla":
    activations += _FLOAT32_BYTES * rows_per_device * config.model.num_heads * num_tokens**2
  batches = (pipeline.PREFETCH_BATCHES + 1) * local_rows * num_tokens * _INT32_BYTES
  return {"batches": batches, "activations": activations}


def state_bytes(abstract_state, sharding) -> int:
  """Bytes per device of a train state's leaves (ShapeDtypeStructs) laid out by sharding."""
  sizes = jax.tree.map(lambda leaf, where: math.prod(where.shard_shape(leaf.shape))
                       * leaf.dtype.itemsize, abstract_state, sharding)
  return sum(jax.tree.leaves(sizes))


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _value(config: ml_collections.ConfigDict, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def check(config: ml_collections.ConfigDict, needs: dict[str, int], memory: Memory,
          data_keys: tuple[str, ...]) -> None:
  """Raises ValueError when needs (first_step's, and "state" when known) exceed memory.

  The message gives the estimate, its terms and what there is, and names the
  keys of the largest term: data_keys (those that size a batch) for the
  batches and activations.
  """
  per_device = needs["activations"] + needs.get("state", 0)
  if memory.device_bytes is None:
    terms = {**needs, "activations": memory.devices_per_host * needs["activations"],
             "state": memory.devices_per_host * needs.get("state", 0)}
    where = f"host (its {memory.devices_per_host} {memory.device_kind} device(s) share its memory)"
    offered = memory.host_bytes
  elif per_device > memory.device_bytes:
    terms = {name: needs[name] for name in ("activations", "state") if name in needs}
    where, offered = f"{memory.device_kind} device", memory.device_bytes
  else:
    terms = {"batches": needs["batches"]}
    where, offered = "host", memory.host_bytes
  needed = sum(terms.values())
  if needed <= offered:
    return
  largest = max(terms, key=terms.get)
  keys = " or ".join(f"config.{key}={_value(config, key)}"
                     for key in (_STATE_KEYS if largest == "state" else data_keys))
  parts = ", ".join(f"{_NAMES[name]} {_size(size)}" for name, size in terms.items() if size)
  raise ValueError(f"the first training step needs about {_size(needed)} per {where} ({parts}), "
                   f"more than its {_size(offered)}: lower {keys}")


def check_training(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                   mesh: jax.sharding.Mesh, trainer=None) -> None:
  """`check` of config's first training step on this host; with the state once trainer is built.

  Without trainer it needs no tracing, which for a huge seq_len alone takes minutes.
  """
  micro_batch = config.batch_size // config.grad_accum_steps
  rows_per_device = sharding_lib.batch_sharding(mesh).shard_shape(
      (micro_batch, *dataset.example_shape))[0]
  attention = kernels.attention_kernel(config.model.attention_impl, config.model.dtype,
                                       config.model.width // config.model.num_heads)
  needs = first_step(config, dataset.example_shape, dataset.vocab_size, rows_per_device,
                     pipeline.local_batch_size(config.batch_size), attention)
  if trainer is not None:
    needs["state"] = state_bytes(jax.eval_shape(trainer.init, jax.random.PRNGKey(0)),
                                 trainer.state_sharding)
  data_keys = ("seq_len", "batch_size") if dataset.modality == "text" else ("batch_size",)
  check(config, needs, available(), data_keys)
