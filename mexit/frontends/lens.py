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


def table(pred: LayerPredictions, decode) -> str:
    """Heads x positions: each cell the top-1 token and its probability (%)."""
    lines = [f"{'position':>10} | " + " ".join(f"{show(decode([i])):>13}" for i in pred.input_ids)]
    for h, head in enumerate(pred.heads):
        cells = [f"{show(decode([int(pred.tokens[h, t, 0])]), 8):>8} {pred.logprobs[h, t, 0].exp() * 100:3.0f}%"
                 for t in range(len(pred.input_ids))]
        lines.append(f"{head_name(head):>10} | " + " ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def plot(pred: LayerPredictions, decode, path: Path, title: str = "") -> Path:
    """A heatmap of heads (rows, deepest on top) x positions: colour the top-1 probability, each cell its top-1
    token; columns labelled with the input token they follow. Readable up to about 24 heads x 40 positions."""
    from mexit.bench.common import pyplot

    plt = pyplot()
    if plt is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib")
    heads, positions = len(pred.heads), len(pred.input_ids)
    probs = pred.logprobs[:, :, 0].exp().numpy()[::-1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.62 * positions + 2.2), max(3.0, 0.32 * heads + 1.6)))
    image = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for h in range(heads):
        for t in range(positions):
            token = show(decode([int(pred.tokens[heads - 1 - h, t, 0])]), 7)
            ax.text(t, h, token, ha="center", va="center", fontsize=6,
                    color="black" if probs[h, t] > 0.6 else "white")
    ax.set_yticks(range(heads), [head_name(head) for head in pred.heads[::-1]], fontsize=7)
    ax.set_xticks(range(positions), [show(decode([i]), 7) for i in pred.input_ids], fontsize=6, rotation=60,
                  ha="right")
    ax.set_xlabel("input token (each column predicts the token after it)", fontsize=8)
    ax.set_title(title or "top-1 prediction of each head", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01).set_label("top-1 probability", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
