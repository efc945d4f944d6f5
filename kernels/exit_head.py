"""Fused exit stage for one or two exits: layernorm + head projection + softmax statistics.

Stage 1 (`_exit_head_tiles`, grid = vocabulary tiles x exits x row blocks) reads each head's weights exactly
once: every program normalizes its hidden rows (fp32 statistics), computes a [rows, BLOCK_V] logit tile with
fp32 accumulation, stores it, and stores the tile's max, sum of exp, sum of exp*logit, argmax and second max.
Stage 2 (`_exit_head_merge`, one program per exit and row) merges the tiles into log-sum-exp, max probability,
top-1 minus top-2 probability, entropy and the argmax (first index on ties), and writes log-softmax if asked.
An optional device flag skips both stages (early exit predicated inside one CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .exit_head_ref import ExitHeadOutput
from .tiles import normalized_tile, row_stats

LAUNCHES = {"exit_head": 0}  # counts wrapper calls, so tests can assert which path ran


@triton.jit
def _exit_head_tiles(
    x_ptr, ln_w_ptr, ln_b_ptr, w0_ptr, w1_ptr, logits_ptr, stats_ptr, arg_ptr, skip_ptr,
    B, V, D, n_tiles, eps,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, FP32_IEEE: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr).to(tl.int32) == 0
    if run:
        pid_v = tl.program_id(0)
        e = tl.program_id(1)
        rows = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        dd = tl.arange(0, BLOCK_D)
        x_rows = x_ptr + (e * B + rows).to(tl.int64)[:, None] * D

        mean, rstd = row_stats(x_rows, row_ok, D, eps, BLOCK_B, BLOCK_D)

        if e == 0:
            w_ptr = w0_ptr
        else:
            w_ptr = w1_ptr
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * D
        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            xn = normalized_tile(x_rows, row_ok, k, D, mean, rstd, ln_w_ptr, ln_b_ptr, BLOCK_D)
            wk = tl.load(w_rows + k + dd[None, :], mask=col_ok[:, None] & ((k + dd) < D)[None, :], other=0.0)
            if FP32_IEEE:  # fp32 weights: full-precision products, not tf32
                acc = tl.dot(xn, tl.trans(wk), acc, input_precision="ieee")
            else:
                acc = tl.dot(xn.to(wk.dtype), tl.trans(wk), acc)

        out_ok = row_ok[:, None] & col_ok[None, :]
        tl.store(logits_ptr + (e * B + rows).to(tl.int64)[:, None] * V + cols[None, :], acc, mask=out_ok)
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        tile_max = tl.max(z, axis=1)
        tile_arg = pid_v * BLOCK_V + tl.argmax(z, axis=1, tie_break_left=True)
        p = tl.exp(z - tile_max[:, None])
        tile_sum = tl.sum(p, axis=1)
        tile_zsum = tl.sum(p * tl.where(col_ok[None, :], acc, 0.0), axis=1)
        tile_second = tl.max(tl.where(cols[None, :] == tile_arg[:, None], float("-inf"), z), axis=1)
        stat = (e * B + rows) * n_tiles + pid_v
        plane = 2 * B * n_tiles  # stats: [4, E(<=2), B, n_tiles] fp32 (a plane per statistic, stride for E=2)
        tl.store(stats_ptr + stat, tile_max, mask=row_ok)
        tl.store(stats_ptr + plane + stat, tile_sum, mask=row_ok)
        tl.store(stats_ptr + 2 * plane + stat, tile_zsum, mask=row_ok)
        tl.store(stats_ptr + 3 * plane + stat, tile_second, mask=row_ok)
        tl.store(arg_ptr + stat, tile_arg, mask=row_ok)


@triton.jit
def _exit_head_merge(
    stats_ptr, arg_ptr, logits_ptr, logprobs_ptr, out_ptr, argmax_ptr, skip_ptr,
    B, V, n_tiles, n_rows,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_LOGPROBS: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr).to(tl.int32) == 0
    if run:
        r = tl.program_id(0)  # e * B + b
        t = tl.arange(0, BLOCK_T)
        t_ok = t < n_tiles
        plane = 2 * B * n_tiles
        base = stats_ptr + r * n_tiles + t
        tile_max = tl.load(base, mask=t_ok, other=float("-inf"))
        best = tl.max(tile_max, axis=0)
        first = tl.argmax(tile_max, axis=0, tie_break_left=True)  # tiles are in vocabulary order
        token = tl.load(arg_ptr + r * n_tiles + first)
        scale = tl.where(t_ok, tl.exp(tile_max - best), 0.0)
        total = tl.sum(tl.load(base + plane, mask=t_ok, other=0.0) * scale, axis=0)
        zsum = tl.sum(tl.load(base + 2 * plane, mask=t_ok, other=0.0) * scale, axis=0)
        tile_second = tl.load(base + 3 * plane, mask=t_ok, other=float("-inf"))
        second = tl.max(tl.where(t == first, tile_second, tile_max), axis=0)
        lse = best + tl.log(total)
        top1 = tl.exp(best - lse)
        # out: [4, n_rows] = lse, max_prob, margin, entropy
        tl.store(out_ptr + r, lse)
        tl.store(out_ptr + n_rows + r, top1)
        tl.store(out_ptr + 2 * n_rows + r, top1 - tl.exp(second - lse))
        tl.store(out_ptr + 3 * n_rows + r, lse - zsum / total)
        tl.store(argmax_ptr + r, token.to(tl.int64))
        if WRITE_LOGPROBS:
            row = r.to(tl.int64) * V
            for v in range(0, V, BLOCK_V):
                cols = v + tl.arange(0, BLOCK_V)
                z = tl.load(logits_ptr + row + cols, mask=cols < V, other=0.0)
                tl.store(logprobs_ptr + row + cols, z - lse, mask=cols < V)


def tile_config(batch: int) -> dict:
    """Block sizes per batch size: BLOCK_B covers the rows (tl.dot needs >= 16), vocabulary tiles of 128. Chosen
    spill-free for sm_90a and sm_80 under triton 3.6 and 3.9 by bench/aot_compile.py (the former 16x128x128 / 4
    warps spilled 2.5-4 KB per thread); throughput untuned until a GPU run (bench_exit_head.py --sweep)."""
    if batch <= 16:
        return dict(BLOCK_B=16, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
    if batch <= 32:
        return dict(BLOCK_B=32, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
    return dict(BLOCK_B=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)


def exit_head(hidden: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
              heads: list[torch.Tensor], with_logprobs: bool = False, config: dict | None = None,
              skip: torch.Tensor | None = None) -> ExitHeadOutput:
    """Triton version of `exit_head_ref`: hidden [E, B, d] (E = 1 or 2), ln_* [d], heads E x [V, d], one dtype
    (fp16/bf16 on GPU; fp32/fp16 under TRITON_INTERPRET=1). Returns fp32 statistics and logits [E, B, V].
    `skip` ([1] int32/bool on the device): when nonzero, both stages return before reading anything and every
    output is left unwritten (device-side predication of a head no row needs)."""
    E, B, D = hidden.shape
    if E not in (1, 2) or len(heads) != E:
        raise ValueError(f"exit_head takes one or two exits with one head each, got hidden {tuple(hidden.shape)} "
                         f"and {len(heads)} heads")
    V = heads[0].shape[0]
    for w in heads:
        if w.shape != (V, D) or w.dtype != hidden.dtype or not w.is_contiguous():
            raise ValueError(f"heads must be contiguous [V, {D}] {hidden.dtype}, got {tuple(w.shape)} {w.dtype}")
    hidden = hidden.contiguous()
    cfg = dict(config or tile_config(B))
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    dev = hidden.device
    logits = torch.empty(E, B, V, device=dev, dtype=torch.float32)
    stats = torch.empty(4, 2, B, n_tiles, device=dev, dtype=torch.float32)
    args = torch.empty(E, B, n_tiles, device=dev, dtype=torch.int32)
    grid = (n_tiles, E, triton.cdiv(B, cfg["BLOCK_B"]))
    _exit_head_tiles[grid](hidden, ln_weight, ln_bias, heads[0], heads[-1], logits, stats, args,
                           skip if skip is not None else args, B, V, D, n_tiles, eps,
                           FP32_IEEE=hidden.dtype == torch.float32, HAS_SKIP=skip is not None, **cfg)
    out = torch.empty(4, E * B, device=dev, dtype=torch.float32)
    argmax = torch.empty(E * B, device=dev, dtype=torch.int64)
    logprobs = torch.empty_like(logits) if with_logprobs else logits
    _exit_head_merge[(E * B,)](stats, args, logits, logprobs, out, argmax, skip if skip is not None else args,
                               B, V, n_tiles, E * B, BLOCK_T=triton.next_power_of_2(n_tiles), BLOCK_V=1024,
                               WRITE_LOGPROBS=with_logprobs, HAS_SKIP=skip is not None)
    LAUNCHES["exit_head"] += 1
    lse, max_prob, margin, entropy = out.view(4, E, B).unbind(0)
    return ExitHeadOutput(logits=logits, lse=lse, max_prob=max_prob, margin=margin, entropy=entropy,
                          argmax=argmax.view(E, B), logprobs=logprobs if with_logprobs else None)
