"""Shared fixtures: tiny random multi-exit GPT-2 checkpoints written in the real on-disk format
(`tiny_checkpoints.py`).

TRITON_INTERPRET=1 is set here, before anything imports triton, so kernels run on CPU tensors when no GPU is
present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tiny_checkpoints import make_hf_checkpoint, write_predictors  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(folder, transformers model, exit heads) of a 4-layer multi-exit checkpoint with exits 1..4."""
    folder = tmp_path_factory.mktemp("tiny")
    model, heads = make_hf_checkpoint(folder)
    write_predictors(folder, model.config.n_embd, (1, 2, 3))
    return folder, model, heads
