"""Making model directories (random init, the default model, GGUF import); not for decoding."""
