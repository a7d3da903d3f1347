"""The networks, their checks, the noise schedulers, mixed precision, checkpoints and trained weights."""
