"""Front ends: the Python API, the transformers / autocontrastive-gen drop-in, the command line."""
