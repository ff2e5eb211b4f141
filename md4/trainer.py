"""The trainer: optimizer, train state, train step, and `build`, the assembly.

`build(config)` makes the mesh (checking that the batch splits over it), the
data source, the model and the compiled steps; training (`md4.train`) and
evaluation from a checkpoint (`md4.evaluate`) both start from it.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from md4 import data as data_lib
from md4 import likelihood
from md4 import memory
from md4 import models
from md4 import samplers
from md4.runtime import sharding as sharding_lib

Array = jnp.ndarray
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds of training: step, parameters, optimizer state, EMA parameters."""

  step: Array
  params: Any
  opt_state: Any
  ema_params: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.num_train_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1),
      end_value=opt.learning_rate * opt.min_lr_ratio)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay))


def tree_norm(tree: Any) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_step(model: models.Model, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, state: TrainState,
               batch: dict[str, Array], rng: Array) -> tuple[TrainState, Metrics]:
  """One optimizer step over config.grad_accum_steps micro-batches."""
  rng = jax.random.fold_in(rng, state.step)
  num_micro = config.grad_accum_steps
  micro_batches = jax.tree.map(
      lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch)

  def objective(params, micro_batch, micro_rng):
    output = model.loss(params, micro_batch, micro_rng, True)
    return output.objective.mean() / model.num_tokens, output

  def micro_step(grads_sum, inputs):
    micro_batch, micro_rng = inputs
    (loss, output), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, micro_batch, micro_rng)
    metrics = {"loss": loss, **output.metrics}
    return jax.tree.map(jnp.add, grads_sum, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, metrics = jax.lax.scan(micro_step, zeros,
                                (micro_batches, jax.random.split(rng, num_micro)))
  grads = jax.tree.map(lambda g: g / num_micro, grads)
  metrics = jax.tree.map(jnp.mean, metrics)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - config.ema_rate)
  metrics.update(grad_norm=optax.tree.norm(grads), param_norm=tree_norm(params),
                 learning_rate=learning_rate_schedule(config)(state.step))
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params)
  return new_state, metrics


@dataclasses.dataclass
class Trainer:
  """Compiled steps and the shardings they use."""

  model: models.Model
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Any
  train_step: Any
  eval_step: Any
  sample: Any


def build(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None,
          for_training: bool = False) -> tuple[data_lib.Dataset, Trainer]:
  """(the config's data source, its trainer) on a mesh of devices (default: all).

  Raises ValueError before anything compiles when the batch does not split
  over the mesh, and, for_training, when the first training step would not
  fit in memory (`md4.memory`).
  """
  mesh = sharding_lib.make_mesh(config, devices)
  sharding_lib.check_batch(config, mesh)
  dataset = data_lib.create(config)
  model = models.create(config, dataset.vocab_size, dataset.example_shape, dataset.num_classes)
  if for_training:
    memory.check_training(config, dataset, mesh)
  trainer = compile_steps(config, model, mesh)
  if for_training:
    memory.check_training(config, dataset, mesh, trainer)
  return dataset, trainer


def compile_steps(config: ml_collections.ConfigDict, model: models.Model,
                  mesh: jax.sharding.Mesh) -> Trainer:
  """The optimizer, the train state's sharding and the jitted steps of model on mesh."""
  tx = create_optimizer(config)

  def init_state(rng: Array) -> TrainState:
    params = model.init(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params)

  state_sharding = sharding_lib.tree_sharding(config, mesh,
                                              jax.eval_shape(init_state, jax.random.PRNGKey(0)))
  data_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  init = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)), out_shardings=state_sharding)
  # Traced under the mesh's logical-axis rules, the networks' activation constraints apply.
  with_rules = functools.partial(sharding_lib.traced_with_rules, config, mesh)
  step = jax.jit(with_rules(functools.partial(train_step, model, tx, config)),
                 in_shardings=(state_sharding, data_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  evaluate_step = likelihood.compile_eval_step(config, model, mesh, state_sharding.ema_params,
                                               config.eval_num_t)
  sample = jax.jit(with_rules(functools.partial(sample_from_config, model, config)),
                   static_argnums=(2, 3), in_shardings=(state_sharding.ema_params, replicated),
                   out_shardings=replicated)
  return Trainer(model, mesh, state_sharding, data_sharding, init, step, evaluate_step, sample)


def sample_from_config(model: models.Model, config: ml_collections.ConfigDict, params: Any,
                       rng: Array, num_samples: int, num_frames: int) -> models.Samples:
  """model.sample with the config's sampler settings."""
  top_p = config.sample_top_p
  name, options = models.configured_sampler(config)
  return model.sample(params, rng, num_samples, steps=config.sample_steps,
                      grid=config.sample_grid, top_p=None if top_p >= 1.0 else top_p,
                      num_frames=num_frames if samplers.get(name).frames else 0,
                      guidance_scale=config.guidance_scale, sampler=name, **options)
