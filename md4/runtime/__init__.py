"""What runs md4 rather than what it computes: checkpoints, storage, the workdir lock,
preemption, sharding, the compilation cache, start-up, metric writers, progress
bars and the commands' errors."""
