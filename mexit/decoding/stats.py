"""The statistics vocabulary every mode and engine reports, and the one weight-bytes formula.

Counters over the decode steps after the prompt's (the prefill reads every weight once for all its positions):
- `steps`: decode steps (speculative decoding: rounds);
- `weight_blocks`: blocks whose weights some row read; `weight_heads`: heads read (exit heads and the original);
- `weight_fill_blocks`: blocks whose key/value weights were read only to propagate exited states;
- `weight_predictors`: learned exit predictors read (d + 1 fp32 weights each).
Derived per generated token of a row (decoded tokens: all but the first, `decoded_tokens_per_row`):
`weight_bytes_per_token`, `full_depth_weight_bytes_per_token` (the same tokens decoded by the full model, its
original head at full depth; early exit: its final head at full depth; speculative decoding: its target at full
depth: `Mode.reference`) and their ratio `weight_bytes_ratio`.
Early exit adds `exits` (per row and token: `GenerationResult.exit_layers`), `mean_exit_layer`, `checks`,
`head_rows`, `blocks_run`, `kv_filled` (deferred propagation: `kv_owed`, what no later token needed); speculative
decoding `drafted`, `accepted`, `verifications`, `acceptance_rate`; `host_reads` (device-to-host reads
that wait for the GPU: the static engine's, and the eager engine's reads of its checks' tests), the static engine
`segments` and `fills` (early-exit pieces launched)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig


def exit_histogram(exit_layers: list[list[int]]) -> dict[str, int]:
    """{exit layer (as a JSON key): tokens that exited there} over rows of per-token exit layers, in layer order."""
    flat = sorted(x for row in exit_layers for x in row)
    return {str(layer): flat.count(layer) for layer in dict.fromkeys(flat)}


def weight_reads() -> dict:
    return dict(steps=0, weight_blocks=0, weight_heads=0, weight_fill_blocks=0, weight_predictors=0)


def block_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes of one block: c_attn, attention c_proj, c_fc, mlp c_proj with their biases, two layernorms."""
    d, inner = config.n_embd, config.inner_dim
    return (4 * d * d + 2 * d * inner + 9 * d + inner) * dtype.itemsize


def weight_bytes(config: ModelConfig, dtype: torch.dtype, blocks: float, heads: float, fill_blocks: float = 0.0,
                 predictors: float = 0.0) -> float:
    """Bytes of `blocks` blocks, `heads` heads ([V, d] each), the key/value weights (2·d²) of `fill_blocks` and
    `predictors` learned exit predictors (d + 1 fp32 each)."""
    d = config.n_embd
    return (blocks * block_bytes(config, dtype) + heads * config.vocab_size * d * dtype.itemsize
            + fill_blocks * 2 * d * d * dtype.itemsize + predictors * (d + 1) * 4)


def per_token(stats: dict, config: ModelConfig, dtype: torch.dtype, decoded_per_row: float, depth: int,
              heads: int) -> dict:
    """The derived bytes entries for counters over `decoded_per_row` tokens per row, against the reference that
    reads `depth` blocks and `heads` heads per token (`Mode.reference`)."""
    if not decoded_per_row:
        return dict(decoded_tokens_per_row=0, weight_bytes_per_token=0.0, full_depth_weight_bytes_per_token=0.0,
                    weight_bytes_ratio=None)
    spent = weight_bytes(config, dtype, stats["weight_blocks"], stats["weight_heads"], stats["weight_fill_blocks"],
                         stats.get("weight_predictors", 0))
    full = weight_bytes(config, dtype, depth, heads)
    return dict(decoded_tokens_per_row=decoded_per_row, weight_bytes_per_token=spent / decoded_per_row,
                full_depth_weight_bytes_per_token=full, weight_bytes_ratio=spent / decoded_per_row / full)
