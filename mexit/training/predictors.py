"""`mexit train-exit-predictors`: learn, per checked exit, a logistic probe that predicts whether the exit's top-1
token equals the final head's (CALM's consistency oracle, Schuster et al. 2022), on text the user gives, with the
base and every head frozen (`mexit.model.predictors` for the probe).

Per batch the base runs once under no_grad to the final head's depth; every position of every block is an example
(label: argmax of exit L's head == argmax of the final head at that position; feature: standardize(h_L)). The
probes train with Adam on the mean binary cross-entropy, linear decay after a linear warm-up. The held-out report
gives, per exit, the label's base rate (how often the exit agrees with the final head), accuracy, Brier score,
expected calibration error (10 equal-width bins), ROC AUC, and the coverage and precision at a few thresholds:
the share of tokens that would exit and how often those agree. The predictors and the report are written into the
checkpoint folder, beside the heads, so `mexit.load` reads them with the weights; so are the text's token counts
(`token_counts.safetensors`, for draft vocabularies) when the folder has none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mexit.model.placement import resolve_device
from mexit.model.predictors import PREDICTOR_FILE, ExitPredictors, save_predictors
from mexit.model.token_counts import TOKEN_COUNTS_FILE, count_tokens, save_token_counts

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

STATE_FILE = "exit_predictors_state.pt"
REPORT = "exit_predictors_report"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass
class PredictorTrainingConfig:
    """What `train_exit_predictors` does. model: a local checkpoint folder with exit heads (the predictors are
    written into it). exits None: every exit below the final head's depth. data / eval_data: text files (eval_data
    None: the last `eval_fraction` of the data's blocks are held out). steps None and epochs None: two epochs."""

    model: str
    data: list[str]
    exits: tuple[int, ...] | None = None
    final_head: int | str = "original"
    eval_data: list[str] | None = None
    eval_fraction: float = 0.1
    seq_len: int | None = None  # None: 256, or the model's context if shorter
    batch_size: int = 8
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-2
    device: str | None = None
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    eval_max_blocks: int = 256
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True


def check_inputs(cfg: PredictorTrainingConfig):
    """Every check that needs no weights, before any work. Returns (folder, config, exits, depth)."""
    from mexit.model.checkpoint import read_config

    folder = Path(cfg.model).expanduser()
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint folder {folder} {state}: train-exit-predictors writes the predictors "
                                "into a local checkpoint folder (download or `mexit convert` it first)")
    config = read_config(folder)
    check_text(folder, cfg.data, cfg.eval_data)
    if not config.exit_layers:
        raise ValueError(f"{folder} has no exit heads: train them first (mexit train-heads)")
    final = cfg.final_head
    if final != "original" and final not in config.exit_layers:
        raise ValueError(f"final head {final} is not an exit of this checkpoint ({list(config.exit_layers)})")
    depth = config.n_layer if final == "original" else int(final)
    below = [x for x in config.exit_layers if x < depth]
    exits = tuple(sorted(cfg.exits)) if cfg.exits else tuple(below)
    bad = sorted(set(exits) - set(below))
    if bad:
        raise ValueError(f"exits {bad} are not exits of this checkpoint below the final head's depth {depth} "
                         f"(those are {below or 'none'})")
    if not exits:
        raise ValueError(f"no exit below the final head's depth {depth}")
    if len(set(exits)) != len(exits):
        raise ValueError(f"duplicate exits in {list(cfg.exits)}")
    if cfg.seq_len is None:
        cfg.seq_len = min(256, config.n_positions)
    if not 1 <= cfg.seq_len <= config.n_positions:
        raise ValueError(f"seq_len must be in 1..{config.n_positions} (the model's context), got {cfg.seq_len}")
    check_run(cfg)
    check_counts(cfg)
    if cfg.resume:
        if not (folder / STATE_FILE).exists():
            raise FileNotFoundError(f"--resume: {folder} holds no {STATE_FILE} to resume from")
    elif (folder / PREDICTOR_FILE).exists() and not cfg.overwrite:
        raise FileExistsError(f"{folder / PREDICTOR_FILE} exists: pass --overwrite to replace it, or --resume to "
                              "continue its training")
    resolve_device(cfg.device)
    return folder, config, exits, depth


