"""mexit: a fast early-exit and Autocontrastive Decoding runtime for multi-exit GPT-2 checkpoints."""

from .decoding.early_exit import ExitPolicy
from .decoding.fixed import DecodeConfig, MultiExitConfiguration
from .decoding.sampling import SamplingConfig
from .decoding.speculative import SpeculativeConfig
from .frontends.api import MultiExitLM, load
from .frontends.compat import AutoMultiExitModel, FastMultiExitModel
from .generate import GenerationResult
from .model.checkpoint import random_model, save_checkpoint
from .model.config import GPT2_MEDIUM_MULTIEXIT, ModelConfig
from .model.decoder import MultiExitGPT2
from .version import __version__

__all__ = [
    "GPT2_MEDIUM_MULTIEXIT", "AutoMultiExitModel", "DecodeConfig", "ExitPolicy", "FastMultiExitModel",
    "GenerationResult", "ModelConfig", "MultiExitConfiguration", "MultiExitGPT2", "MultiExitLM", "SamplingConfig",
    "SpeculativeConfig", "__version__", "load", "random_model", "save_checkpoint",
]
