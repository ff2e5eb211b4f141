"""md4: masked discrete diffusion (MD4, GenMD4, MDM-Prime) in JAX/Flax.

`md4.load(workdir)` gives a trained model to sample from and score (`md4.notebook`).
"""


def __getattr__(name: str):
  # md4.load imports JAX, Flax and Orbax on first use, not with every `import md4.x`.
  if name == "load":
    from md4.notebook import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'md4' has no attribute {name!r}")
