"""The ACD contrast kernel against acd_contrast_ref in float64, and the ACD formula."""

import pytest
import torch
from hf_reference import acd_numpy
from kernel_utils import DEVICE, poisoned_allocations

from mexit.kernels.acd_contrast import acd_contrast
from mexit.kernels.acd_contrast_ref import acd_contrast_ref
from mexit.ops.launches import count_launches


def logits_pair(B, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(2, B, V, generator=g) * scale).to(DEVICE)
    return z, torch.logsumexp(z, dim=-1)


@pytest.mark.parametrize("B,V,alpha,k,block_v", [
    (1, 50257, 0.1, 1, 1024), (3, 257, 0.1, 1, 64), (7, 1000, 0.3, 4, 128), (64, 301, 0.05, 2, 128),
    (2, 97, 1.0, 1, 32), (5, 500, 0.001, 1, 256),
])
def test_matches_reference(B, V, alpha, k, block_v, monkeypatch):
    z, lse = logits_pair(B, V, seed=B + V)
    with count_launches() as launched, poisoned_allocations(monkeypatch):
        token, log_q = acd_contrast(z, lse, alpha, k, with_logprobs=True, block_v=block_v)
    assert launched["triton:_acd_merge"] == 1
    ref = acd_contrast_ref(z[0].double(), z[1].double(), alpha, k)
    assert not torch.isnan(log_q).any()
    torch.testing.assert_close(log_q.double(), ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(token.cpu(), ref.argmax(-1).cpu())
    token_only, none = acd_contrast(z, lse, alpha, k, with_logprobs=False, block_v=block_v)
    assert none is None and torch.equal(token_only, token)
    # the threshold from the exit stage's max logit (one candidate; ignored for more) gives the same bits
    from_max, log_q_max = acd_contrast(z, lse, alpha, k, with_logprobs=True, block_v=block_v,
                                       max_logit=z.max(-1).values)
    assert torch.equal(from_max, token) and torch.equal(log_q_max, log_q)


def test_formula_on_one_row():
    z, lse = logits_pair(1, 211, seed=5)
    _, log_q = acd_contrast(z, lse, 0.2, 3, with_logprobs=True, block_v=64)
    ref = acd_numpy(z[0, 0].cpu().numpy(), z[1, 0].cpu().numpy(), 0.2, 3)
    torch.testing.assert_close(log_q[0].double().cpu(), torch.from_numpy(ref), atol=2e-5, rtol=2e-5)


def test_tie_inside_plausible_set_takes_first_index():
    V = 300
    z = torch.full((2, 1, V), -4.0)
    z[0, 0, [10, 250]] = 2.0  # equal upper logits in different tiles
    z[1, 0, [10, 250]] = 0.0  # equal lower logits: equal contrast
    z = z.to(DEVICE)
    token, _ = acd_contrast(z, torch.logsumexp(z, -1), 0.1, 1, block_v=64)
    assert token.item() == 10


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"fp32 logits \[2, B, V\]"):
        acd_contrast(torch.zeros(3, 1, 10), torch.zeros(3, 1))


def test_kth_candidate_on_the_threshold_stays_plausible():
    """With k = 3 the threshold is the 3rd candidate's own probability; that token must stay in S (here it wins
    the contrast because the lower exit gives it almost nothing)."""
    V = 200
    upper = torch.linspace(-6, -5, V)
    upper[[40, 120, 170]] = torch.tensor([5.0, 4.3, 1.1])
    lower = torch.zeros(V)
    lower[170] = -20.0
    z = torch.stack([upper, lower])[:, None].to(DEVICE)
    lse = torch.logsumexp(z, -1)
    ref = acd_contrast_ref(z[0], z[1], alpha=0.5, min_candidates=3)
    assert ref.argmax().item() == 170
    token, log_q = acd_contrast(z, lse, 0.5, 3, with_logprobs=True, block_v=64)
    assert token.item() == 170
    torch.testing.assert_close(log_q, ref, atol=1e-5, rtol=1e-5)
