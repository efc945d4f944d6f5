"""mexit: a fast early-exit and Autocontrastive Decoding runtime for multi-exit GPT-2 checkpoints."""

from .checkpoint import random_model, save_checkpoint
from .compat import AutoMultiExitModel, FastMultiExitModel
from .config import GPT2_MEDIUM_MULTIEXIT, DecodeConfig, ModelConfig, MultiExitConfiguration
from .generation import GenerationResult
from .model import MultiExitGPT2
from .runtime import MultiExitLM
from .sampling import SamplingConfig
from .speculative import SpeculativeConfig

__version__ = "0.1.0"


def load(path_or_id, dtype="fp32", device=None, backend: str = "auto", engine: str = "auto",
         compile: bool = False, check_weights: bool = True, pdl: bool = False) -> MultiExitLM:
    """Load a GPT-2 or multi-exit GPT-2 checkpoint (local folder or hub id) ready to `generate`.

    backend: exit stage through "triton" kernels or the "torch" reference (auto: triton on CUDA).
    engine: decode loop "graph" (CUDA graphs), "static" (the same step without capture) or "eager"
    (auto: graph on CUDA). compile: torch.compile the layers of the static step (static / graph engines).
    check_weights: refuse tensors that hold NaN or inf (naming them). pdl: the static steps' kernels use
    programmatic dependent launch (triton backend, static / graph engine, Hopper or newer GPU; off by default until
    measured)."""
    return MultiExitLM.from_pretrained(path_or_id, dtype=dtype, device=device, backend=backend, engine=engine,
                                       compile=compile, check_weights=check_weights, pdl=pdl)


__all__ = [
    "GPT2_MEDIUM_MULTIEXIT", "AutoMultiExitModel", "DecodeConfig", "FastMultiExitModel", "GenerationResult",
    "ModelConfig", "MultiExitConfiguration", "MultiExitGPT2", "MultiExitLM", "SamplingConfig", "load", "random_model",
    "save_checkpoint", "SpeculativeConfig",
]
