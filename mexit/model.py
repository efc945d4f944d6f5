"""The multi-exit GPT-2 decoder: plain PyTorch, with a Triton decode path (`fused=True`, the triton backend).

Weights of the same kind are stacked over layers (`attn_w[j]` is block j's c_attn), so that state propagation
can read the key/value weights of many skipped layers in one batched matmul (or one kernel). Blocks are numbered
0..n_layer-1 here; exit layer L (1-based, as in the checkpoint) is the output of block L-1, and `h_0` is the
embedding. The torch path is the reference that tests hold against transformers' GPT-2; the fused path computes
the same block with fp32 accumulation and one rounding per kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from mexit.kernels.propagate_kv_ref import propagate_kv_ref

from .config import ModelConfig


@dataclass
class Weights:
    """All tensors of a multi-exit GPT-2. Per-layer tensors have a leading n_layer dimension.

    Conv1D layout as in the checkpoint: `attn_w` is [L, d, 3d] (y = x @ W + b, output split q|k|v),
    `attn_proj_w` [L, d, d], `fc_w` [L, d, 4d], `fc_proj_w` [L, 4d, d]. Heads are [V, d].
    """

    wte: torch.Tensor
    wpe: torch.Tensor
    ln_1_w: torch.Tensor
    ln_1_b: torch.Tensor
    attn_w: torch.Tensor
    attn_b: torch.Tensor
    attn_proj_w: torch.Tensor
    attn_proj_b: torch.Tensor
    ln_2_w: torch.Tensor
    ln_2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    fc_proj_w: torch.Tensor
    fc_proj_b: torch.Tensor
    ln_f_w: torch.Tensor
    ln_f_b: torch.Tensor
    exit_heads: dict[int, torch.Tensor]
    lm_head: torch.Tensor | None = None  # [V, d] an untied checkpoint's own output head; None: tied to wte

    def to(self, device=None, dtype=None) -> Weights:
        moved = {f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)
                 if f.name not in ("exit_heads", "lm_head")}
        heads = {layer: w.to(device=device, dtype=dtype) for layer, w in self.exit_heads.items()}
        lm_head = self.lm_head.to(device=device, dtype=dtype) if self.lm_head is not None else None
        return Weights(**moved, exit_heads=heads, lm_head=lm_head)


@dataclass
class KVCache:
    """Static cache for `batch` rows and `max_length` slots: k, v are [n_layer, B, n_head, T, head_dim].

    `valid[b, t]` marks the slots that hold a real token of row b (left padding stays False).
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor


# Decode batches up to this many rows run the fused-linear kernels (fused=True); larger ones cuBLAS matmuls with
# separate layernorm / gelu / residual launches. 64: at every bucket up to 64 the fused block reads the same weight
# bytes from DRAM (row blocks of 32 share each weight tile through L2, kernels/fused_linear.tile_config) in 5
# launches instead of about 14, so by the bytes/launch model it should win; a GPU measures it
# (bench/bench_fused_linear.py block rows, `mexit bench --fused-max-rows`).
FUSED_MAX_ROWS = 64

