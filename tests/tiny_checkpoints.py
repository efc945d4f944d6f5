"""Tiny random multi-exit GPT-2 checkpoints written in the real on-disk format (transformers' save_pretrained plus
the exit heads), and their learned exit predictors: the tests' checkpoints (`from tiny_checkpoints import ...`; a
module of its own, not conftest, since bench/ has a conftest too)."""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

TINY = dict(n_layer=4, n_embd=32, n_head=4, vocab_size=257, n_positions=64)
EXITS = (1, 2, 3, 4)


def byte_level_vocab() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable bytes as themselves, the rest shifted to 256+) as a 256-token
    vocabulary, plus <|endoftext|> = 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab["<|endoftext|>"] = 256
    return vocab


def make_hf_checkpoint(folder, exits=EXITS, seed=0, scale=0.35, with_tokenizer=True, fmt="safetensors", **shape):
    """Random transformers GPT2LMHeadModel + exit heads saved with save_pretrained. Returns (hf_model, heads).

    Weights are drawn wider than GPT-2's init so that next-token distributions are peaked (clear argmaxes)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **shape}, activation_function="gelu_new", eos_token_id=256, bos_token_id=256)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, scale if p.dim() == 2 else 0.1)
    d, v = cfg.n_embd, cfg.vocab_size
    heads = {layer: torch.randn(v, d) * scale for layer in exits}
    if exits:
        cfg.lm_head_layer_indices = list(exits)
    model.config = cfg
    model.save_pretrained(folder, safe_serialization=True)
    state = load_file(os.path.join(folder, "model.safetensors"))
    state.update({f"name_to_lm_exit_head.lm_head_{layer}.weight": w for layer, w in heads.items()})
    if fmt == "bin":
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    else:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if with_tokenizer:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(byte_level_vocab(), f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": TINY["n_positions"]}, f)
    return model, heads


def write_predictors(folder, d, exits, seed=0):
    """Random learned exit predictors (confidences spread over (0, 1)) for `exits`, in the stored format."""
    from mexit.model.predictors import ExitPredictors, save_predictors

    g = torch.Generator().manual_seed(seed)
    save_predictors(folder, ExitPredictors(tuple(exits), torch.randn(len(exits), d, generator=g) / d ** 0.5,
                                           0.3 * torch.randn(len(exits), generator=g), 1e-5))
