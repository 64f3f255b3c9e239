"""Built-in training methods."""
