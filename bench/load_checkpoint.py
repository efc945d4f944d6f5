"""Checkpoint loading: wall time, CPU time and peak memory of each way to load a file of the published checkpoint's
size and layout, each in a fresh process.

    python -m mexit.bench.load_checkpoint --work /tmp/mexit_load            # the 3.9 GB file (about 8 GB of disk)
    python -m mexit.bench.load_checkpoint --work /tmp/mexit_load --device cuda   # + time to the first token

The file (generated once into --work by a deterministic recipe, never committed; `write_autocontrastive_checkpoint`)
is what transformers 4.26's save_pretrained wrote for autocontrastive-gen's MultiHeadGPT2 (shared/design.md §9):
one pickled fp32 `pytorch_model.bin` (zip, protocol 2, a plain dict) holding gpt2-medium, the per-block `attn.bias`
/ `attn.masked_bias` buffers, `lm_head.weight` on `wte`'s storage and 12 exit heads, with random normal(0, 0.02)
weights; config.json with the published fields; a 50257-token byte-level BPE trained on seeded pseudo-words (no
registry package ships GPT-2's own BPE files).

Rows (each a fresh `python -m mexit.bench.load_checkpoint --one KIND` process, one torch thread by default):
- torch.load mmap + copy: `torch.load(mmap=True, weights_only=True)` and one copy of every tensor, kept: the floor
  (cpu_vs_floor divides by its CPU time).
- torch.load mmap + fp16 copy: the same with fp16 copies: the least an fp16 load does.
- torch.load mmap + read: each copy dropped before the next is made: reading the file without holding memory.
- mexit fp16 / fp32: `mexit.model.checkpoint.load` of the `.bin` on the CPU.
- mexit fp16 safetensors: the same from the folder `mexit convert --dtype fp16` wrote (its own row times convert).
- transformers fp32 / fp16: `GPT2LMHeadModel.from_pretrained` of the `.bin` (the GPT-2 part; exits unexpected).
- with --device cuda: mexit fp16 onto the GPU, and the time from the start of the load to the first token.

Measured inside the child around the load call only (imports excluded): wall seconds; CPU seconds, split into user
(the loader's own work: casts, checks) and system (the kernel's page faults: mapping the file's cached pages and
handing out fresh zeroed memory; on a VM the second varies several-fold from run to run with the host, which is why
the rows are medians of fresh processes with their min and max); then the CPU seconds to touch every 4 KB page of
the loaded weights once (touch_s: a load that maps the file without reading it, as transformers 5 does for fp32,
pays here, at the first forward pass, what the others paid during the load); peak anonymous resident memory (RssAnon
sampled every 2 ms: the file pages of a memory-mapped file are cache the system can drop and do not count) and the
anonymous memory the process held before the load. The file is read once before every run, so every row reads from
the page cache (warm); cold-disk time depends on the disk and is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

from mexit.frontends.output import HelpFormatter

from .common import markdown_table, run_metadata, spread_note

KINDS = ("torch-mmap-read", "torch-mmap-copy", "torch-mmap-fp16-kept", "mexit-fp16", "mexit-fp32", "convert-fp16",
         "mexit-fp16-safetensors", "transformers-fp32", "transformers-fp16")
CUDA_KINDS = ("mexit-fp16-cuda",)
LABELS = {
    "torch-mmap-read": "torch.load(mmap=True) + a copy of each tensor, dropped before the next",
    "torch-mmap-copy": "torch.load(mmap=True) + one copy of every tensor (the floor)",
    "torch-mmap-fp16-kept": "torch.load(mmap=True) + an fp16 copy of every tensor",
    "mexit-fp16": "mexit load, fp16", "mexit-fp32": "mexit load, fp32",
    "convert-fp16": "mexit convert --dtype fp16 (read .bin, write safetensors)",
    "mexit-fp16-safetensors": "mexit load of the converted fp16 safetensors",
    "transformers-fp32": "transformers GPT2LMHeadModel.from_pretrained, fp32",
    "transformers-fp16": "transformers GPT2LMHeadModel.from_pretrained, fp16",
    "mexit-fp16-cuda": "mexit load onto the GPU, fp16, + first token",
}
PUBLISHED_CONFIG = {  # the published config.json's fields (design.md §9); shape fields come from the ModelConfig
    "architectures": ["MultiHeadGPT2"], "activation_function": "gelu_new", "attn_pdrop": 0.1, "embd_pdrop": 0.1,
    "initializer_range": 0.02, "model_type": "gpt2", "n_ctx": 1024, "n_inner": None, "output_hidden_states": True,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32", "transformers_version": "4.26.0",
    "use_cache": True,
}
RECIPE_VERSION = 1  # bump when the recipe's output changes: a cached file of another version is rebuilt


def train_tokenizer(folder: Path, vocab_size: int, max_length: int, seed: int = 0) -> None:
    """A byte-level BPE of `vocab_size` tokens (the last is <|endoftext|>, as in GPT-2) trained by `tokenizers` on
    seeded pseudo-words, saved as a GPT-2 tokenizer (tokenizer.json, vocab.json, merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    rng = random.Random(seed)
    freq = [8.2, 1.5, 2.8, 4.3, 12.7, 2.2, 2.0, 6.1, 7.0, 0.15, 0.77, 4.0, 2.4, 6.7, 7.5, 1.9, 0.095, 6.0, 6.3, 9.1,
            2.8, 0.98, 2.4, 0.15, 2.0, 0.074]  # English letter frequencies (%)
    words = ["".join(rng.choices(string.ascii_lowercase, freq, k=rng.randint(1, 9))) for _ in range(120_000)]
    text = " ".join(rng.choice(words) for _ in range(600_000))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)), vocab_size=vocab_size - 1,
                            show_progress=False)
    bpe.add_special_tokens(["<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                      unk_token="<|endoftext|>", model_max_length=max_length).save_pretrained(folder)


def write_autocontrastive_checkpoint(folder: Path, config, seed: int = 0, std: float = 0.02,
                                     tokenizer: bool = True, legacy: bool = False) -> Path:
    """Write a random multi-exit GPT-2 of `config`'s shape (a mexit ModelConfig, tied embeddings) exactly as the
    published checkpoint is laid out on disk (module docstring); values are normal(0, std) from `seed`, layernorm
    weights 1. legacy: the pre-1.6 non-zip pickle format instead of zip. Returns `folder`."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d, v, n_pos = config.n_embd, config.vocab_size, config.n_positions

    def normal(*shape):
        return torch.randn(shape, generator=gen) * std

    state = {"transformer.wte.weight": normal(v, d), "transformer.wpe.weight": normal(n_pos, d)}
    causal = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        state.update({p + "ln_1.weight": torch.ones(d), p + "ln_1.bias": normal(d), p + "attn.bias": causal.clone(),
                      p + "attn.masked_bias": torch.tensor(-1e4), p + "attn.c_attn.weight": normal(d, 3 * d),
                      p + "attn.c_attn.bias": normal(3 * d), p + "attn.c_proj.weight": normal(d, d),
                      p + "attn.c_proj.bias": normal(d), p + "ln_2.weight": torch.ones(d), p + "ln_2.bias": normal(d),
                      p + "mlp.c_fc.weight": normal(d, config.inner_dim), p + "mlp.c_fc.bias": normal(config.inner_dim),
                      p + "mlp.c_proj.weight": normal(config.inner_dim, d), p + "mlp.c_proj.bias": normal(d)})
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = torch.ones(d), normal(d)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: the same storage, written once
    for layer in config.exit_layers:
        state[f"name_to_lm_exit_head.lm_head_{layer}.weight"] = normal(v, d)
    torch.save(state, folder / "pytorch_model.bin", pickle_protocol=2, _use_new_zipfile_serialization=not legacy)
    del state
    hf = {**PUBLISHED_CONFIG, "n_layer": config.n_layer, "n_embd": d, "n_head": config.n_head, "vocab_size": v,
          "n_positions": n_pos, "n_ctx": n_pos, "layer_norm_epsilon": config.layer_norm_epsilon,
          "bos_token_id": v - 1, "eos_token_id": v - 1, "lm_head_layer_indices": list(config.exit_layers)}
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": v - 1, "eos_token_id": v - 1,
         "transformers_version": "4.26.0"}, indent=2) + "\n")
    if tokenizer:
        train_tokenizer(folder, v, n_pos, seed)
    return folder


def anon_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


class PeakAnon:
    """Samples RssAnon every 2 ms on a thread while the block runs: `peak` (GB)."""

    def __enter__(self):
        self.peak_kb, self.done = anon_kb(), threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.002):
            self.peak_kb = max(self.peak_kb, anon_kb())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak_kb = max(self.peak_kb, anon_kb())

    @property
    def peak(self) -> float:
        return self.peak_kb * 1024 / 1e9


def run_one(kind: str, work: Path, threads: int) -> dict:
    """One load in this process: the measurements of the module docstring."""
    import resource

    import torch

    torch.set_num_threads(threads)
    bin_folder, st_folder = work / "checkpoint", work / "fp16-safetensors"
    import huggingface_hub  # noqa: F401  (imports are not part of any row)
    import safetensors.torch  # noqa: F401
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401  (mexit reads config.json with GPT2Config)
    from transformers.utils import logging

    from mexit.model.checkpoint import load
    from mexit.model.save import convert

    logging.set_verbosity_error()  # transformers: the exit heads are unexpected keys, as for the original file

    def call():
        if kind.startswith("torch-mmap-"):
            state = torch.load(bin_folder / "pytorch_model.bin", mmap=True, weights_only=True, map_location="cpu")
            copies = []
            for name in list(state):
                tensor = state.pop(name)
                copy = tensor.to(torch.float16) if kind == "torch-mmap-fp16-kept" else tensor.clone()
                if kind != "torch-mmap-read":
                    copies.append(copy)
            return copies
        elif kind in ("mexit-fp16", "mexit-fp32"):
            return load(bin_folder, dtype=kind.removeprefix("mexit-"), device="cpu")
        elif kind == "convert-fp16":
            import shutil

            shutil.rmtree(st_folder, ignore_errors=True)
            convert(bin_folder, st_folder, dtype="fp16")
        elif kind == "mexit-fp16-safetensors":
            return load(st_folder, dtype="fp16", device="cpu")
        elif kind.startswith("transformers-"):
            dtype = torch.float16 if kind.endswith("fp16") else torch.float32
            return GPT2LMHeadModel.from_pretrained(bin_folder, dtype=dtype)
        elif kind == "mexit-fp16-cuda":
            from mexit.frontends.api import load as load_lm

            lm = load_lm(bin_folder, dtype="fp16", device="cuda")  # + tokenizer, generation_config
            lm.generate(["The"], max_new_tokens=1, eos_token_id=None)
            torch.cuda.synchronize()
            return lm
        else:
            raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS + CUDA_KINDS)}")

    def cpu_s():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime

    before_kb, faults = anon_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    (user, system), wall = cpu_s(), time.perf_counter()
    with PeakAnon() as peak:
        kept = call()
        wall, (user_end, system_end) = time.perf_counter() - wall, cpu_s()
        user, system = user_end - user, system_end - system
        touch = sum(cpu_s())
        touch_pages(loaded_tensors(kept))
        touch = sum(cpu_s()) - touch
    return {"kind": kind, "wall_s": wall, "cpu_s": user + system, "user_s": user, "sys_s": system, "touch_s": touch,
            "peak_anon_gb": peak.peak,
            "anon_before_gb": before_kb * 1024 / 1e9,
            "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
            "threads": torch.get_num_threads()}


def loaded_tensors(loaded) -> list:
    """The weight tensors a row's load returned (none for the rows that keep nothing)."""
    from mexit.model.checkpoint import named_weights

    if loaded is None:
        return []
    if isinstance(loaded, list):
        return loaded
    if hasattr(loaded, "parameters"):  # transformers
        return list(loaded.parameters())
    model = getattr(loaded, "model", loaded)  # mexit.LM or MultiExitGPT2
    return [tensor for _, tensor in named_weights(model.w)]


def touch_pages(tensors) -> None:
    """Read one byte of every 4 KB page of `tensors` (on the CPU): the pages a memory-mapped load left unread fault
    in here, as they would at the first forward pass."""
    import torch

    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.numel():
            tensor.detach().reshape(-1).view(torch.uint8)[::4096].clone()


def warm(folder: Path) -> None:
    """Read every file of `folder` once, so that the next run reads from the page cache."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def ensure_checkpoint(work: Path, size: str) -> Path:
    """The recipe's checkpoint under `work`, built unless one of this recipe version and size is there."""
    from mexit.model.config import GPT2_MEDIUM_MULTIEXIT, ModelConfig

    folder, stamp = work / "checkpoint", work / "checkpoint" / "recipe.json"
    recipe = {"version": RECIPE_VERSION, "size": size}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return folder
    config = GPT2_MEDIUM_MULTIEXIT if size == "medium" else ModelConfig(
        n_layer=4, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, exit_layers=(2, 4))
    print(f"writing the recipe's {size} checkpoint to {folder} ...", file=sys.stderr)
    write_autocontrastive_checkpoint(folder, config)
    stamp.write_text(json.dumps(recipe))
    return folder


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = [r for r in runs if r["kind"] == kind]
        row = {"kind": kind, "what": LABELS[kind], "repeats": len(mine)}
        for key in ("wall_s", "cpu_s", "user_s", "sys_s", "touch_s", "peak_anon_gb", "anon_before_gb"):
            values = [r[key] for r in mine]
            row[key], row[key + "_min"], row[key + "_max"] = statistics.median(values), min(values), max(values)
        row["major_faults"] = max(r["major_faults"] for r in mine)
        row["threads"] = mine[0]["threads"]
        if note := spread_note(row["cpu_s"], row["cpu_s_min"], row["cpu_s_max"]):
            row["note"] = note
        rows.append(row)
    floor = next((r["cpu_s"] for r in rows if r["kind"] == "torch-mmap-copy"), None)
    for row in rows:
        row["cpu_vs_floor"] = row["cpu_s"] / floor if floor else None
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="load_bench_work", help="folder of the generated checkpoint (kept for reruns)")
    p.add_argument("--size", default="medium", choices=["medium", "tiny"],
                   help="medium: the published checkpoint's shape (3.9 GB); tiny: a seconds-long smoke run")
    p.add_argument("--kinds", nargs="+", choices=KINDS + CUDA_KINDS, help="rows to run (default: all for --device)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda adds the GPU rows")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per row")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each child")
    p.add_argument("--out", default="bench_results", help="folder for load_checkpoint.{json,md}")
    p.add_argument("--one", choices=KINDS + CUDA_KINDS, help=argparse.SUPPRESS)  # the child's entry


