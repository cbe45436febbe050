"""PyTorch side of ss-mlx: training Speculative Streaming models and exporting them to MLX."""
