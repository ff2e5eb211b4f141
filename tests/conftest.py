"""The suite runs JAX on the CPU: with libtpu installed (the tpu extra, for md4-compile's tests)
JAX would otherwise look for a TPU first. Subprocesses inherit the setting."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
