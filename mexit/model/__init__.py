"""The model: its configuration, the decoder (blocks, cache, state propagation) and checkpoints."""
