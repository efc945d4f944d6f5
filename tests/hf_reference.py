"""Independent references built on transformers' GPT-2 (no mexit code): per-layer hidden states, exit logits,
ACD in float64 NumPy, and a step-by-step greedy generator that recomputes the whole sequence every step."""

import numpy as np
import torch
import torch.nn.functional as F


def hf_block_outputs(hf_model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{L: output of block L (1-based, before ln_f)} for ids [B, T], read with forward hooks."""
    outputs, hooks = {}, []
    for i, block in enumerate(hf_model.transformer.h):
        def hook(_module, _inputs, out, layer=i + 1):
            outputs[layer] = out[0] if isinstance(out, tuple) else out
        hooks.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf_model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    outputs["original"] = logits
    return outputs


def hf_head_logits(hf_model, heads, outputs, head) -> torch.Tensor:
    """logits of `head` ("original" or an exit layer): lm_head_L(ln_f(h_L))."""
    if head == "original":
        return outputs["original"]
    ln_f = hf_model.transformer.ln_f
    with torch.no_grad():
        return F.linear(ln_f(outputs[head]), heads[head])


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def acd_numpy(z_upper: np.ndarray, z_lower: np.ndarray, alpha=0.1, k=1) -> np.ndarray:
    """One row of the ACD formula (Gera et al. 2023) in float64, written element by element."""
    p_u, p_l = np.exp(log_softmax64(z_upper)), np.exp(log_softmax64(z_lower))
    thr = min(alpha * p_u.max(), np.sort(p_u)[::-1][k - 1])
    in_s = p_u >= thr
    diff = np.log(p_u[in_s]) - np.log(p_l[in_s])
    soft = np.exp(diff - diff.max())
    q = p_u.copy()
    q[in_s] = soft / soft.sum() * p_u[in_s].sum()
    return np.log(q)


def hf_greedy(hf_model, heads, prompt: list[int], n_new: int, mode: str, exit_layer=None, contrast=None,
              alpha=0.1, k=1) -> list[int]:
    """Greedy generation recomputing the full sequence with transformers every step."""
    seq = list(prompt)
    for _ in range(n_new):
        outputs = hf_block_outputs(hf_model, torch.tensor([seq]))
        if mode == "original":
            scores = outputs["original"][0, -1].double().numpy()
        elif mode == "exit":
            scores = hf_head_logits(hf_model, heads, outputs, exit_layer)[0, -1].double().numpy()
        else:
            upper, lower = contrast
            z_u = hf_head_logits(hf_model, heads, outputs, upper)[0, -1].double().numpy()
            z_l = hf_head_logits(hf_model, heads, outputs, lower)[0, -1].double().numpy()
            scores = acd_numpy(z_u, z_l, alpha, k)
        seq.append(int(np.argmax(scores)))
    return seq[len(prompt):]


def naive_exit_states(hf_model, tokens: list[int], exit_layers: list[int], depth: int):
    """Recompute every position from scratch, in order, with transformers' GPT-2 modules and a plain attention
    loop: position p runs blocks 0..exit_layers[p]-1; at each skipped block j its key/value come from
    ln_1_j(h_exit). Returns K, V [depth, T, H, hd] and the hidden state of each position at every layer it ran
    ({(p, layer): h})."""
    blocks = hf_model.transformer.h
    n_head = hf_model.config.n_head
    d = hf_model.config.n_embd
    hd = d // n_head
    T = len(tokens)
    K = torch.zeros(depth, T, n_head, hd)
    V = torch.zeros(depth, T, n_head, hd)
    states = {}
    with torch.no_grad():
        for p, tok in enumerate(tokens):
            h = hf_model.transformer.wte.weight[tok] + hf_model.transformer.wpe.weight[p]
            states[(p, 0)] = h
            for j in range(depth):
                blk = blocks[j]
                if j >= exit_layers[p]:
                    _, k, v = blk.attn.c_attn(blk.ln_1(h)).split(d)
                    K[j, p], V[j, p] = k.view(n_head, hd), v.view(n_head, hd)
                    continue
                q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(d)
                K[j, p], V[j, p] = k.view(n_head, hd), v.view(n_head, hd)
                scores = torch.einsum("hd,thd->ht", q.view(n_head, hd), K[j, : p + 1]) / hd**0.5
                y = torch.einsum("ht,thd->hd", scores.softmax(-1), V[j, : p + 1]).reshape(d)
                h = h + blk.attn.c_proj(y)
                h = h + blk.mlp(blk.ln_2(h))
                states[(p, j + 1)] = h
    return K, V, states
