"""mexit: a fast early-exit and Autocontrastive Decoding runtime for multi-exit GPT-2 checkpoints.

The public names load on first use (so `mexit --help` and the CLI's errors do not wait for torch)."""

import importlib

from .version import __version__

_WHERE = {
    "ExitPolicy": "mexit.decoding.early_exit", "DecodeConfig": "mexit.decoding.heads",
    "MultiExitConfiguration": "mexit.decoding.fixed", "SamplingConfig": "mexit.decoding.sampling",
    "SpeculativeConfig": "mexit.decoding.speculative", "MultiExitLM": "mexit.frontends.api",
    "load": "mexit.frontends.api", "AutoMultiExitModel": "mexit.frontends.compat",
    "FastMultiExitModel": "mexit.frontends.compat", "GenerationResult": "mexit.generate",
    "NonFiniteStates": "mexit.generate",
    "random_model": "mexit.model.checkpoint", "save_checkpoint": "mexit.model.save", "convert": "mexit.model.save",
    "GPT2_MEDIUM_MULTIEXIT": "mexit.model.config", "ModelConfig": "mexit.model.config",
    "MultiExitGPT2": "mexit.model.decoder",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mexit' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__():
    return sorted([*globals(), *_WHERE])


__all__ = ["__version__", *sorted(_WHERE)]
