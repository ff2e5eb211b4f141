"""The samplers and their registry.

A sampler is a module under md4/samplers/ that registers a `Sampler` when it
is imported: its name (the value of `config.sampler`), its options with their
defaults (the only place they are written: `config.sampler_options.<name>`
is built from them), the `Space` features it needs and its network-call
count. Config validation, `python -m md4.evaluate --sampler`, each model's
`supports` and `network_calls` all read this registry, so adding a sampler
is one module and its `register` call (docs/architecture.md shows one).

    tokens = samplers.sample("maskgit", predict_fn, rng, space, shape=(B, L),
                             steps=T).tokens

`engine` holds what they share; `docs/sampling.md` the conventions.
"""

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from md4 import checks
from md4 import registry as md4_registry
from md4.samplers import engine

Array = jnp.ndarray
Samples = engine.Samples
Space = engine.Space
Start = engine.Start


def steps_calls(steps: int, entries: int) -> int:
  """One network call per step."""
  del entries
  return steps


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registered sampler.

  Attributes:
    name: the value of config.sampler that picks it.
    run: (start, rng, **options) -> Samples.
    options: option name -> default; the defaults' types are the options' types.
    needs: the `Space.features` it needs; a model whose space lacks one does
      not support it.
    network_calls: (steps, entries per example) -> the most network calls a run makes.
    frames: whether it records snapshots of the reverse process.
  """

  name: str
  run: Callable[..., Samples]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  needs: frozenset[str] = frozenset()
  network_calls: Callable[[int, int], int] = steps_calls
  frames: bool = False


_REGISTRY = md4_registry.Registry(__name__, __path__, "sampler")
register = _REGISTRY.register
unregister = _REGISTRY.unregister
registry = _REGISTRY.entries  # Every registered sampler by name, the built-in ones imported first.


def names() -> tuple[str, ...]:
  return tuple(registry())


def get(name: str) -> Sampler:
  """The sampler called name; ValueError listing the valid names otherwise."""
  registered = registry()
  if name not in registered:
    raise ValueError(f"sampler={name!r}; valid: {', '.join(registered)}")
  return registered[name]


def supported(features: frozenset[str]) -> tuple[str, ...]:
  """The samplers whose needs a space with these features meets."""
  return tuple(name for name, entry in registry().items() if entry.needs <= features)


def options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
  """Sampler name's options: its defaults updated by given; ValueError naming a bad one."""
  entry = get(name)
  unknown = sorted(set(given) - set(entry.options))
  if unknown:
    raise ValueError(f"sampler {name!r} has no option {', '.join(unknown)}; its options: "
                     f"{', '.join(entry.options) or 'none'}")
  return {**entry.options, **given}


def sample(name: str, predict_fn: checks.PredictFn, rng: Array, space: Space, *,
           shape: tuple[int, ...], steps: int, grid: str = engine.DEFAULT_GRID,
           top_p: float | None = None, prefix: Array | None = None,
           infill: tuple[Array, Array] | None = None, reuse_outputs: bool = False,
           num_frames: int = 0, **given_options) -> Samples:
  """Sampler name's draw of shape [B, *P] in space (arguments: `engine.start`).

  given_options update the sampler's defaults. Raises ValueError when the
  space lacks a feature the sampler needs, or frames are asked of a sampler
  that records none.
  """
  entry = get(name)
  missing = sorted(entry.needs - space.features)
  if missing:
    raise ValueError(f"sampler {name!r} needs {', '.join(missing)}, which "
                     f"{type(space).__name__} lacks")
  if num_frames and not entry.frames:
    raise ValueError(f"frames: the {name!r} sampler records none")
  run_options = options(name, given_options)
  begun = engine.start(predict_fn, rng, space, shape=shape, steps=steps, grid=grid,
                       top_p=top_p, prefix=prefix, infill=infill, reuse_outputs=reuse_outputs,
                       num_frames=num_frames)
  return entry.run(begun, rng, **run_options)
