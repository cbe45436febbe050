"""Pure array code (trees, caches, sampling, acceptance rules) and the one tree-decoding loop."""
