"""Learned exit predictors: per checked exit L, a logistic probe on the hidden state that estimates whether exit L's
top-1 token equals full depth's (CALM's consistency oracle, Schuster et al. 2022; a linear probe as CALM's learned
classifier).

    confidence_L(h) = sigmoid(w_L . standardize(h) + b_L),  standardize(h) = (h - mean(h)) / sqrt(var(h) + eps)

over the d features of h (layernorm without an affine: ln_f's affine would fold into w_L;
`mexit.kernels.exit_decide_ref.probe_confidence`, which the exit decision evaluates). A check reads d + 1 fp32
weights instead of a [V, d] head. They live beside the weights as `exit_predictors.safetensors`: `weight` [E, d]
fp32, `bias` [E] fp32, `layers` [E] int64, and metadata (the final head the labels compared with, how they were
trained); `mexit train-exit-predictors` writes them and `load` reads them with the checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import PREDICTOR_FILE, read_side_file, replace_file


@dataclass
class ExitPredictors:
    """weight [E, d] fp32, bias [E] fp32 of exits `layers` (ascending); final_head: the head whose tokens the
    labels compared with ("original" or an exit layer); info: how they were trained (JSON-able)."""

    layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    final_head: int | str = "original"
    info: dict = field(default_factory=dict)

    def row(self, layer: int) -> int:
        return self.layers.index(layer)

    def probe(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(weight [d] fp32, bias [1] fp32, eps) of exit `layer`'s predictor, as the exit decision takes it."""
        i = self.row(layer)
        return self.weight[i], self.bias[i:i + 1], self.eps

    def to(self, device) -> ExitPredictors:
        return ExitPredictors(self.layers, self.weight.to(device), self.bias.to(device), self.eps, self.final_head,
                              self.info)


def save_predictors(folder: Path, predictors: ExitPredictors) -> Path:
    """Write `exit_predictors.safetensors` into `folder` (under a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(folder) / PREDICTOR_FILE
    tensors = {"weight": predictors.weight.detach().float().cpu().contiguous(),
               "bias": predictors.bias.detach().float().cpu().contiguous(),
               "layers": torch.tensor(predictors.layers, dtype=torch.long)}
    metadata = {"format": "pt", "eps": repr(predictors.eps), "final_head": str(predictors.final_head),
                "info": json.dumps(predictors.info)}
    replace_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_predictors(folder: Path, n_embd: int, exit_layers, device) -> ExitPredictors | None:
    """The folder's predictors on `device`, checked against the checkpoint (width, exits); None without the file."""
    path = Path(folder) / PREDICTOR_FILE
    if not path.is_file():
        return None
    tensors, meta = read_side_file(path, "write it again with `mexit train-exit-predictors --overwrite`")
    missing = {"weight", "bias", "layers"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")
    weight, bias, layers = tensors["weight"].float(), tensors["bias"].float(), tuple(tensors["layers"].tolist())
    if weight.shape != (len(layers), n_embd) or bias.shape != (len(layers),):
        raise ValueError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit {len(layers)} "
                         f"exits of width {n_embd}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{path}: exits {list(layers)} must be distinct and ascending")
    unknown = sorted(set(layers) - set(exit_layers))
    if unknown:
        raise ValueError(f"{path}: predictors for exits {unknown}, which this checkpoint does not have "
                         f"({list(exit_layers)})")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError(f"{path}: NaN or inf in the predictor weights")
    final = meta.get("final_head", "original")
    return ExitPredictors(layers, weight.to(device), bias.to(device), float(meta.get("eps", "1e-5")),
                          final if final == "original" else int(final), json.loads(meta.get("info", "{}")))
