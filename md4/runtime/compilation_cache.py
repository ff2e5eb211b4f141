"""The persistent JAX compilation cache that training, evaluation and the benchmarks share.

A restarted run finds its compiled programs there instead of compiling them
again (an 87 s first step becomes a 17 s one). JAX keys each entry by the
program, the devices and the compiler options, so one folder serves every
config and machine.
"""

import os

import jax
import ml_collections


def enable(config: ml_collections.ConfigDict) -> None:
  """Caches compiled programs in config.compilation_cache_dir ('' turns the cache off)."""
  folder = config.compilation_cache_dir
  if folder:
    jax.config.update("jax_compilation_cache_dir",
                      folder if "://" in folder else os.path.expanduser(folder))
