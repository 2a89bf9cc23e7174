"""The training job: configs, train state and steps, optimizers, parallelism, checkpoints, metrics."""