# pending(j, rows) -> (row_index, slot_index, hidden) of earlier exited positions whose keys/values at block j
# must be filled now, or None. Used by the deferred state propagation of the early-exit scheduler.
PendingFill = Callable[[int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]


class MultiExitGPT2:
    """Runs embeddings, any contiguous range of blocks, and exit heads against a static KV cache."""

    def __init__(self, config: ModelConfig, weights: Weights, folder=None, random_weights: bool = False):
        self.config = config
        self.w = weights
        self.folder = folder  # checkpoint folder it was loaded from (tokenizer files live there)
        self.random_weights = random_weights  # True for benchmark / test models: label every result
        self.fused_max_rows = FUSED_MAX_ROWS  # decode batches up to this size run fused-linear blocks (fused=True)

    def fused_decode(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs its blocks as fused-linear kernels (with fused=True)."""
        return rows <= self.fused_max_rows

    @property
    def device(self) -> torch.device:
        return self.w.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.wte.dtype

    def head_weight(self, head: int | str) -> torch.Tensor:
        """[V, d] weight of `head`: "original" (the checkpoint's lm_head, or the tied embedding) or an exit
        layer number."""
        if head == "original":
            return self.w.lm_head if self.w.lm_head is not None else self.w.wte
        if head not in self.w.exit_heads:
            raise ValueError(f"exit layer {head} is not in this checkpoint; its exits are "
                             f"{sorted(self.w.exit_heads) or 'none'}")
        return self.w.exit_heads[head]

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        c = self.config
        if max_length > c.n_positions:
            raise ValueError(f"{max_length} positions exceed the model's context of {c.n_positions}")
        shape = (c.n_layer, batch, c.n_head, max_length, c.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=self.device, dtype=self.dtype),
            v=torch.zeros(shape, device=self.device, dtype=self.dtype),
            valid=torch.zeros(batch, max_length, device=self.device, dtype=torch.bool),
        )

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [B, S] int64 -> h_0 [B, S, d]."""
        return self.w.wte[ids] + self.w.wpe[positions]

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.config.n_embd,), self.w.ln_f_w, self.w.ln_f_b, self.config.layer_norm_epsilon)

    def head_logits(self, h: torch.Tensor, head: int | str) -> torch.Tensor:
        """Reference exit: head(ln_f(h)) in fp32. h: [..., d] -> [..., V]."""
        return F.linear(self.final_norm(h), self.head_weight(head)).float()

    def run_layers(self, h: torch.Tensor, start: int, end: int, cache: KVCache, slot: int,
                   rows: torch.Tensor | None = None, pending: PendingFill | None = None, fused: bool = False,
                   skip: torch.Tensor | None = None, live: torch.Tensor | None = None,
                   pdl: bool = False) -> torch.Tensor:
        """Turn h_start into h_end: run blocks start..end-1 on h [b, S, d] whose tokens sit at cache slots
        slot..slot+S-1. `rows` (int64 [b]) selects the cache rows when only some rows run; None means all.
        A tensor `slot` ([1] int64, S = 1, all rows) keeps every shape static for CUDA graph capture: the
        token attends over the whole cache, masked by `cache.valid`, which must already mark its own slot.
        fused: decode steps (S = 1) run the attention as the decode-attention kernel on the static path (tensor
        slot), and, up to `fused_max_rows` rows, the four matmuls of a block as fused-linear kernels. Fused path
        only: skip ([1] flag on the device): while it is set, each block only computes and stores the keys/values
        of its input (state propagation) and passes its input through; live ([b] bool): rows that are False are
        frozen the same way (their input passes through; their key/value write is state propagation). pdl: the
        kernels launch with programmatic dependent launch."""
        for j in range(start, end):
            h = self._block(j, h, cache, slot, rows, pending, fused, skip, live, pdl)
        return h

    def run_to(self, h: torch.Tensor, layers, cache: KVCache, slot, rows: torch.Tensor | None = None,
               pending: PendingFill | None = None, fused: bool = False, pdl: bool = False) -> dict[int, torch.Tensor]:
        """Run h_0 [b, S, d] up to max(layers); {layer: h_layer [b, S, d]} for every layer in `layers`."""
        states, start = {}, 0
        for layer in sorted(set(layers)):
            h = states[layer] = self.run_layers(h, start, layer, cache, slot, rows, pending, fused, pdl=pdl)
            start = layer
        return states

    def _block(self, j, x, cache, slot, rows, pending, fused=False, skip=None, live=None, pdl=False):
        c, w = self.config, self.w
        b, s, d = x.shape
        extra = pending(j, rows) if pending is not None else None
        if skip is not None or live is not None or (fused and s == 1 and self.fused_decode(b) and extra is None):
            return self._fused_block(j, x, cache, slot, rows, skip, live, pdl)
        a = F.layer_norm(x, (d,), w.ln_1_w[j], w.ln_1_b[j], c.layer_norm_epsilon)
        if extra is not None:  # compute skipped positions' keys/values in the same matmul as this token
            fill_rows, fill_slots, fill_h = extra
            fill_a = F.layer_norm(fill_h, (d,), eps=c.layer_norm_epsilon) * w.ln_1_w[j] + w.ln_1_b[j]  # as fill_kv
            qkv_all = F.linear(torch.cat([a.reshape(b * s, d), fill_a]), w.attn_w[j].T, w.attn_b[j])
            qkv, fill_kv = qkv_all[: b * s].view(b, s, 3 * d), qkv_all[b * s:, d:]
            self._write_kv(cache, j, fill_rows, fill_slots, fill_kv)
        else:
            qkv = F.linear(a, w.attn_w[j].T, w.attn_b[j])
        y = self._attention(j, qkv, cache, slot, rows, kernel=fused, pdl=pdl)
        x = x + F.linear(y, w.attn_proj_w[j].T, w.attn_proj_b[j])
        m = F.layer_norm(x, (d,), w.ln_2_w[j], w.ln_2_b[j], c.layer_norm_epsilon)
        m = F.gelu(F.linear(m, w.fc_w[j].T, w.fc_b[j]), approximate="tanh")
        return x + F.linear(m, w.fc_proj_w[j].T, w.fc_proj_b[j])

    def _fused_block(self, j, x, cache, slot, rows, skip=None, live=None, pdl=False):
        """The same block for one decode position per row: four fused-linear kernels around the attention (on
        the static path, tensor slot and all rows, the decode-attention kernel: five kernels per block). Frozen
        rows (`live` False, or all rows while `skip` is set) leave through the residual kernels unchanged."""
        from mexit.kernels.fused_linear import fused_linear

        c, w = self.config, self.w
        b, s, d = x.shape
        if s != 1:
            raise ValueError(f"the fused block runs one position per row, got {s}")
        eps = c.layer_norm_epsilon
        x = x.view(b, d)
        qkv = fused_linear(x, w.attn_w[j], w.attn_b[j], ln=(w.ln_1_w[j], w.ln_1_b[j], eps), skip=skip, skip_cols=d,
                           pdl=pdl)
        y = self._attention(j, qkv.view(b, 1, 3 * d), cache, slot, rows, kernel=True, skip=skip, pdl=pdl).view(b, d)
        x = fused_linear(y, w.attn_proj_w[j], w.attn_proj_b[j], residual=x, live=live, skip=skip, pdl=pdl)
        m = fused_linear(x, w.fc_w[j], w.fc_b[j], ln=(w.ln_2_w[j], w.ln_2_b[j], eps), gelu=True, skip=skip, pdl=pdl)
        return fused_linear(m, w.fc_proj_w[j], w.fc_proj_b[j], residual=x, live=live, skip=skip,
                            pdl=pdl).view(b, 1, d)

    def _attention(self, j, qkv, cache, slot, rows, kernel=False, skip=None, pdl=False) -> torch.Tensor:
        """Write this step's keys/values (qkv [b, S, 3d]) into block j's cache and attend: [b, S, d]. kernel: on
        the static path (tensor slot, all rows) the decode-attention kernel does both, marks the slot valid and
        reads only the slots up to this one (the torch path needs the slot marked already and attends over the
        whole length bucket, masked)."""
        c = self.config
        b, s, _ = qkv.shape
        d = c.n_embd
        if kernel and isinstance(slot, torch.Tensor) and rows is None:
            from mexit.kernels.decode_attention import decode_attention

            return decode_attention(qkv.view(b, 3 * d), cache.k[j], cache.v[j], cache.valid, slot,
                                    skip=skip, scale=c.attn_scale(j), pdl=pdl).view(b, 1, d)
        q, k, v = (t.view(b, s, c.n_head, c.head_dim).transpose(1, 2) for t in qkv.split(d, dim=-1))
        if isinstance(slot, torch.Tensor):  # static shapes (CUDA graphs): one token, slot on the device
            cache.k[j].index_copy_(2, slot, k)
            cache.v[j].index_copy_(2, slot, v)
            keys, values, mask = cache.k[j], cache.v[j], cache.valid[:, None, None, :]  # valid: slots <= this one
        elif rows is None:
            cache.k[j, :, :, slot:slot + s] = k
            cache.v[j, :, :, slot:slot + s] = v
            keys, values = cache.k[j, :, :, :slot + s], cache.v[j, :, :, :slot + s]
            mask = attention_mask(cache.valid[:, :slot + s], slot, s)[:, None]
        else:
            cache.k[j, rows, :, slot:slot + s] = k
            cache.v[j, rows, :, slot:slot + s] = v
            keys, values = cache.k[j, rows, :, :slot + s], cache.v[j, rows, :, :slot + s]
            mask = attention_mask(cache.valid[rows, :slot + s], slot, s)[:, None]
        if c.reorder_and_upcast_attn and q.dtype != torch.float32:  # scores and softmax in fp32
            y = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                               scale=c.attn_scale(j)).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=c.attn_scale(j))
        return y.transpose(1, 2).reshape(b, s, d)

    def fill_kv(self, h: torch.Tensor, start: int, end: int, cache: KVCache, rows: torch.Tensor,
                slots: torch.Tensor, kernel: bool = False, pdl: bool = False) -> None:
        """State propagation: keys/values of blocks start..end-1 for positions (rows[i], slots[i]) computed
        from h [N, d], the hidden state at which those positions exited, reading only the skipped blocks' k|v
        weights (2·d² of each block's 12·d²): one batched matmul, or with kernel=True one Triton launch (pdl:
        with programmatic dependent launch)."""
        if start >= end or h.shape[0] == 0:
            return
        w = self.w
        args = (h, w.ln_1_w, w.ln_1_b, w.attn_w, w.attn_b, cache.k, cache.v, rows, slots, start, end,
                self.config.layer_norm_epsilon)
        if kernel:
            from mexit.kernels.propagate_kv import propagate_kv

            propagate_kv(*args, pdl=pdl)
        else:
            propagate_kv_ref(*args)

    def _write_kv(self, cache, j, rows, slots, kv):
        """kv [N, 2d] into block j's cache slots (rows[i], slots[i])."""
        c = self.config
        k, v = kv.view(-1, 2, c.n_head, c.head_dim).unbind(1)
        cache.k[j, rows, :, slots] = k
        cache.v[j, rows, :, slots] = v


def attention_mask(valid: torch.Tensor, slot: int, s: int) -> torch.Tensor:
    """[b, s, slot+s] bool: query i (at slot+i) sees valid keys at or before its slot, and always itself
    (a left-padding query then has one key and stays finite; nothing real attends to it)."""
    t = slot + s
    key_pos = torch.arange(t, device=valid.device)
    query_pos = torch.arange(slot, t, device=valid.device)[:, None]
    causal = key_pos[None, :] <= query_pos
    return (valid[:, None, :] & causal) | (key_pos[None, :] == query_pos)
