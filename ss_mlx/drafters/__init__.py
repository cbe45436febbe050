"""Draft sources for the decoding loop: the model's own streams, prompt lookup, Medusa heads."""
