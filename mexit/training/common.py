"""What the training commands share: text cut into token blocks, the learning-rate schedule, the training loop
(resume, batches, optimizer and schedule steps, progress, periodic saves, Ctrl-C)."""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mexit.values import NotUTF8Error, read_text

LOGITS_PER_CHUNK = 2**25  # fp32 logits alive at once per head (128 MB)
MAX_LR = 1e3  # Adam moves a weight by about lr a step: more only diverges (near fp32's range it overflows)


class TrainingInterrupted(Exception):
    """Ctrl-C during training: the state was saved; the message says how to resume."""


class TrainingDiverged(ValueError):
    """A step's loss or the trained tensors hold NaN / inf: the run stops before anything more is written."""


def check_finite(what: str, values, step: int) -> None:
    """TrainingDiverged unless every number in `values` (tensors, floats, dicts and lists of them; None skipped) is
    finite: the trained tensors (a last update may overflow while its loss was finite) and the final held-out
    scores, checked before the final write."""
    def finite(v) -> bool:
        if isinstance(v, torch.Tensor):
            return bool(torch.isfinite(v).all())
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(finite(x) for x in v)
        return not isinstance(v, float) or math.isfinite(v)

    if not finite(values):
        raise TrainingDiverged(f"the {what} hold NaN or inf after step {step}: the run diverged (a smaller --lr?); "
                               "nothing was written")


def check_text(folder: Path, data: list[str], eval_data: list[str] | None = None) -> None:
    """Checks shared by the commands that tokenize text with a checkpoint's tokenizer: the folder holds
    tokenizer files; data names at least one file; every file exists, holds text and is named once (data and
    held-out data together); a file that is not valid UTF-8 is named in a warning (bad bytes read as U+FFFD)."""
    if not any((folder / name).exists() for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"{folder} has no tokenizer files (tokenizer.json or vocab.json + merges.txt): the "
                                "text is tokenized with the checkpoint's own tokenizer")
    if not data:
        raise ValueError("no training data: pass one or more text files with --data")
    for name, paths in (("data", data), ("eval_data", eval_data)):
        if isinstance(paths, (str, os.PathLike)):
            raise ValueError(f"{name} is a list of text files, got one path {str(paths)!r}: pass [{str(paths)!r}]")
    seen: dict[Path, str] = {}
    for path in [*data, *(eval_data or [])]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file {path} {'is not a file' if Path(path).exists() else 'does not exist'}")
        resolved = Path(path).resolve()
        if resolved in seen:
            same = seen[resolved]
            also = f" (also as {same})" if str(same) != str(path) else ""
            raise ValueError(f"data file {path} is given twice{also}: its text would count twice, or be trained on "
                             "and held out at once")
        seen[resolved] = path
        try:
            text = read_text(path)
        except NotUTF8Error as err:
            warnings.warn(f"data file {err}: bad bytes are read as U+FFFD", stacklevel=2)
            text = read_text(path, errors="replace")
        if not text.strip():
            raise ValueError(f"data file {path} is empty")


