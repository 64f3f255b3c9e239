"""The engine-agnostic training loop, checkpoints and metrics."""
