"""The decode-attention kernel against its PyTorch reference in float64 (interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_utils import DEVICE, poisoned_allocations, rel_err

from mexit.kernels.decode_attention import choose_splits, decode_attention
from mexit.kernels.decode_attention_ref import decode_attention_ref
from mexit.ops.launches import count_launches


def make_inputs(B, H, T, hd, slot, dtype, seed=0):
    """Random qkv and cache; rows are left-padded by 0, 1, 2, ... positions (never past the slot); the slot itself
    is not yet marked valid (the kernel marks it)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 3 * H * hd, generator=g) * 1.5
    k, v = torch.randn(2, B, H, T, hd, generator=g)
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[:, :slot] = True
    for b in range(B):
        valid[b, : min(b, slot)] = False
    cast = dict(device=DEVICE, dtype=dtype)
    return qkv.to(**cast), k.to(**cast), v.to(**cast), valid.to(DEVICE), torch.tensor([slot], device=DEVICE)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,hd,slot", [(1, 4, 128, 16, 0), (3, 2, 128, 8, 37), (7, 4, 256, 16, 200),
                                            (64, 2, 128, 8, 127), (1, 16, 256, 64, 159),
                                            (3, 6, 128, 16, 90)])  # d = 96
def test_matches_float64_reference(B, H, T, hd, slot, dtype, monkeypatch):
    qkv, k, v, valid, slot_t = make_inputs(B, H, T, hd, slot, dtype, seed=B + slot)
    k_ref, v_ref = k.double(), v.double()
    valid_ref = valid.clone()
    want = decode_attention_ref(qkv.double(), k_ref, v_ref, valid_ref, slot_t)
    with count_launches() as launched, poisoned_allocations(monkeypatch):
        y = decode_attention(qkv, k, v, valid, slot_t)
    assert launched["triton:_decode_attention"] == 1
    assert valid[:, slot].all() and torch.equal(valid, valid_ref)  # the slot marked, nothing else
    assert y.dtype == dtype and y.shape == (B, H * hd) and not torch.isnan(y).any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(y, want) < tol, rel_err(y, want)
    assert torch.equal(k.double(), k_ref) and torch.equal(v.double(), v_ref)  # the new key/value, stored at slot


def test_reads_only_slots_up_to_the_current_one():
    """Cache entries after the slot (and invalid ones before it) may hold anything: NaN there changes nothing."""
    qkv, k, v, valid, slot = make_inputs(3, 2, 128, 8, 40, torch.float32)
    want = decode_attention_ref(qkv, k.clone(), v.clone(), valid, slot)
    k[:, :, 41:] = float("nan")
    v[:, :, 41:] = float("nan")
    k[2, :, :2] = float("nan")  # row 2's left padding: keys and values are loaded unmasked by the flags
    v[2, :, :2] = float("inf")
    torch.testing.assert_close(decode_attention(qkv, k, v, valid, slot), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decode_attention(qkv, k, v, valid, slot, block_t=16), want, rtol=1e-5, atol=1e-6)


def test_skip_flag_stores_keys_and_values_only(monkeypatch):
    qkv, k, v, valid, slot = make_inputs(3, 2, 128, 8, 9, torch.float32)
    k_ref, v_ref = k.clone(), v.clone()
    decode_attention_ref(qkv, k_ref, v_ref, valid, slot)
    with poisoned_allocations(monkeypatch):
        y = decode_attention(qkv, k, v, valid, slot, skip=torch.ones(1, dtype=torch.int32, device=DEVICE))
    assert torch.isnan(y).all()
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("slot", [0, 70, 300, 511])
def test_split_cache_matches_float64_reference(slot, splits, dtype, monkeypatch):
    """Flash-decoding: the splits' partial softmaxes (empty ones included) merge to the reference."""
    qkv, k, v, valid, slot_t = make_inputs(3, 2, 512, 16, slot, dtype, seed=slot + splits)
    k_ref, v_ref = k.double(), v.double()
    want = decode_attention_ref(qkv.double(), k_ref, v_ref, valid, slot_t)
    with poisoned_allocations(monkeypatch):
        y = decode_attention(qkv, k, v, valid, slot_t, splits=splits)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert not torch.isnan(y).any() and rel_err(y, want) < tol, rel_err(y, want)
    assert torch.equal(k.double(), k_ref) and torch.equal(v.double(), v_ref)


def test_split_cache_skip_flag(monkeypatch):
    qkv, k, v, valid, slot = make_inputs(2, 2, 512, 8, 400, torch.float32)
    k_ref, v_ref = k.clone(), v.clone()
    decode_attention_ref(qkv, k_ref, v_ref, valid, slot)
    with poisoned_allocations(monkeypatch):
        y = decode_attention(qkv, k, v, valid, slot, skip=torch.ones(1, dtype=torch.int32, device=DEVICE), splits=4)
    assert torch.isnan(y).all() and torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_choose_splits():
    cpu = torch.device("cpu")  # counts 132 multiprocessors off a GPU
    assert choose_splits(1, 16, 256, cpu) == 1  # short cache: one launch
    assert choose_splits(1, 16, 1024, cpu) == 8  # batch 1, long cache: splits of 128 slots
    assert choose_splits(4, 16, 1024, cpu) == 5  # about two programs per multiprocessor
    assert choose_splits(64, 16, 1024, cpu) == 1  # rows x heads already fill the GPU


def test_rejects_bad_shapes():
    qkv, k, v, valid, slot = make_inputs(2, 2, 128, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        decode_attention(qkv[:, :-1], k, v, valid, slot)
    with pytest.raises(ValueError, match="power-of-two head size"):
        k6 = torch.zeros(2, 2, 128, 6)
        decode_attention(torch.zeros(2, 36), k6, k6.clone(), valid, slot)
