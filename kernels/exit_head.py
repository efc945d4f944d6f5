"""Fused exit stage for one or two exits: layernorm + head projection + softmax statistics.

Stage 1 (`_exit_head_tiles`, grid = vocabulary tiles x exits x row blocks) reads each head's weights exactly
once: every program normalizes its hidden rows (fp32 statistics), computes a [rows, BLOCK_V] logit tile with
fp32 accumulation, stores it, and stores the tile's max, sum of exp, argmax and second max.
Stage 2 (`_exit_head_merge`, one program per exit and row) merges the tiles into log-sum-exp, max probability,
top-1 minus top-2 probability, the max logit and the argmax (first index on ties), and writes log-softmax
if asked. With `emit` (one exit, greedy decoding) the merge also ends the decode step: it emits its row's argmax
and sets the next step up (`step_epilogue.finish_row`). An optional device flag skips both stages (early exit
predicated inside one CUDA graph). With `pdl`, stage 1 loads its first weight tile before waiting on the kernel
before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .exit_head_ref import ExitHeadOutput
from .launch import interpreted, pdl_options
from .step_epilogue import arrive, embed_block, finish_row
from .step_epilogue_ref import StepIO
from .tiles import dot_acc, normalized_tile, one_load_width, row_stats


@triton.jit
def _exit_head_tiles(
    x0_ptr, x1_ptr, ln_w_ptr, ln_b_ptr, w0_ptr, w1_ptr, logits_ptr, stats_ptr, arg_ptr, skip_ptr,
    B, V, D, n_tiles, eps,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, FP32_IEEE: tl.constexpr,
    HAS_SKIP: tl.constexpr, USE_PDL: tl.constexpr, ROW_WIDTH: tl.constexpr,
):
    pid_v = tl.program_id(0)
    e = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    if e == 0:
        w_ptr = w0_ptr
        x_ptr = x0_ptr
    else:
        w_ptr = w1_ptr
        x_ptr = x1_ptr
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * D
    if USE_PDL:  # first: the next kernel may launch and issue its weight loads (it waits before reading)
        tl.extra.cuda.gdc_launch_dependents()
    PREFETCH: tl.constexpr = USE_PDL and not HAS_SKIP  # a skippable head reads no weight before its flag
    w_first = col_ok
    if PREFETCH:
        w_first = _head_tile(w_rows, 0, D, col_ok, BLOCK_D)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr).to(tl.int32) == 0
    if run:
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
        mean, rstd = row_stats(x_rows, row_ok, D, eps, BLOCK_B, BLOCK_D, ROW_WIDTH)
        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
        start = 0
        if PREFETCH:
            xn = normalized_tile(x_rows, row_ok, 0, D, mean, rstd, ln_w_ptr, ln_b_ptr, BLOCK_D)
            acc = dot_acc(xn, w_first, acc, FP32_IEEE)
            start = BLOCK_D
        for k in range(start, D, BLOCK_D):
            xn = normalized_tile(x_rows, row_ok, k, D, mean, rstd, ln_w_ptr, ln_b_ptr, BLOCK_D)
            acc = dot_acc(xn, _head_tile(w_rows, k, D, col_ok, BLOCK_D), acc, FP32_IEEE)

        out_ok = row_ok[:, None] & col_ok[None, :]
        tl.store(logits_ptr + (e * B + rows).to(tl.int64)[:, None] * V + cols[None, :], acc, mask=out_ok)
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        tile_max = tl.max(z, axis=1)
        tile_arg = pid_v * BLOCK_V + tl.argmax(z, axis=1, tie_break_left=True)
        p = tl.exp(z - tile_max[:, None])
        tile_sum = tl.sum(p, axis=1)
        tile_second = tl.max(tl.where(cols[None, :] == tile_arg[:, None], float("-inf"), z), axis=1)
        stat = (e * B + rows) * n_tiles + pid_v
        plane = 2 * B * n_tiles  # stats: [3, E(<=2), B, n_tiles] fp32 (a plane per statistic, stride for E=2)
        tl.store(stats_ptr + stat, tile_max, mask=row_ok)
        tl.store(stats_ptr + plane + stat, tile_sum, mask=row_ok)
        tl.store(stats_ptr + 2 * plane + stat, tile_second, mask=row_ok)
        tl.store(arg_ptr + stat, tile_arg, mask=row_ok)


@triton.jit
def _head_tile(w_rows, k, D, col_ok, BLOCK_D: tl.constexpr):
    """Columns k..k+BLOCK_D of the head's rows (w_rows: [BLOCK_V, 1] row pointers), transposed: [BLOCK_D, BLOCK_V]."""
    dd = tl.arange(0, BLOCK_D)
    return tl.trans(tl.load(w_rows + k + dd[None, :], mask=col_ok[:, None] & ((k + dd) < D)[None, :], other=0.0))


