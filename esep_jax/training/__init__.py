"""Training: the checked plan, the pure step, the loop with dev selection, checkpoints, sweeps."""