def check_counts(cfg) -> None:
    """A training command's counts (the fields its config has): eval_max_blocks >= 1; eval_every, save_every,
    warmup_steps (None: the default) >= 0; resume and overwrite not both."""
    for name in ("steps", "warmup_steps", "eval_every", "save_every", "eval_max_blocks", "batch_size"):
        value = getattr(cfg, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if cfg.eval_max_blocks < 1:
        raise ValueError(f"eval_max_blocks must be >= 1, got {cfg.eval_max_blocks}")
    for name in ("eval_every", "save_every", "warmup_steps"):
        value = getattr(cfg, name, None)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the saved run and --overwrite replaces it: pass one")


def resumed(training: dict) -> str:
    """', resumed at step N[, M]' for a report's training entry (or '')."""
    steps = training.get("resumed_at")
    return f", resumed at step {', '.join(map(str, steps))}" if steps else ""


def token_blocks(tokenizer, paths: list[str], seq_len: int) -> torch.Tensor:
    """Texts joined by eos (as autocontrastive-gen's grouped texts), cut into [N, seq_len] int64 blocks."""
    eos = tokenizer.eos_token_id
    tokenizer.model_max_length = 2**62  # whole files: cut into blocks here, not truncated (and no length warning)
    ids: list[int] = []
    for path in paths:
        ids += tokenizer(read_text(path, errors="replace"))["input_ids"]
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(tokenizer, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks on `device`) of a training command's config (data, eval_data,
    eval_fraction, seq_len, batch_size, eval_max_blocks): the held-out text, else the data's last blocks. Errors:
    less than one batch to train on, no held-out block."""
    blocks = token_blocks(tokenizer, cfg.data, cfg.seq_len)
    if cfg.eval_data:
        eval_blocks = token_blocks(tokenizer, cfg.eval_data, cfg.seq_len)
    else:
        n_eval = max(1, int(len(blocks) * cfg.eval_fraction))
        blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
    if len(blocks) < cfg.batch_size:
        raise ValueError(f"the training data holds {len(blocks)} blocks of {cfg.seq_len} tokens, fewer than one "
                         f"batch of {cfg.batch_size}: add text, or lower --seq-len / --batch-size")
    if len(eval_blocks) == 0:
        raise ValueError(f"the held-out data holds no block of {cfg.seq_len} tokens")
    return blocks, eval_blocks[: cfg.eval_max_blocks].to(device)


def check_run(cfg) -> None:
    """A training run's length and optimizer settings, checked before any work (both trainers): batch_size >= 1;
    steps >= 1 or epochs finite and > 0, not both; 0 < lr <= MAX_LR;
    weight_decay finite and >= 0 (where the trainer has it); eval_fraction in (0, 1). ValueError naming the
    setting (the counts: `check_counts`)."""
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("pass --steps or --epochs, not both")
    if (cfg.steps is not None and cfg.steps < 1) or (cfg.epochs is not None and not 0 < cfg.epochs < math.inf):
        raise ValueError(f"steps must be >= 1 and epochs finite and > 0, got steps {cfg.steps}, epochs {cfg.epochs}")
    if not 0 < cfg.lr <= MAX_LR:
        raise ValueError(f"lr must be > 0 and at most {MAX_LR:g} (Adam moves a weight by about lr a step; more only "
                         f"diverges), got {cfg.lr}")
    weight_decay = getattr(cfg, "weight_decay", 0.0)
    if not 0 <= weight_decay <= torch.finfo(torch.float32).max:
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}")
    if not 0 < cfg.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {cfg.eval_fraction}")


def batch_at(blocks: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The training batch of `step`: each epoch a fresh order of the blocks, seeded by seed + epoch (so a resumed
    run sees the batches an uninterrupted one would)."""
    epoch, index = divmod(step, len(blocks) // batch_size)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + epoch))
    return blocks[order[index * batch_size:(index + 1) * batch_size]]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class Run:
    """Where a training run stands: what a save writes and a resume restores beside the trained tensors. step:
    optimizer steps taken; history: per step {"step", "loss"} (a float, or {exit: float}), with "eval" where the
    held-out data was scored; seconds: wall time inside the steps (device synchronized); resumed_at: the steps a
    --resume continued from."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    total: int
    step: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: list = field(default_factory=list)

    def state(self, config: dict, settings: dict) -> dict:
        """The loop's part of a saved state (the caller adds its tensors and keys): config, the command's settings
        as given; settings, what `check_resume` compares."""
        return {"step": self.step, "total_steps": self.total, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "history": self.history, "seconds": self.seconds,
                "config": config, "settings": settings, "resumed_at": self.resumed_at}

    def resume(self, saved: dict) -> None:
        """Continue from a saved state (`state`'s keys), checked by `check_resume`."""
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.step, self.history, self.seconds = saved["step"], saved["history"], saved["seconds"]
        self.resumed_at = list(saved.get("resumed_at", []))
        if self.resumed_at[-1:] != [self.step]:  # (an interrupt before any step resumes from the same one)
            self.resumed_at.append(self.step)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.step / self.seconds if self.seconds else 0.0


def data_digest(blocks: torch.Tensor) -> str:
    """The token blocks' digest: the same text, tokenizer, sequence length and split give the same one, however
    the files are named."""
    return hashlib.sha256(blocks.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def check_resume(saved: dict, where, total: int, settings: dict, may_change: str) -> None:
    """A resume continues the saved run (`Run.state`) as it was started. settings: what shapes its steps and the
    held-out score its report compares with the start ({option: value}; "training data" / "held-out data": their
    `data_digest`), to equal the saved run's (a state saved without them is not checked); may_change: what the
    message says may change instead. Errors: a setting differs; the saved run is past this run's `total` steps."""
    before = saved.get("settings") or {}
    for key in [k for k in settings if k in before]:
        if before[key] != settings[key]:
            what = f"{key} {before[key]!r}, this run gives {settings[key]!r}" if key.startswith("--") else \
                f"other {key} (token blocks {before[key]}, this run's {settings[key]})"
            raise ValueError(f"--resume: {where} was trained with {what}: resume with the run's settings ({may_change} "
                             "may change)")
    if total < saved["step"]:
        raise ValueError(f"--resume: {where} is at step {saved['step']}, past this run's {total} steps")


def train(run: Run, step_loss: Callable, blocks: torch.Tensor, batch_size: int, seed: int, device: torch.device,
          save: Callable[[], None], saved_to: str, desc: str, tokens_per_step: int, save_every: int = 0,
          progress: bool = True, after_step: Callable[[dict], str | None] | None = None) -> None:
    """Steps from `run.step` to `run.total`: the step's batch (`batch_at`), step_loss(batch) -> loss (a float or
    {exit: float}; its backward done), then the optimizer and schedule steps. after_step(history entry) may add to the
    entry and return a line to print; it runs again on the last entry of a resumed run (a Ctrl-C may have cut it
    short), so it adds only what the entry lacks. save() every `save_every` steps before the last (0: never) and on
    Ctrl-C, which then raises TrainingInterrupted naming `saved_to` and how to resume."""
    from tqdm import tqdm

    bar = tqdm(total=run.total, initial=run.step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line per 30 s
    try:
        if after_step is not None and run.history and run.step < run.total:
            line = after_step(run.history[-1])
            if line:
                bar.write(line)
        while run.step < run.total:
            batch = batch_at(blocks, run.step, batch_size, seed).to(device)
            t0 = time.perf_counter()
            loss = step_loss(batch)
            losses = loss if isinstance(loss, dict) else {None: loss}
            if not all(math.isfinite(v) for v in losses.values()):
                raise TrainingDiverged(f"the training loss at step {run.step + 1} is not finite ({loss}): the run "
                                       "diverged (a smaller --lr?); stopped before its update, nothing more was "
                                       "written")
            run.opt.step()
            run.sched.step()
            run.opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run.seconds += time.perf_counter() - t0
            run.step += 1
            run.history.append({"step": run.step, "loss": {str(k): v for k, v in loss.items()}
                                if isinstance(loss, dict) else loss})
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.4f}",
                            tok_s=f"{run.tokens_per_s(tokens_per_step):.0f}")
            line = after_step(run.history[-1]) if after_step is not None and run.step < run.total else None
            if line:
                bar.write(line)
            if save_every and run.step % save_every == 0 and run.step < run.total:
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        raise TrainingInterrupted(f"interrupted at step {run.step} of {run.total}; saved to {saved_to}. Resume with "
                                  "the same command plus --resume (without --overwrite)") from None
    bar.close()


def write_token_counts(folder: Path, paths: list[str], overwrite: bool = False):
    """Count the tokens of the text files with the folder's tokenizer into its `token_counts.safetensors`.
    Returns (counts [V] int64, the file's path). Errors: a missing folder, tokenizer or file, an empty file, existing
    counts without overwrite."""
    from transformers import AutoTokenizer

    from mexit.model.checkpoint import read_config
    from mexit.model.token_counts import TOKEN_COUNTS_FILE, count_tokens, save_token_counts

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint folder {folder} {state} (the counts are written into it)")
    config = read_config(folder)
    check_text(folder, paths)
    if (folder / TOKEN_COUNTS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{folder / TOKEN_COUNTS_FILE} exists: pass --overwrite to replace it")
    counts = count_tokens(token_blocks(AutoTokenizer.from_pretrained(folder), paths, 1), config.vocab_size)
    return counts, save_token_counts(folder, counts, [Path(p).name for p in paths])
