"""Device mesh, logical-axis rules and batch sharding, shared by training and evaluation.

One `jax.sharding.Mesh` with named axes (data, fsdp, tensor); every parameter
carries logical axis names, mapped to mesh axes by `config.sharding_rules`;
batches split over the data-parallel axes.
"""

import functools
import glob
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import ml_collections
import numpy as np

DATA_AXES = ("data", "fsdp")  # Mesh axes that split the batch.


def _on_cloud_tpu_vm() -> bool:
  """TPU VMs expose their chips as /dev/accel* or /dev/vfio/<n>; jax finds the other hosts."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins the other processes of a multi-process run, if this is one.

  Cloud TPU VMs and SLURM jobs are detected; other launchers pass the
  coordinator's host:port, the number of processes and this one's index.
  """
  # CPU-only processes need a collectives backend to talk to each other.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_cloud_tpu_vm():
    jax.distributed.initialize()


def make_mesh(config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A Mesh of the devices (default: all) with config.mesh_axes; a -1 takes the rest."""
  devices = jax.devices() if devices is None else devices
  shape = list(config.mesh_shape)
  num_devices = len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh_shape={tuple(shape)} may hold at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh_shape={tuple(config.mesh_shape)} needs {math.prod(shape)} "
                     f"devices, but {num_devices} are present")
  device_grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(device_grid, tuple(config.mesh_axes))


def logical_rules(config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> tuple[tuple[str, str | None], ...]:
  """config.sharding_rules with mesh axes absent from (or of size 1 in) the mesh dropped."""
  rules = []
  for logical, mesh_axis in config.sharding_rules:
    keep = mesh_axis in mesh.shape and mesh.shape[mesh_axis] > 1
    rules.append((logical, mesh_axis if keep else None))
  return tuple(rules)


def traced_with_rules(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      fn: Callable[..., Any]) -> Callable[..., Any]:
  """fn traced under the mesh and config's rules, "batch" on the data axes: for jax.jit.

  The networks' activation constraints (nn.with_logical_constraint) take effect
  only there; elsewhere (tests, benchmarks) they do nothing.
  """
  data_axes = tuple(axis for axis in DATA_AXES if mesh.shape.get(axis, 1) > 1)
  rules = logical_rules(config, mesh) + (("batch", data_axes or None),)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return traced


def tree_sharding(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  boxed_shapes: Any) -> Any:
  """NamedShardings for a tree of logically partitioned (boxed) shapes, by the config's rules."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_shapes), mesh,
                                     logical_rules(config, mesh))


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Refuses, before anything is built, a micro-batch that does not split over the data axes."""
  parallel = math.prod(mesh.shape[axis] for axis in DATA_AXES if axis in mesh.shape)
  micro_batch = config.batch_size // config.grad_accum_steps
  if micro_batch % parallel:
    raise ValueError(
        f"config.batch_size={config.batch_size} over config.grad_accum_steps="
        f"{config.grad_accum_steps} micro-batches makes {micro_batch} sequences per "
        f"micro-batch, which do not divide over the {parallel} data-parallel devices of the "
        f"mesh {dict(mesh.shape)}: make batch_size / grad_accum_steps a multiple of "
        f"{parallel}, or change config.mesh_shape")


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Batches split over every data-parallel axis (data and fsdp) present."""
  axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def global_batch(batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local batch into one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
