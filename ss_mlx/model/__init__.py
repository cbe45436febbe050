"""The forward pass: the only code that touches mlx-lm module internals."""