def main_args(args) -> int:
    work = Path(args.work)
    if args.one:
        print(json.dumps(run_one(args.one, work, args.threads)))
        return 0
    if args.repeats < 1 or args.threads < 1:
        raise ValueError("--repeats and --threads must be >= 1")
    kinds = args.kinds or (KINDS + (CUDA_KINDS if args.device == "cuda" else ()))
    if "mexit-fp16-safetensors" in kinds and "convert-fp16" not in kinds and not (work / "fp16-safetensors").exists():
        kinds = ("convert-fp16", *kinds)
    folder = ensure_checkpoint(work, args.size)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs = []
    for repeat in range(args.repeats):
        for kind in kinds:
            warm(work / "fp16-safetensors" if kind == "mexit-fp16-safetensors" else folder)
            child = subprocess.run([sys.executable, "-m", "mexit.bench.load_checkpoint", "--one", kind, "--work",
                                    str(work), "--threads", str(args.threads)], env=env, capture_output=True,
                                   text=True)
            if child.returncode != 0:
                raise RuntimeError(f"{kind} failed:\n{child.stderr[-3000:]}")
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"[{repeat + 1}/{args.repeats}] {kind}: {runs[-1]['wall_s']:.2f} s wall, "
                  f"{runs[-1]['cpu_s']:.2f} s CPU, {runs[-1]['peak_anon_gb']:.2f} GB peak anon", file=sys.stderr)
    import torch

    rows = summarize(runs)
    meta = {**run_metadata(torch.device(args.device), "as per row"), "threads": args.threads,
            "file_bytes": (folder / "pytorch_model.bin").stat().st_size, "size": args.size}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_checkpoint.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    table = markdown_table(rows, ["what", "wall_s", "cpu_s", "cpu_s_min", "cpu_s_max", "cpu_vs_floor", "user_s",
                                  "sys_s", "touch_s", "peak_anon_gb", "anon_before_gb"])
    text = (f"{meta['device']}, {args.threads} thread(s), load {meta['load_avg_1m']}, file "
            f"{meta['file_bytes'] / 1e9:.2f} GB (warm page cache), medians of {args.repeats} fresh processes\n\n"
            f"{table}\n")
    (out / "load_checkpoint.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