@triton.jit
def _exit_head_merge(
    stats_ptr,  # [3, 2, B, n_tiles] fp32: per tile max, sum of exp, second max
    arg_ptr,  # [E, B, n_tiles] int32: per tile argmax
    logits_ptr, logprobs_ptr,  # [E, B, V] fp32 (logprobs written with WRITE_LOGPROBS)
    out_ptr,  # [4, E * B] fp32: lse, max prob, margin, max logit
    argmax_ptr,  # [E * B] int64
    skip_ptr,  # [1] int32 (HAS_SKIP): nonzero skips the program
    io,  # EMIT: the step state, StepIO.pointers() (tokens, positions, finished, eos, out, step, slot, arrivals, ...)
    B, V, n_tiles, n_rows,  # rows per exit, vocabulary, tiles, E * B
    T, D, P,  # EMIT: out's row length, embedding width, positions
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_LOGPROBS: tl.constexpr, HAS_SKIP: tl.constexpr,
    EMIT: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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
        token = tl.load(arg_ptr + r * n_tiles + first).to(tl.int64)
        scale = tl.where(t_ok, tl.exp(tile_max - best), 0.0)
        total = tl.sum(tl.load(base + plane, mask=t_ok, other=0.0) * scale, axis=0)
        tile_second = tl.load(base + 2 * plane, mask=t_ok, other=float("-inf"))
        second = tl.max(tl.where(t == first, tile_second, tile_max), axis=0)
        lse = best + tl.log(total)
        top1 = tl.exp(best - lse)
        # out: [4, n_rows] = lse, max_prob, margin, max logit
        tl.store(out_ptr + r, lse)
        tl.store(out_ptr + n_rows + r, top1)
        tl.store(out_ptr + 2 * n_rows + r, top1 - tl.exp(second - lse))
        tl.store(out_ptr + 3 * n_rows + r, best)
        tl.store(argmax_ptr + r, token)
        if WRITE_LOGPROBS:
            row = r.to(tl.int64) * V
            for v in range(0, V, BLOCK_V):
                cols = v + tl.arange(0, BLOCK_V)
                z = tl.load(logits_ptr + row + cols, mask=cols < V, other=0.0)
                tl.store(logprobs_ptr + row + cols, z - lse, mask=cols < V)
        if EMIT:  # one exit: program r is row r; the greedy token ends the step
            finish_row(r, token, io, io[10], T, D, P, False, BLOCK_D)
            arrive(n_rows, io[5], io[6], io[7])


def tile_config(batch: int) -> dict:
    """Block sizes per batch size: BLOCK_B covers the rows (tl.dot needs >= 16), vocabulary tiles of 128. Chosen
    spill-free for sm_90a and sm_80 under triton 3.6 and 3.9 by bench/aot_compile.py, with the ptxas options Triton
    itself passes (the former 16x128x128 / 4 warps spilled 2.5-4 KB per thread; 16x128x64 spilled 8-16 bytes on
    sm_90a under triton 3.9, 128 registers at most); throughput untuned until a GPU run (bench_exit_head.py
    --sweep)."""
    if batch <= 16:  # 128 registers under triton 3.6 and 3.9: two programs of 8 warps per SM
        return dict(BLOCK_B=16, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2)  # 3 stages spill: sm_80 bf16
    if batch <= 32:
        return dict(BLOCK_B=32, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
    return dict(BLOCK_B=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)


def interpreter_config(batch: int, d: int) -> dict:
    """Under the interpreter: every row in one block, vocabulary tiles of 1024 (a few dozen programs)."""
    return dict(BLOCK_B=max(16, triton.next_power_of_2(batch)), BLOCK_V=1024,
                BLOCK_D=min(256, triton.next_power_of_2(d)), num_warps=4, num_stages=1)


def exit_head(hidden: torch.Tensor | Sequence[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
              eps: float, heads: list[torch.Tensor], with_logprobs: bool = False, config: dict | None = None,
              skip: torch.Tensor | None = None, emit: StepIO | None = None, pdl: bool = False) -> ExitHeadOutput:
    """Triton version of `exit_head_ref`: hidden [E, B, d] or E tensors [B, d] (E = 1 or 2), ln_* [d], heads
    E x [V, d], one dtype (fp16/bf16 on GPU; fp32/fp16 under TRITON_INTERPRET=1). Returns fp32 statistics and
    logits [E, B, V]. `skip` ([1] int32/bool on the device): when nonzero, both stages return before reading
    anything and every output is left unwritten (device-side predication of a head no row needs). `emit` (E = 1,
    no skip): the merge also emits each row's argmax as the step's token and advances `emit`'s step state, as
    `step_epilogue_ref(argmax, emit)`. pdl: launch with programmatic dependent launch (`kernels.launch`)."""
    xs = list(hidden.unbind(0)) if isinstance(hidden, torch.Tensor) else list(hidden)
    E = len(xs)
    B, D = xs[0].shape
    if E not in (1, 2) or len(heads) != E or any(x.shape != (B, D) or x.dtype != xs[0].dtype for x in xs):
        raise ValueError(f"exit_head takes one or two exits of [B, d] rows with one head each, got "
                         f"{[tuple(x.shape) for x in xs]} and {len(heads)} heads")
    V = heads[0].shape[0]
    for w in heads:
        if w.shape != (V, D) or w.dtype != xs[0].dtype or not w.is_contiguous():
            raise ValueError(f"heads must be contiguous [V, {D}] {xs[0].dtype}, got {tuple(w.shape)} {w.dtype}")
    if emit is not None and (E != 1 or skip is not None or emit.tokens.shape[0] != B):
        raise ValueError("emit takes one exit over the step's rows, without a skip flag")
    xs = [x.contiguous() for x in xs]
    cfg = dict(config or (interpreter_config(B, D) if interpreted() else tile_config(B)))
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    dev = xs[0].device
    logits = torch.empty(E, B, V, device=dev, dtype=torch.float32)
    stats = torch.empty(3, 2, B, n_tiles, device=dev, dtype=torch.float32)
    args = torch.empty(E, B, n_tiles, device=dev, dtype=torch.int32)
    grid = (n_tiles, E, triton.cdiv(B, cfg["BLOCK_B"]))
    options = pdl_options(pdl)
    _exit_head_tiles[grid](xs[0], xs[-1], ln_weight, ln_bias, heads[0], heads[-1], logits, stats, args,
                           skip if skip is not None else args, B, V, D, n_tiles, eps,
                           FP32_IEEE=xs[0].dtype == torch.float32, HAS_SKIP=skip is not None, USE_PDL=pdl,
                           ROW_WIDTH=one_load_width(cfg["BLOCK_B"], D), **cfg, **options)
    out = torch.empty(4, E * B, device=dev, dtype=torch.float32)
    argmax = torch.empty(E * B, device=dev, dtype=torch.int64)
    logprobs = torch.empty_like(logits) if with_logprobs else logits
    step_io = emit.pointers() if emit is not None else (argmax,) * 11
    T, D_io, P = emit.sizes() if emit is not None else (1, 1, 1)
    _exit_head_merge[(E * B,)](stats, args, logits, logprobs, out, argmax, skip if skip is not None else args,
                               step_io, B, V, n_tiles, E * B, T, D_io, P, BLOCK_T=triton.next_power_of_2(n_tiles),
                               BLOCK_V=1024, WRITE_LOGPROBS=with_logprobs, HAS_SKIP=skip is not None,
                               EMIT=emit is not None, BLOCK_D=embed_block(D_io), USE_PDL=pdl, **options)
    lse, max_prob, margin, max_logit = out.view(4, E, B).unbind(0)
    return ExitHeadOutput(logits=logits, lse=lse, max_prob=max_prob, margin=margin,
                          argmax=argmax.view(E, B), max_logit=max_logit,
                          logprobs=logprobs if with_logprobs else None)
