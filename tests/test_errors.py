"""Every bad input gets a clear error naming the problem, and nothing on disk is changed."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mexit


def digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture
def checkpoint(tmp_path):
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path)
    return tmp_path


def edit_state(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"), "missing tensors: transformer.h.1.mlp.c_fc.weight"),
    (lambda s: s.pop("name_to_lm_exit_head.lm_head_3.weight"), "name_to_lm_exit_head.lm_head_3.weight"),
    (lambda s: s.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(32, 64)}),
     r"transformer.h.0.attn.c_attn.weight: \(32, 64\) \(expected \(32, 96\)\)"),
    (lambda s: s.update({"name_to_lm_exit_head.lm_head_9.weight": torch.zeros(257, 32)}),
     "unexpected tensors.*lm_head_9"),
])
def test_mismatched_checkpoint(checkpoint, edit, message):
    edit_state(checkpoint, edit)
    before = digest(checkpoint)
    with pytest.raises(ValueError, match=message):
        mexit.load(checkpoint)
    assert digest(checkpoint) == before


def test_missing_files(checkpoint, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mexit.load(str(tmp_path_factory.mktemp("x") / "nowhere"))
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        mexit.load(checkpoint)
    os.remove(checkpoint / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        mexit.load(checkpoint)


def test_config_exit_layers_out_of_range(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["lm_head_layer_indices"] = [2, 9]
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"exit layers \[9\] are outside 1..n_layer=4"):
        mexit.load(checkpoint)


def test_hub_id_offline(monkeypatch):
    import huggingface_hub

    def offline(*_a, **_kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="pass its local folder"):
        mexit.load("IBM/gpt2-medium-multiexit")


@pytest.mark.parametrize("kw,message", [
    (dict(dtype="int8"), "unsupported dtype 'int8'"),
    (dict(device="mps"), "unsupported device mps"),
])
def test_bad_dtype_device(checkpoint, kw, message):
    with pytest.raises(ValueError, match=message):
        mexit.load(checkpoint, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(checkpoint):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        mexit.load(checkpoint, device="cuda")


@pytest.mark.parametrize("prompts,kw,message", [
    ([[1, 2]], dict(exit_layer=7), r"exit layer 7 is not in this checkpoint; its exits are \[1, 2, 3, 4\]"),
    ([[1, 2]], dict(contrast=(9, 2)), "exit layer 9 is not in this checkpoint"),
    ([[1, 2]], dict(contrast=(2, 4)), "must be above the lower layer"),
    ([[1] * 60], dict(max_new_tokens=5), "exceeds the model's context of 64"),
    ([[1] * 65], dict(max_new_tokens=1), "exceeds the model's context of 64"),
    ([[1, 2], []], {}, "empty prompt"),
    ([], {}, "no prompts"),
    ([""], {}, "empty prompt"),
    ([[1, 300]], {}, r"token ids \[300\] are outside the vocabulary"),
    ([[1, 2]], dict(alpha=0.0, contrast=(4, 2)), r"alpha must be in \(0, 1\]"),
    ([[1, 2]], dict(alpha=1.5, contrast=(4, 2)), r"alpha must be in \(0, 1\]"),
    ([[1, 2]], dict(min_candidates=0, contrast=(4, 2)), "min_candidates must be an integer >= 1"),
    ([[1, 2]], dict(do_sample=True, temperature=0), "temperature must be > 0"),
    ([[1, 2]], dict(do_sample=True, top_p=0), r"top_p must be in \(0, 1\]"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], dict(mode="beam"), "unknown mode 'beam'"),
    ([[1, 2]], dict(mode="exit"), "mode 'exit' needs exit_layer"),
])
def test_bad_generate_arguments(checkpoint, prompts, kw, message):
    lm = mexit.load(checkpoint)
    with pytest.raises(ValueError, match=message):
        lm.generate(prompts, **{"max_new_tokens": 4, **kw})


def test_text_without_tokenizer(tmp_path):
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, with_tokenizer=False)
    lm = mexit.load(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer files: pass token ids"):
        lm.generate("hello")


def test_bad_backend(checkpoint):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        mexit.load(checkpoint, backend="cuda")


@pytest.mark.parametrize("edit,message", [
    ({"activation_function": "relu"}, "unsupported activation_function 'relu'"),
    ({"model_type": "gpt_neo"}, "unsupported model_type 'gpt_neo'"),
    ({"n_head": 5}, "n_embd=32 is not divisible by n_head=5"),
])
def test_unsupported_config(checkpoint, edit, message):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg.update(edit)
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        mexit.load(checkpoint)
