"""Shared fixtures: tiny random multi-exit GPT-2 checkpoints written in the real on-disk format
(`tiny_checkpoints.py`).

TRITON_INTERPRET=1 is set here, before anything imports triton, so kernels run on CPU tensors when no GPU is
present. Under pytest-xdist (the README's `-n 2`) each worker and the commands it starts run one thread: two
workers of two threads each on two cores spend more time waiting for each other's threads than computing, and
Triton's interpreter is patched to re-patch `triton.language` once per launch, its builtins listed once
(`kernel_utils`)."""

import os

ONE_THREAD = bool(os.environ.get("PYTEST_XDIST_WORKER")) and "OMP_NUM_THREADS" not in os.environ  # a user's stays
if ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if ONE_THREAD:
    torch.set_num_threads(1)

import pytest  # noqa: E402
from kernel_utils import patch_interpreter_once_per_launch  # noqa: E402
from tiny_checkpoints import make_hf_checkpoint, write_predictors  # noqa: E402

patch_interpreter_once_per_launch()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(folder, transformers model, exit heads) of a 4-layer multi-exit checkpoint with exits 1..4."""
    folder = tmp_path_factory.mktemp("tiny")
    model, heads = make_hf_checkpoint(folder)
    write_predictors(folder, model.config.n_embd, (1, 2, 3))
    return folder, model, heads


@pytest.fixture()
def diverging_updates(monkeypatch):
    """Every training step's update leaves inf in the first trained weight (a run that diverges): patched where
    both trainers' schedules step, right after the optimizer's."""
    real = torch.optim.lr_scheduler.LambdaLR.step

    def step(self, *args, **kwargs):
        if self.last_epoch >= 0:  # not the schedule's own first call, at its construction
            with torch.no_grad():
                self.optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
