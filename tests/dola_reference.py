"""transformers 4.51.3's DoLa tokens on small deterministic GPT-2 checkpoints, recorded in a side environment:

    python3 -m venv /tmp/tf451 && /tmp/tf451/bin/pip install torch==2.13.0 transformers==4.51.3
    /tmp/tf451/bin/python tests/dola_reference.py tests/data/dola_transformers_4.51.3.json

(transformers moved DoLa out of its core after 4.51; mexit's tests compare against this file.) `write_checkpoint`
uses torch, safetensors and json only, so both environments build the same weights; the file records each
checkpoint's weight digest, which the test checks before comparing tokens."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

SHAPES = {  # name -> (n_layer, tied embeddings)
    "tied-8": (8, True),
    "tied-12": (12, True),
    "untied-6": (6, False),
}
D, HEADS, VOCAB, POSITIONS = 32, 4, 257, 64
DOLA_LAYERS = ["low", "high", [2, 4], [0, 3, 5], [1, 2, 3]]
PROMPTS = [[5], [17, 200, 3, 9], [42, 7, 128, 255, 1, 64, 12, 90, 33]]
NEW_TOKENS = 10
SMALL_MODEL_PROMPTS = ["ROMEO. But soft, what light", "KING HENRY. Once more unto the breach", "To be, or not"]


def write_checkpoint(folder: Path, n_layer: int, tied: bool, seed: int = 0, std: float = 0.35) -> str:
    """A random GPT-2 (peaked distributions: wide normal weights) saved as transformers saves one; returns the
    SHA-256 of its tensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=std):
        return torch.randn(shape, generator=gen) * scale

    state = {"transformer.wte.weight": normal(VOCAB, D), "transformer.wpe.weight": normal(POSITIONS, D)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        state.update({p + "ln_1.weight": 1 + normal(D, scale=0.2), p + "ln_1.bias": normal(D, scale=0.1),
                      p + "attn.c_attn.weight": normal(D, 3 * D), p + "attn.c_attn.bias": normal(3 * D, scale=0.1),
                      p + "attn.c_proj.weight": normal(D, D), p + "attn.c_proj.bias": normal(D, scale=0.1),
                      p + "ln_2.weight": 1 + normal(D, scale=0.2), p + "ln_2.bias": normal(D, scale=0.1),
                      p + "mlp.c_fc.weight": normal(D, 4 * D), p + "mlp.c_fc.bias": normal(4 * D, scale=0.1),
                      p + "mlp.c_proj.weight": normal(4 * D, D), p + "mlp.c_proj.bias": normal(D, scale=0.1)})
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = 1 + normal(D, scale=0.2), normal(D, scale=0.1)
    if not tied:
        state["lm_head.weight"] = normal(VOCAB, D)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": n_layer, "n_embd": D, "n_head": HEADS, "vocab_size": VOCAB, "n_positions": POSITIONS,
              "n_ctx": POSITIONS, "layer_norm_epsilon": 1e-5, "bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1,
              "tie_word_embeddings": tied, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    return digest.hexdigest()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids left-padded with the last vocabulary id, and the attention mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[VOCAB - 1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def record(out: Path) -> None:
    import tempfile

    import transformers
    from transformers import GPT2LMHeadModel

    results = {"transformers": transformers.__version__, "torch": torch.__version__, "new_tokens": NEW_TOKENS,
               "checkpoints": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n_layer, tied) in SHAPES.items():
            digest = write_checkpoint(Path(tmp) / name, n_layer, tied)
            model = GPT2LMHeadModel.from_pretrained(Path(tmp) / name, torch_dtype=torch.float32).eval()
            runs = []
            for layers in DOLA_LAYERS:
                for penalty in (1.0, 1.2):
                    for prompt in PROMPTS:
                        out_ids = model.generate(torch.tensor([prompt]), dola_layers=layers, do_sample=False,
                                                 max_new_tokens=NEW_TOKENS, repetition_penalty=penalty,
                                                 pad_token_id=VOCAB - 1, eos_token_id=None)
                        runs.append({"dola_layers": layers, "repetition_penalty": penalty, "prompt": prompt,
                                     "tokens": out_ids[0, len(prompt):].tolist()})
            results["checkpoints"][name] = {"n_layer": n_layer, "tied": tied, "digest": digest, "runs": runs}
        model = GPT2LMHeadModel.from_pretrained(Path(tmp) / "tied-12", torch_dtype=torch.float32).eval()
        ids, mask = left_padded(PROMPTS)
        results["batches"] = []
        for layers in DOLA_LAYERS:  # transformers' one premature layer per batch
            out_ids = model.generate(ids, attention_mask=mask, dola_layers=layers, do_sample=False,
                                     max_new_tokens=NEW_TOKENS, pad_token_id=VOCAB - 1, eos_token_id=None)
            results["batches"].append({"checkpoint": "tied-12", "dola_layers": layers,
                                       "tokens": out_ids[:, ids.shape[1]:].tolist()})
    small = Path(__file__).resolve().parents[1] / "bench" / "small_model"  # the shipped model, read in fp32
    model = GPT2LMHeadModel.from_pretrained(small, torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(small)
    runs = []
    for layers in ("low", "high", [2, 6]):
        for penalty in (1.0, 1.2):
            for text in SMALL_MODEL_PROMPTS:
                prompt = tokenizer.encode(text)
                out_ids = model.generate(torch.tensor([prompt]), dola_layers=layers, do_sample=False,
                                         max_new_tokens=NEW_TOKENS, repetition_penalty=penalty, eos_token_id=None,
                                         pad_token_id=model.config.eos_token_id)
                runs.append({"dola_layers": layers, "repetition_penalty": penalty, "prompt": prompt,
                             "tokens": out_ids[0, len(prompt):].tolist()})
    digest = hashlib.sha256((small / "model.safetensors").read_bytes()).hexdigest()
    results["small_model"] = {"digest": digest, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]))
