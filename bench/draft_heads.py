"""Cheap draft heads compared on held-out text: how often a draft head's top-1 equals the target's (the greedy
acceptance of a one-token draft, teacher-forced), against the weights it reads.

    python -m mexit.bench.draft_heads --model bench/small_model_12l --text eval.txt [--exits 2 4] [--out DIR]

Heads compared at each draft exit L (`ln_f(h_L)` as input, the original head at full depth as target):
- `full`: exit L's head, V x d;
- `vocab N`: its rows of the N most frequent tokens (the checkpoint's token counts; what `draft_vocab` runs);
- `rank r`: the best rank-r factorization of the head (truncated SVD, W ~ A B with A [V, r], B [r, d]): reads
  r (V + d) weights; not built into the runtime, measured here to see whether it would pay;
- `vocab N, rank r`: both.

Everything is exact arithmetic on the model's own states (fp32, CPU); no timing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def states(model, blocks: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: ln_f(h_layer)} [N, d] over every position of blocks [B, T] (one pass of the model)."""
    b, t = blocks.shape
    with torch.no_grad():
        out = model.forward(blocks, layers)[1]
    return {layer: model.final_norm(h.reshape(b * t, -1)).float() for layer, h in out.items()}


def compare(model, blocks: torch.Tensor, exits: list[int], vocabs: list[int], ranks: list[int]) -> list[dict]:
    from mexit.model.token_counts import draft_vocabulary

    n, v, d = model.config.n_layer, model.config.vocab_size, model.config.n_embd
    feats = states(model, blocks, sorted({*exits, n}))
    target = (feats[n] @ model.head_weight("original").float().T).argmax(-1)
    rows = []
    for layer in exits:
        w, x = model.head_weight(layer).float(), feats[layer]
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        heads = [("full", None, None)] + [(f"vocab {k}", k, None) for k in vocabs]
        heads += [(f"rank {r}", None, r) for r in ranks] + [(f"vocab {k}, rank {r}", k, r) for k in vocabs
                                                              for r in ranks]
        for name, k, r in heads:
            ids = draft_vocabulary(model.token_counts, k) if k else torch.arange(v)
            if r is None:
                logits, read = x @ w[ids].T, len(ids) * d
            else:  # the rank-r factor of the (restricted) head
                ur, sr, vr = (torch.linalg.svd(w[ids], full_matrices=False) if k else (u, s, vt))
                logits, read = (x @ vr[:r].T * sr[:r]) @ ur[:, :r].T, r * (len(ids) + d)
            draft = ids[logits.argmax(-1)]
            rows.append(dict(exit=layer, head=name, agreement=(draft == target).double().mean().item(),
                             head_share=read / (v * d)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder with exit heads and token counts")
    p.add_argument("--text", required=True, help="held-out text file")
    p.add_argument("--exits", type=int, nargs="+", help="draft exits (default: every exit below the last layer)")
    p.add_argument("--vocab", type=int, nargs="+", default=[256, 1024], help="restricted vocabulary sizes")
    p.add_argument("--rank", type=int, nargs="+", default=[16, 32, 64], help="ranks of the factorized heads")
    p.add_argument("--blocks", type=int, default=32, help="blocks of 128 tokens read from the text")
    p.add_argument("--out", help="folder for draft_heads.json")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from mexit.model.checkpoint import load
    from mexit.training.common import token_blocks

    try:
        model = load(args.model, dtype="fp32", device="cpu")
        if model.token_counts is None:
            raise ValueError(f"{args.model} has no token counts: run `mexit count-tokens` first")
        exits = args.exits or [x for x in model.config.exit_layers if x < model.config.n_layer]
        bad = sorted(set(exits) - set(model.config.exit_layers))
        if bad:
            raise ValueError(f"exits {bad} are not in this checkpoint")
        blocks = token_blocks(AutoTokenizer.from_pretrained(args.model), [args.text], 128)[: args.blocks]
        if not len(blocks):
            raise ValueError(f"{args.text} holds less than one block of 128 tokens")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = compare(model, blocks, exits, args.vocab, args.rank)
    print(f"{args.model}: {blocks.numel()} held-out positions; agreement = draft top-1 == full depth's top-1\n")
    print("| exit | head | agreement | share of a head read |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['exit']} | {r['head']} | {r['agreement']:.3f} | {r['head_share']:.3f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "draft_heads.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
