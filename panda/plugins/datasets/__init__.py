"""Built-in dataset plugins: one module per record format."""
