"""Training: objectives, the Trainer, checkpoints, data parallelism."""
