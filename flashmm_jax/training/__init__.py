"""Training: the loop, train state, checkpoints, sharding, losses, progress."""
