"""md4: masked discrete diffusion (MD4, GenMD4, MDM-Prime) in JAX/Flax."""
