"""The multi-exit GPT-2 decoder: embeddings, any contiguous range of blocks against a static KV cache, state
propagation, and the heads' weights. Its matmuls and decode attention are ops (`mexit.ops`): on the torch backend
the references, which tests hold against transformers' GPT-2; on the triton backend decode steps (one position per
row) run the fused kernels (fp32 accumulation, one rounding per kernel) and prompts keep the torch ops.

Weights of the same kind are stacked over layers (`attn_w[j]` is block j's c_attn), so that state propagation
can read the key/value weights of many skipped layers in one batched matmul (or one kernel). Blocks are numbered
0..n_layer-1 here; exit layer L (1-based, as in the checkpoint) is the output of block L-1, and `h_0` is the
embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from mexit import ops
from mexit.ops import TORCH, Backend

from .config import ModelConfig


@dataclass
class Weights:
    """All tensors of a multi-exit GPT-2. Per-layer tensors have a leading n_layer dimension.

    Block matrices in nn.Linear's layout [L, N, K] (y = x @ W.T + b; each output's K weights contiguous, what the
    decode kernels stream), the transpose of the checkpoint's Conv1D [K, N] (`checkpoint.checkpoint_tensors` maps
    the names): `attn_w` is [L, 3d, d] (outputs q|k|v), `attn_proj_w` [L, d, d], `fc_w` [L, 4d, d], `fc_proj_w`
    [L, d, 4d]. Heads are [V, d].
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

    `valid[b, t]` marks the slots that hold a real token of row b (left padding stays False). `health[b, t]`
    (fp32; a decode's cache only, else None): 0 while every state computed for the token at slot t is finite, NaN
    once one was not (`ops.check_states`, where a step's states end: `run_layers`).
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    health: torch.Tensor | None = None

    def start(self, valid: torch.Tensor) -> None:
        """A new batch: slots 0..S-1 hold the tokens that valid [B, S] bool marks (left padding False), no later
        slot holds one, and no state is marked non-finite."""
        self.valid.zero_()
        self.valid[:, : valid.shape[1]] = valid
        if self.health is not None:
            self.health.zero_()

    def mark(self, slot) -> None:
        """Every row's token at `slot` (an int, or a [1] int64 device tensor: no host value, graph-safe) is a key
        from now on."""
        if isinstance(slot, torch.Tensor):
            self.valid.index_fill_(1, slot, True)
        else:
            self.valid[:, slot] = True

    def update(self, block: int, k: torch.Tensor, v: torch.Tensor, slot, rows: torch.Tensor | None = None):
        """Write block `block`'s keys and values k, v [b, n_head, S, head_dim] of S new tokens and return the keys and
        values those tokens attend over. slot: their slots as an [S] int64 tensor (every row, static shapes: returns
        the whole cache), or the first of S consecutive slots as an int (every row, or the cache rows `rows` [b]
        int64: returns the slots up to the last new one)."""
        if isinstance(slot, torch.Tensor):
            self.k[block].index_copy_(2, slot, k)
            self.v[block].index_copy_(2, slot, v)
            return self.k[block], self.v[block]
        end = slot + k.shape[2]
        if rows is None:
            self.k[block, :, :, slot:end] = k
            self.v[block, :, :, slot:end] = v
            return self.k[block, :, :, :end], self.v[block, :, :, :end]
        self.k[block, rows, :, slot:end] = k
        self.v[block, rows, :, slot:end] = v
        return self.k[block, rows, :, :end], self.v[block, rows, :, :end]


class MultiExitGPT2:
    """Runs embeddings, any contiguous range of blocks, and state propagation against a static KV cache."""

    def __init__(self, config: ModelConfig, weights: Weights, folder=None, random_weights: bool = False):
        self.config = config
        self.w = weights
        self.folder = folder  # checkpoint folder it was loaded from (tokenizer files live there)
        self.random_weights = random_weights  # True for benchmark / test models: label every result
        self.predictors = None  # mexit.model.predictors.ExitPredictors stored beside the weights, or None
        self.token_counts: torch.Tensor | None = None  # [V] int64 token frequencies stored beside the weights

    @property
    def device(self) -> torch.device:
        return self.w.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.wte.dtype

    def layer_of(self, head: int | str) -> int:
        """The layer whose output a head reads: an exit layer's own number; "original" reads the last block."""
        return self.config.n_layer if head == "original" else int(head)

    def exit_stage(self, hidden, heads: list, backend: Backend = TORCH, **options):
        """The exit stage (`ops.exit_head`): ln_f, then each head, with softmax statistics (fp32). hidden [E, B, d]
        or E tensors [B, d]; heads: E heads by name ("original" or an exit layer) or weight ([V', d]: a restricted
        head); options: exit_head's (with_logprobs, skip, emit)."""
        weights = [head if isinstance(head, torch.Tensor) else self.head_weight(head) for head in heads]
        return ops.exit_head(hidden, self.w.ln_f_w, self.w.ln_f_b, self.config.layer_norm_epsilon, weights, backend,
                             **options)

    def head_weight(self, head: int | str) -> torch.Tensor:
        """[V, d] weight of `head`: "original" (the checkpoint's lm_head, or the tied embedding) or an exit
        layer number."""
        if head == "original":
            return self.w.lm_head if self.w.lm_head is not None else self.w.wte
        if head not in self.w.exit_heads:
            raise ValueError(f"exit layer {head} is not in this checkpoint; its exits are "
                             f"{sorted(self.w.exit_heads) or 'none'}")
        return self.w.exit_heads[head]

    def new_cache(self, batch: int, slots: int, check_states: bool = False) -> KVCache:
        """An empty cache of `batch` rows and `slots` slots (a slot is a cache column: positions are separate, so
        speculative decoding may use more slots than the context has positions). check_states: with `health`, so
        runs of blocks mark tokens whose states are not finite."""
        c = self.config
        shape = (c.n_layer, batch, c.n_head, slots, c.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=self.device, dtype=self.dtype),
            v=torch.zeros(shape, device=self.device, dtype=self.dtype),
            valid=torch.zeros(batch, slots, device=self.device, dtype=torch.bool),
            health=torch.zeros(batch, slots, device=self.device) if check_states else None,
        )

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [B, S] int64 -> h_0 [B, S, d]."""
        return self.w.wte[ids] + self.w.wpe[positions]

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (self.config.n_embd,), self.w.ln_f_w, self.w.ln_f_b, self.config.layer_norm_epsilon)

    def head_logits(self, h: torch.Tensor, head: int | str) -> torch.Tensor:
        """Reference exit: head(ln_f(h)) in fp32. h: [..., d] -> [..., V]."""
        return F.linear(self.final_norm(h), self.head_weight(head)).float()

    def run_layers(self, h: torch.Tensor, start: int, end: int, cache: KVCache, slot, backend: Backend = TORCH,
                   rows: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                   live: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """Turn h_start into h_end: run blocks start..end-1 on h [b, S, d] whose tokens sit at cache slots
        slot..slot+S-1. `rows` (int64 [b]) selects the cache rows when only some rows run; None means all.
        A tensor `slot` ([1] int64, all rows) keeps every shape static for CUDA graph capture: the tokens attend
        over the whole cache, masked by `cache.valid` (which must already mark their slots) and causally.
        Decode steps (S = 1) run their ops on `backend` (the triton kernels: fused linears, and with a tensor slot
        the decode-attention kernel, which marks the slot itself); prompts run the torch ops.
        live ([b] bool): rows that are False are frozen: their input passes through every block unchanged, so
        their key/value writes are state propagation from it. skip ([1] int32 on the device, triton): while set,
        every row is frozen and the blocks read only c_attn's key/value weights. A cache with `health` has the
        tokens whose new states are not finite marked (one check per call; check=False: the caller checks the states
        where its step ends, `ops.check_states`)."""
        for j in range(start, end):
            h = self._block(j, h, cache, slot, backend if h.shape[1] == 1 else TORCH, rows, skip, live)
        if check and cache.health is not None and end > start:
            ops.check_states(h, cache.health, cache.valid, slot, rows, backend if h.shape[1] == 1 else TORCH)
        return h

    def forward(self, ids: torch.Tensor, layers, valid: torch.Tensor | None = None, cache: KVCache | None = None,
                backend: Backend = TORCH) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One pass over whole sequences ids [B, S] int64 up to max(layers): (h_0 [B, S, d], {layer: h_layer [B, S,
        d]} for every layer in `layers`). valid [B, S] bool marks the real tokens (left padding False; None: all);
        positions count from each row's first real token. Keys and values go into slots 0..S-1 of `cache` (`start`ed;
        None: a new cache of S slots)."""
        b, s = ids.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=ids.device)
        if cache is None:
            cache = self.new_cache(b, s)
        cache.start(valid)
        h = self.embed(ids, (valid.long().cumsum(-1) - 1).clamp(min=0))
        return h, self.run_to(h, layers, cache, 0, backend)

    def run_to(self, h: torch.Tensor, layers, cache: KVCache, slot, backend: Backend = TORCH,
               rows: torch.Tensor | None = None, start: int = 0) -> dict[int, torch.Tensor]:
        """Run h_start [b, S, d] (the states at layer `start`, default the embeddings) up to max(layers);
        {layer: h_layer [b, S, d]} for every layer in `layers` (all above `start`)."""
        states = {}
        for layer in sorted(set(layers)):
            h = states[layer] = self.run_layers(h, start, layer, cache, slot, backend, rows)
            start = layer
        return states

    def _block(self, j, x, cache, slot, backend, rows, skip, live):
        c, w = self.config, self.w
        b, s, d = x.shape
        eps = c.layer_norm_epsilon
        x = x.reshape(b * s, d)
        if live is not None and s > 1:
            live = live.repeat_interleave(s)
        qkv = ops.fused_linear(x, w.attn_w[j], w.attn_b[j], backend, ln=(w.ln_1_w[j], w.ln_1_b[j], eps), skip=skip,
                               skip_cols=d)
        y = self._attention(j, qkv.view(b, s, 3 * d), cache, slot, rows, backend, skip).reshape(b * s, d)
        x = ops.fused_linear(y, w.attn_proj_w[j], w.attn_proj_b[j], backend, residual=x, live=live, skip=skip)
        m = ops.fused_linear(x, w.fc_w[j], w.fc_b[j], backend, ln=(w.ln_2_w[j], w.ln_2_b[j], eps), gelu=True,
                             skip=skip)
        return ops.fused_linear(m, w.fc_proj_w[j], w.fc_proj_b[j], backend, residual=x, live=live,
                                skip=skip).view(b, s, d)

    def _attention(self, j, qkv, cache, slot, rows, backend, skip) -> torch.Tensor:
        """Write this step's keys/values (qkv [b, S, 3d]) into block j's cache and attend: [b, S, d]. On the
        triton backend a decode step with a tensor slot over all rows runs the decode-attention kernel (it marks
        the slot valid and reads only the slots up to this one); otherwise torch's attention, over the slots up to
        the last new one (an int slot) or the whole length bucket, masked (a tensor slot)."""
        c = self.config
        b, s, _ = qkv.shape
        d = c.n_embd
        if backend.triton and isinstance(slot, torch.Tensor) and rows is None and s == 1:
            return ops.decode_attention(qkv.view(b, 3 * d), cache.k[j], cache.v[j], cache.valid, slot, backend,
                                        skip=skip, scale=c.attn_scale(j)).view(b, 1, d)
        if skip is not None:
            raise ValueError("a skip flag needs the decode-attention kernel: one position per row, all rows, "
                             "a tensor slot, the triton backend")
        q, k, v = (t.view(b, s, c.n_head, c.head_dim).transpose(1, 2) for t in qkv.split(d, dim=-1))
        if isinstance(slot, torch.Tensor):  # static shapes (CUDA graphs): slots on the device
            slots = slot if s == 1 else slot + torch.arange(s, device=slot.device)
            keys, values = cache.update(j, k, v, slots)
            mask = cache.valid[:, None, None, :]  # valid: slots <= this one
            if s > 1:  # several new positions: each sees the slots up to its own
                mask = mask & (torch.arange(keys.shape[2], device=slot.device) <= slots[:, None])
        else:
            keys, values = cache.update(j, k, v, slot, rows)
            valid = cache.valid[:, :slot + s] if rows is None else cache.valid[rows, :slot + s]
            mask = attention_mask(valid, slot, s)[:, None]
        if c.reorder_and_upcast_attn and q.dtype != torch.float32:  # scores and softmax in fp32
            y = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                               scale=c.attn_scale(j)).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=c.attn_scale(j))
        return y.transpose(1, 2).reshape(b, s, d)

    def fill_kv(self, h: torch.Tensor, start: int, end: int, cache: KVCache, rows: torch.Tensor,
                slots: torch.Tensor, backend: Backend = TORCH) -> None:
        """State propagation: keys/values of blocks start..end-1 for positions (rows[i], slots[i]) computed from
        h [N, d], the hidden state at which those positions exited, reading only the skipped blocks' k|v weights
        (2·d² of each block's 12·d²): one batched matmul, or one Triton launch."""
        w = self.w
        ops.propagate_kv(h, w.ln_1_w, w.ln_1_b, w.attn_w, w.attn_b, cache.k, cache.v, rows, slots, start, end,
                         self.config.layer_norm_epsilon, backend)


def attention_mask(valid: torch.Tensor, slot: int, s: int) -> torch.Tensor:
    """[b, s, slot+s] bool: query i (at slot+i) sees valid keys at or before its slot, and always itself
    (a left-padding query then has one key and stays finite; nothing real attends to it)."""
    t = slot + s
    key_pos = torch.arange(t, device=valid.device)
    query_pos = torch.arange(slot, t, device=valid.device)[:, None]
    causal = key_pos[None, :] <= query_pos
    return (valid[:, None, :] & causal) | (key_pos[None, :] == query_pos)
