"""Per-layer predictions shown (`mexit layers`): a table of heads x positions, or a heatmap of them."""

from __future__ import annotations

from pathlib import Path

from mexit.decoding.layers import LayerPredictions


def head_name(head) -> str:
    return "original" if head == "original" else f"exit {head}"


def show(text: str, width: int = 8) -> str:
    """A token's text on one short line (whitespace made visible)."""
    text = text.replace("\n", "\\n").replace(" ", "\u2423")
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def table(pred: LayerPredictions, decode, columns: int = 10) -> str:
    """Heads x positions: each cell the top-1 token and its probability (%); long prompts wrap into blocks of
    `columns` positions (lines stay about 160 characters)."""
    blocks = []
    for start in range(0, len(pred.input_ids), columns):
        span = range(start, min(start + columns, len(pred.input_ids)))
        lines = [f"{f'{span[0]}..{span[-1]}':>10} | " + " ".join(f"{show(decode([pred.input_ids[t]])):>13}"
                                                                  for t in span)]
        for h, head in enumerate(pred.heads):
            cells = [f"{show(decode([int(pred.tokens[h, t, 0])]), 8):>8} {pred.logprobs[h, t, 0].exp() * 100:3.0f}%"
                     for t in span]
            lines.append(f"{head_name(head):>10} | " + " ".join(f"{c:>13}" for c in cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(pred: LayerPredictions, decode, path: Path, title: str = "", columns: int = 32) -> Path:
    """A heatmap of heads (rows, deepest on top) x positions: colour the top-1 probability, each cell its top-1
    token; columns labelled with the input token they follow. Long prompts wrap into panels of `columns`
    positions stacked top to bottom, so the image stays at most about 3,300 pixels wide."""
    from .output import pyplot

    plt = pyplot()
    if plt is None:
        raise ValueError("--plot needs matplotlib (a mexit dependency missing from this install): "
                         "pip install 'matplotlib>=3.9'")
    heads, positions = len(pred.heads), len(pred.input_ids)
    probs = pred.logprobs[:, :, 0].exp().numpy()[::-1]
    panels = -(-positions // columns)
    width = min(positions, columns)
    fig, axes = plt.subplots(panels, 1, squeeze=False,
                             figsize=(max(6.0, 0.62 * width + 2.2), panels * max(3.0, 0.32 * heads + 1.6)))
    for p, ax in enumerate(axes[:, 0]):
        span = range(p * columns, min((p + 1) * columns, positions))
        image = ax.imshow(probs[:, span.start:span.stop], aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for h in range(heads):
            for i, t in enumerate(span):
                token = show(decode([int(pred.tokens[heads - 1 - h, t, 0])]), 7)
                ax.text(i, h, token, ha="center", va="center", fontsize=6,
                        color="black" if probs[h, t] > 0.6 else "white")
        ax.set_yticks(range(heads), [head_name(head) for head in pred.heads[::-1]], fontsize=7)
        ax.set_xticks(range(len(span)), [show(decode([pred.input_ids[t]]), 7) for t in span], fontsize=6,
                      rotation=60, ha="right")
        ax.set_xlim(-0.5, width - 0.5)
        if panels > 1:
            ax.set_ylabel(f"positions {span.start}..{span.stop - 1}", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01).set_label("top-1 probability", fontsize=7)
    axes[-1, 0].set_xlabel("input token (each column predicts the token after it)", fontsize=8)
    axes[0, 0].set_title(title or "top-1 prediction of each head", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as --out does
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
