"""`mexit train-heads`: train linear exit heads on a frozen GPT-2 (autocontrastive-gen's recipe, faster).

Each exit L gets `lm_head_L = nn.Linear(n_embd, vocab, bias=False)` on `ln_f(h_L)`, trained with next-token
cross-entropy; the base never changes. Per batch the base runs once under no_grad up to the deepest exit and every
head reads its layer's states; each head's loss is computed and back-propagated in token chunks, so the fp32
logits held at once are bounded (about 2**25 values) whatever the vocabulary and the number of heads. AdamW,
linear decay after a linear warm-up. The output folder is a checkpoint mexit and autocontrastive-gen load: the
base's tensors and config unchanged, plus `name_to_lm_exit_head.lm_head_{L}.weight` and `lm_head_layer_indices`,
the tokenizer files, the training text's token counts (`token_counts.safetensors`, for draft vocabularies) and
`train_report.{json,md}` with the held-out loss and perplexity of every head.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mexit.model.checkpoint import EXIT_HEAD_NAME, stored_state
from mexit.model.decoder import MultiExitGPT2
from mexit.model.placement import resolve_device, resolve_dtype
from mexit.model.predictors import PREDICTOR_FILE
from mexit.model.token_counts import count_tokens, save_token_counts

from .common import (
    LOGITS_PER_CHUNK,
    Run,
    check_counts,
    check_finite,
    check_resume,
    check_run,
    check_text,
    data_digest,
    lr_factor,
    resumed,
    split_blocks,
    train,
)

STATE_FILE = "trainer_state.pt"


@dataclass
class HeadTrainingConfig:
    """What `train_heads` does. data / eval_data: text files (eval_data None: the last `eval_fraction` of the
    data's blocks are held out). steps None and epochs None: one epoch. init: "embedding" (a copy of the model's
    own output head) or "zero". dtype: "fp32", or "bf16" (the frozen base in bf16, heads under bf16 autocast)."""

    model: str
    data: list[str]
    out: str
    exits: tuple[int, ...]
    eval_data: list[str] | None = None
    eval_fraction: float = 0.05
    seq_len: int | None = None  # None: 512 (autocontrastive-gen's recipe), or the model's context if shorter
    batch_size: int = 8
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    warmup_steps: int | None = None  # None: 5% of the steps
    weight_decay: float = 0.0
    init: str = "embedding"
    device: str | None = None
    dtype: str = "fp32"
    eval_every: int = 0  # 0: only at the start and the end
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    eval_max_blocks: int = 256
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True


def check_inputs(cfg: HeadTrainingConfig) -> tuple[Path, dict]:
    """Every check that needs no model weights, before any work. Returns the base folder and its config.json."""
    from mexit.model.checkpoint import read_config, resolve_folder

    base = resolve_folder(cfg.model)
    config = read_config(base)  # the loader's own checks of config.json
    hf_config = json.loads((base / "config.json").read_text())  # written back unchanged but for the exits
    n_layer, n_positions = config.n_layer, config.n_positions
    check_text(base, cfg.data, cfg.eval_data)
    if not cfg.exits:
        raise ValueError("no exits: pass --exits, e.g. 2,4,6")
    bad = sorted({e for e in cfg.exits if not 1 <= e <= n_layer})
    if bad:
        raise ValueError(f"exits {bad} are outside 1..n_layer={n_layer}")
    if len(set(cfg.exits)) != len(cfg.exits):
        raise ValueError(f"duplicate exits in {list(cfg.exits)}")
    if cfg.seq_len is None:
        cfg.seq_len = min(512, n_positions)
    if not 2 <= cfg.seq_len <= n_positions:
        raise ValueError(f"seq_len must be in 2..{n_positions} (the model's context), got {cfg.seq_len}")
    check_run(cfg)
    if cfg.init not in ("embedding", "zero"):
        raise ValueError(f"init must be 'embedding' or 'zero', got {cfg.init!r}")
    if cfg.dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16 (bf16: frozen base in bf16, heads under autocast), "
                         f"got {cfg.dtype!r}")
    check_counts(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file: --out names the folder the trained model goes into")
    if cfg.resume:
        if not (out / STATE_FILE).exists():
            raise FileNotFoundError(f"--resume: {out} holds no {STATE_FILE} to resume from")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty: pass --overwrite to replace it, or "
                              "--resume to continue its training")
    if out.resolve() == base.resolve():
        raise ValueError("the output folder must not be the base model's folder")
    resolve_device(cfg.device)
    return base, hf_config


class HeadTrainer:
    """Frozen base + trainable heads; one `step` per batch of token blocks [B, T]."""

    def __init__(self, model: MultiExitGPT2, exits: tuple[int, ...], init: str, bf16: bool):
        self.model, self.exits, self.bf16 = model, tuple(sorted(exits)), bf16
        start = model.head_weight("original").detach().float()
        self.heads = {L: torch.nn.Parameter(start.clone() if init == "embedding" else torch.zeros_like(start))
                      for L in self.exits}

    def features(self, blocks: torch.Tensor, layers: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
        """{L: ln_f(h_L)} [B*(T-1), d] of every position that has a next token, for each L in `layers` (default
        the exits), from one no_grad pass of the base up to the deepest."""
        model = self.model
        layers = layers or self.exits
        b, t = blocks.shape
        with torch.no_grad():
            states = model.forward(blocks, layers)[1]
            return {L: model.final_norm(states[L][:, :-1]).reshape(b * (t - 1), -1) for L in layers}

    def head_loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, backward: bool) -> float:
        """Mean next-token cross-entropy of head `weight` on features x [N, d]; with backward, its gradient is
        accumulated chunk by chunk (each chunk's logits freed before the next)."""
        n = x.shape[0]
        chunk = max(1, LOGITS_PER_CHUNK // weight.shape[0])
        total = 0.0
        for i in range(0, n, chunk):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = F.linear(x[i:i + chunk].float(), weight)
            loss = F.cross_entropy(logits.float(), targets[i:i + chunk], reduction="sum") / n
            if backward:
                loss.backward()
            total += loss.item()
        return total

    def step(self, blocks: torch.Tensor) -> dict[int, float]:
        feats = self.features(blocks)
        targets = blocks[:, 1:].reshape(-1)
        return {L: self.head_loss(feats[L], self.heads[L], targets, backward=True) for L in self.exits}

    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor, batch: int) -> dict:
        """Held-out mean loss per exit and of the model's own head ("original"), with perplexities."""
        sums = {L: 0.0 for L in (*self.exits, "original")}
        count = 0
        original = self.model.head_weight("original").float()
        for i in range(0, len(blocks), batch):
            chunk = blocks[i:i + batch]
            feats = self.features(chunk)
            targets = chunk[:, 1:].reshape(-1)
            n = targets.numel()
            for L in self.exits:
                sums[L] += self.head_loss(feats[L], self.heads[L], targets, backward=False) * n
            depth = self.model.config.n_layer
            top = feats[depth] if depth in feats else self.features(chunk, (depth,))[depth]
            sums["original"] += self.head_loss(top, original, targets, backward=False) * n
            count += n
        return {str(k): {"loss": v / count, "perplexity": math.exp(min(v / count, 50.0))} for k, v in sums.items()}


def save_output(out: Path, base: Path, hf_config: dict, trainer: HeadTrainer, base_state: dict, extra_state: dict,
                report: dict | None) -> None:
    """Write the multi-exit checkpoint (the base's tensors as stored, the heads in the embedding's dtype, config.json,
    tokenizer), the trainer state (fp32 heads, optimizer, step) and, at the end, the report. Files are written under
    temporary names and renamed."""
    from mexit.model.save import write_checkpoint

    store = base_state["transformer.wte.weight"].dtype
    state = {**base_state, **{EXIT_HEAD_NAME.format(L): w.detach().to(store).cpu().contiguous()
                              for L, w in trainer.heads.items()}}
    config = dict(hf_config)
    existing = [int(x) for x in (config.get("lm_head_layer_indices") or [])]
    config["lm_head_layer_indices"] = sorted(set(existing) | set(trainer.exits))
    if "lm_head.weight" in state:  # the base's own head (untied, or stored apart from a tied embedding)
        config["tie_word_embeddings"] = False
    write_checkpoint(state, out, config, source=base)
    (out / PREDICTOR_FILE).unlink(missing_ok=True)  # the base's exit predictors learned other heads
    torch.save({**extra_state, "heads": {L: w.detach().float().cpu() for L, w in trainer.heads.items()}},
               out / (STATE_FILE + ".tmp"))
    (out / (STATE_FILE + ".tmp")).replace(out / STATE_FILE)
    if report is not None:
        (out / "train_report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        (out / "train_report.md").write_text(report_markdown(report))


def report_markdown(report: dict) -> str:
    rows = ["| head | held-out loss (start) | held-out loss | perplexity |", "|---|---|---|---|"]
    start = report.get("eval_start", {})
    for name, m in report["eval"].items():
        before = start.get(name, {}).get("loss")
        rows.append(f"| {'exit ' + name if name != 'original' else 'original (not trained)'} | "
                    f"{before:.4f} | {m['loss']:.4f} | {m['perplexity']:.2f} |" if before is not None else
                    f"| {name} | - | {m['loss']:.4f} | {m['perplexity']:.2f} |")
    t = report["training"]
    return (f"# train-heads report\n\nbase `{report['base']}`, exits {report['exits']}, init {report['init']}; "
            f"{t['steps']} steps x {t['batch_size']} x {t['seq_len']} tokens, lr {t['lr']}, {t['device']} "
            f"{t['dtype']}: {t['tokens_per_s']:.0f} tokens/s, {t['seconds']:.1f} s{resumed(t)}.\n\n" + "\n".join(rows)
            + "\n")


def train_heads(cfg: HeadTrainingConfig) -> dict:
    """Train `cfg.exits` heads on the frozen base `cfg.model`; write the multi-exit checkpoint to `cfg.out`.
    Returns the report (held-out loss and perplexity per head at the start and the end, throughput)."""
    from transformers import AutoTokenizer

    from mexit.model.checkpoint import load

    base, hf_config = check_inputs(cfg)
    device = resolve_device(cfg.device)
    bf16 = cfg.dtype == "bf16"
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    blocks, eval_blocks = split_blocks(tokenizer, cfg, device)
    per_epoch = len(blocks) // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, round((cfg.epochs or 1.0) * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20)
    if warmup > total:
        raise ValueError(f"--warmup-steps {warmup} exceeds the run's {total} steps: the learning rate would never "
                         "reach --lr")
    out = Path(cfg.out)
    settings = {"--model": str(base.resolve()), "--lr": cfg.lr, "--batch-size": cfg.batch_size,
                "--seq-len": cfg.seq_len, "--weight-decay": cfg.weight_decay, "--warmup-steps": cfg.warmup_steps,
                "--init": cfg.init, "--dtype": cfg.dtype, "--seed": cfg.seed, "--eval-max-blocks": cfg.eval_max_blocks,
                "training data": data_digest(blocks), "held-out data": data_digest(eval_blocks)}
    saved = None
    if cfg.resume:  # checked before the model loads
        saved = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        if sorted(saved["exits"]) != sorted(cfg.exits):
            raise ValueError(f"--resume: {out} trains exits {saved['exits']}; this run asks for "
                             f"{sorted(cfg.exits)}")
        check_resume(saved, out, total, settings,
                     "the length (--steps / --epochs), --device, --eval-every and --save-every")

    model = load(base, dtype=resolve_dtype("bf16" if bf16 else "fp32"), device=device)
    base_state = stored_state(base, model.config)  # written back as stored, beside the trained heads
    trainer = HeadTrainer(model, tuple(cfg.exits), cfg.init, bf16)
    params = list(trainer.heads.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total)), total)
    eval_start = None
    if saved is not None:
        run.resume(saved)
        if total != saved["total_steps"]:  # the linear schedule is stretched (or shrunk) to the new length
            warnings.warn(f"--resume: {saved['total_steps']} steps extended to {total}: the learning rate follows "
                          f"the linear schedule of {total} steps from step {saved['step']} on", stacklevel=2)
        with torch.no_grad():
            for L, w in saved["heads"].items():
                trainer.heads[int(L)].copy_(w)
        eval_start = saved["eval_start"]
    elif out.exists():
        shutil.rmtree(out)
    eval_batch = max(1, cfg.batch_size)
    if eval_start is None:
        eval_start = trainer.evaluate(eval_blocks, eval_batch)

    def state():
        return {**run.state(asdict(cfg), settings), "exits": list(trainer.exits), "eval_start": eval_start}

    def evaluate(entry: dict) -> str | None:
        if cfg.eval_every and entry["step"] % cfg.eval_every == 0 and "eval" not in entry:
            entry["eval"] = trainer.evaluate(eval_blocks, eval_batch)
            return f"step {entry['step']}: held-out loss " + ", ".join(
                f"{k}={v['loss']:.3f}" for k, v in entry["eval"].items())
        return None

    tokens_per_step = cfg.batch_size * (cfg.seq_len - 1)
    train(run, trainer.step, blocks, cfg.batch_size, cfg.seed, device,
          lambda: save_output(out, base, hf_config, trainer, base_state, state(), None), str(out), "train-heads",
          tokens_per_step, cfg.save_every, cfg.progress, evaluate)
    check_finite("trained heads", params, run.step)
    final_eval = trainer.evaluate(eval_blocks, eval_batch)
    check_finite("held-out scores", final_eval, run.step)
    report = {
        "base": str(base), "exits": list(trainer.exits), "init": cfg.init,
        "eval_start": eval_start, "eval": final_eval,
        "eval_blocks": len(eval_blocks), "train_blocks": len(blocks),
        "training": {"steps": total, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lr": cfg.lr,
                     "warmup_steps": warmup, "device": str(device), "dtype": cfg.dtype, "seconds": run.seconds,
                     "tokens_per_s": run.tokens_per_s(tokens_per_step),
                     "final_train_loss": run.history[-1]["loss"] if run.history else None,
                     "resumed_at": run.resumed_at},
        "history": [{"step": h["step"], "eval": h["eval"]} for h in run.history if "eval" in h],
    }
    save_output(out, base, hf_config, trainer, base_state, state(), report)
    save_token_counts(out, count_tokens(blocks, model.config.vocab_size), [Path(p).name for p in cfg.data])
    return report