class PredictorTrainer:
    """Frozen base and heads, trainable probes weight [E, d], bias [E] (fp32)."""

    def __init__(self, model, exits: tuple[int, ...], final_head, depth: int):
        self.model, self.exits, self.final_head, self.depth = model, exits, final_head, depth
        d = model.config.n_embd
        self.weight = torch.nn.Parameter(torch.zeros(len(exits), d, device=model.device))
        self.bias = torch.nn.Parameter(torch.zeros(len(exits), device=model.device))
        self.eps = model.config.layer_norm_epsilon

    def top1(self, h: torch.Tensor, head) -> torch.Tensor:
        """[N] argmax of `head` on states h [N, d], in row chunks (bounded logits)."""
        chunk = max(1, LOGITS_PER_CHUNK // self.model.config.vocab_size)
        return torch.cat([self.model.head_logits(h[i:i + chunk], head).argmax(-1) for i in range(0, len(h), chunk)])

    @torch.no_grad()
    def examples(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position of blocks [B, T]: features [E, N, d] fp32 (standardized states) and labels [E, N] fp32
        (1: exit e's top-1 equals the final head's)."""
        model = self.model
        b, t = blocks.shape
        states = model.forward(blocks, sorted({*self.exits, self.depth}))[1]
        states = {layer: h.reshape(b * t, -1) for layer, h in states.items()}
        final = self.top1(states[self.depth], self.final_head)
        feats = torch.stack([F.layer_norm(states[L].float(), (states[L].shape[-1],), eps=self.eps)
                             for L in self.exits])
        labels = torch.stack([(self.top1(states[L], L) == final).float() for L in self.exits])
        return feats, labels

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("end,ed->en", feats, self.weight) + self.bias[:, None]

    def step(self, blocks: torch.Tensor) -> float:
        feats, labels = self.examples(blocks)
        loss = F.binary_cross_entropy_with_logits(self.logits(feats), labels)
        loss.backward()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor, batch: int) -> dict:
        """Held-out metrics per exit (see the module docstring)."""
        probs, labels = [], []
        for i in range(0, len(blocks), batch):
            feats, y = self.examples(blocks[i:i + batch])
            probs.append(torch.sigmoid(self.logits(feats)).cpu())
            labels.append(y.cpu())
        p, y = torch.cat(probs, 1).double(), torch.cat(labels, 1).double()
        return {str(L): calibration(p[e], y[e]) for e, L in enumerate(self.exits)}

    def predictors(self, info: dict) -> ExitPredictors:
        return ExitPredictors(self.exits, self.weight.detach().clone(), self.bias.detach().clone(), self.eps,
                              self.final_head, info)


def calibration(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> dict:
    """p: [N] predicted probabilities, y: [N] labels in {0, 1} -> base rate, accuracy, Brier, ECE, AUC (None when
    one class is absent), log loss, and {threshold: (coverage, precision)}."""
    n = len(p)
    which = torch.clamp((p * bins).long(), max=bins - 1)
    ece = sum(abs(p[which == k].sum() - y[which == k].sum()).item() for k in range(bins)) / n
    positives, negatives = int(y.sum()), n - int(y.sum())
    auc = None
    if positives and negatives:  # Mann-Whitney U with average ranks for ties
        order = torch.argsort(p)
        ranks = torch.empty(n, dtype=torch.float64)
        ranks[order] = torch.arange(1, n + 1, dtype=torch.float64)
        for value in torch.unique(p[torch.cat([p[order][1:] == p[order][:-1], torch.tensor([False])])]):
            tied = p == value
            ranks[tied] = ranks[tied].mean()
        auc = (ranks[y == 1].sum().item() - positives * (positives + 1) / 2) / (positives * negatives)
    at = {}
    for threshold in THRESHOLDS:
        fired = p >= threshold
        at[str(threshold)] = {"coverage": fired.double().mean().item(),
                              "precision": y[fired].mean().item() if fired.any() else None}
    eps = 1e-12
    log_loss = -(y * (p + eps).log() + (1 - y) * (1 - p + eps).log()).mean().item()
    return {"examples": n, "base_rate": y.mean().item(), "accuracy": ((p >= 0.5).double() == y).double().mean().item(),
            "brier": ((p - y) ** 2).mean().item(), "ece": ece, "auc": auc, "log_loss": log_loss, "at": at}


def report_markdown(report: dict) -> str:
    rows = ["| exit | agrees with final (base rate) | accuracy | Brier | ECE | AUC | "
            + " | ".join(f"coverage / precision at {t}" for t in THRESHOLDS) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(THRESHOLDS)]
    for exit_layer, m in report["eval"].items():
        cells = [f"{m['at'][str(t)]['coverage']:.3f} / " + (f"{m['at'][str(t)]['precision']:.3f}"
                                                             if m['at'][str(t)]['precision'] is not None else "-")
                 for t in THRESHOLDS]
        auc = f"{m['auc']:.3f}" if m["auc"] is not None else "-"
        rows.append(f"| {exit_layer} | {m['base_rate']:.3f} | {m['accuracy']:.3f} | {m['brier']:.4f} | {m['ece']:.4f} "
                    f"| {auc} | " + " | ".join(cells) + " |")
    t = report["training"]
    return (f"# train-exit-predictors report\n\ncheckpoint `{report['model']}`, exits {report['exits']} against the "
            f"{report['final_head']!r} head; {t['steps']} steps x {t['batch_size']} x {t['seq_len']} tokens, lr "
            f"{t['lr']}, {t['device']}: {t['seconds']:.1f} s ({t['tokens_per_s']:.0f} tokens/s){resumed(t)}. Held out: "
            f"{report['eval_tokens']} tokens.\n\n" + "\n".join(rows) + "\n")


def train_exit_predictors(cfg: PredictorTrainingConfig) -> dict:
    """Train the probes of `cfg.exits` on the frozen checkpoint `cfg.model` and write them (and the report) into
    its folder. Returns the report."""
    from transformers import AutoTokenizer

    from mexit.model.checkpoint import load

    folder, config, exits, depth = check_inputs(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks, eval_blocks = split_blocks(tokenizer, cfg, device)
    per_epoch = len(blocks) // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, round((cfg.epochs or 2.0) * per_epoch))
    warmup = max(1, total // 20)
    settings = {"--lr": cfg.lr, "--batch-size": cfg.batch_size, "--seq-len": cfg.seq_len, "--seed": cfg.seed,
                "--eval-max-blocks": cfg.eval_max_blocks, "training data": data_digest(blocks),
                "held-out data": data_digest(eval_blocks)}
    saved = None
    if cfg.resume:  # checked before the model loads
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if tuple(saved["exits"]) != exits or str(saved["final_head"]) != str(cfg.final_head):
            raise ValueError(f"--resume: {folder} trains exits {saved['exits']} against {saved['final_head']!r}; this "
                             f"run asks for {list(exits)} against {cfg.final_head!r}")
        check_resume(saved, folder / STATE_FILE, total, settings,
                     "the length (--steps / --epochs), --device and --save-every")

    model = load(folder, dtype="fp32", device=device)
    trainer = PredictorTrainer(model, exits, cfg.final_head, depth)
    opt = torch.optim.Adam([trainer.weight, trainer.bias], lr=cfg.lr)
    run = Run(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total)), total)
    if saved is not None:
        run.resume(saved)
        with torch.no_grad():
            trainer.weight.copy_(saved["weight"])
            trainer.bias.copy_(saved["bias"])

    def save_state():
        torch.save({**run.state(asdict(cfg), settings), "exits": list(exits), "final_head": str(cfg.final_head),
                    "weight": trainer.weight.detach().cpu(), "bias": trainer.bias.detach().cpu()},
                   folder / (STATE_FILE + ".tmp"))
        (folder / (STATE_FILE + ".tmp")).replace(folder / STATE_FILE)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    train(run, trainer.step, blocks, cfg.batch_size, cfg.seed, device, save_state, str(folder / STATE_FILE),
          "train-exit-predictors", tokens_per_step, cfg.save_every, cfg.progress)
    check_finite("trained predictors", [trainer.weight, trainer.bias], run.step)
    final_eval = trainer.evaluate(eval_blocks, cfg.batch_size)
    check_finite("held-out scores", final_eval, run.step)
    report = {
        "model": str(folder), "exits": list(exits), "final_head": cfg.final_head,
        "label": "argmax of the exit's head == argmax of the final head, same position (CALM's consistency oracle)",
        "eval": final_eval, "eval_tokens": int(eval_blocks.numel()),
        "train_blocks": len(blocks),
        "training": {"steps": total, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lr": cfg.lr,
                     "warmup_steps": warmup, "device": str(device), "seconds": run.seconds,
                     "tokens_per_s": run.tokens_per_s(tokens_per_step),
                     "final_train_loss": run.history[-1]["loss"] if run.history else None,
                     "resumed_at": run.resumed_at},
    }
    info = {"data": [Path(p).name for p in cfg.data], "steps": total, "seq_len": cfg.seq_len,
            "held_out": {k: {m: v[m] for m in ("base_rate", "accuracy", "ece", "auc")}
                         for k, v in report["eval"].items()}}
    save_predictors(folder, trainer.predictors(info))
    if not (folder / TOKEN_COUNTS_FILE).exists():  # the text's token frequencies, for draft vocabularies
        save_token_counts(folder, count_tokens(blocks, config.vocab_size), [Path(p).name for p in cfg.data])
    save_state()
    (folder / f"{REPORT}.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (folder / f"{REPORT}.md").write_text(report_markdown(report))
    return report
