"""Engines: how a mode's step runs. `eager` (exact shapes, host control, row compaction), `static` (fixed shapes,
device-only steps, predication) and `graph` (the static pieces captured as CUDA graphs)."""
