"""acd_contrast_ref (the runtime's torch path) against an element-by-element float64 reference of the formula."""

import numpy as np
import pytest
import torch
from hf_reference import acd_numpy

from mexit.kernels.acd_contrast_ref import acd_contrast_ref


@pytest.mark.parametrize("alpha,k", [(0.1, 1), (0.5, 1), (0.05, 3), (1.0, 5), (0.3, 40)])
def test_matches_formula(alpha, k):
    torch.manual_seed(k)
    z_u, z_l = torch.randn(5, 97) * 3, torch.randn(5, 97) * 3
    ours = acd_contrast_ref(z_u, z_l, alpha, k)
    for b in range(5):
        ref = acd_numpy(z_u[b].numpy(), z_l[b].numpy(), alpha, k)
        np.testing.assert_allclose(ours[b].double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_outside_plausible_set_keeps_upper_probability():
    z_u = torch.tensor([[4.0, 3.9, 0.0, -5.0]])
    z_l = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    log_q = acd_contrast_ref(z_u, z_l, alpha=0.5)
    lp_u = torch.log_softmax(z_u, -1)
    torch.testing.assert_close(log_q[0, 2:], lp_u[0, 2:])  # not -inf: kept at p_u
    assert log_q.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert log_q.argmax().item() == 1  # the contrast flips the choice inside S
