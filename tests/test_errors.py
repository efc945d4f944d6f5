"""Every bad input gets a clear error naming the problem, and nothing on disk is changed."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mexit
from mexit.frontends.cli import main


def digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.fixture
def checkpoint(tmp_path):
    from tiny_checkpoints import make_hf_checkpoint

    make_hf_checkpoint(tmp_path)
    return tmp_path


def edit_state(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_problems_read_on_one_line(checkpoint, capsys):
    """A missing and an unexpected tensor at once: each problem named, separated, on the CLI's one line."""
    edit_state(checkpoint, lambda s: s.update({"name_to_lm_exit_head.lm_head_9.weight": s.pop(
        "name_to_lm_exit_head.lm_head_3.weight")}))
    assert main(["generate", "--model", str(checkpoint), "--input-ids", "1,2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing tensors: name_to_lm_exit_head.lm_head_3.weight; unexpected tensors" in err


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
    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    with pytest.raises(FileNotFoundError, match="pass its local folder"):
        mexit.load("IBM/gpt2-medium-multiexit")


@pytest.mark.parametrize("kw,message", [
    (dict(dtype="int8"), r"unsupported dtype 'int8'; use one of fp32, fp16, bf16, or auto \(the stored dtype\)"),
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
    ([[1] * 60], dict(max_new_tokens=5), r"^the prompt \(60 tokens\) plus max_new_tokens \(5\) exceeds the model's "
     "context of 64"),
    ([[1, 2], [1] * 65, [3]], dict(max_new_tokens=1), r"^the longest prompt \(row 1, 65 tokens\) plus "
     r"max_new_tokens \(1\) exceeds the model's context of 64"),
    ([[1, 2], []], {}, r"^empty prompt \(row 1\)"),
    ([], {}, "no prompts"),
    ([""], {}, "^empty prompt: "),
    ([[1, 300]], {}, r"^token ids \[300\] are outside the vocabulary"),
    ([[1, 2], [300, 1, 299]], {}, r"^token ids \[299, 300\] are outside the vocabulary 0..\d+ \(row 1\)$"),
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
    from tiny_checkpoints import make_hf_checkpoint

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


# --- damaged files and non-finite weights: one named error, nothing on disk changed ---

def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def huge_header(path):
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def flipped_header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"}}}}"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [cut_in_half, huge_header, flipped_header])
def test_damaged_safetensors_is_one_named_error(checkpoint, damage, capsys):
    from mexit.frontends.cli import main

    damage(checkpoint / "model.safetensors")
    before = digest(checkpoint)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        mexit.load(checkpoint)
    assert main(["generate", "--model", str(checkpoint), "--input-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "model.safetensors" in err
    assert "Traceback" not in err and digest(checkpoint) == before


class NotATensor:
    pass


def test_pickle_with_objects_is_refused_in_one_line(tmp_path, capsys):
    from tiny_checkpoints import make_hf_checkpoint

    from mexit.frontends.cli import main

    make_hf_checkpoint(tmp_path, fmt="bin")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, tmp_path / "pytorch_model.bin")
    before = digest(tmp_path)
    with pytest.raises(ValueError, match="refused to load .*pytorch_model.bin: it holds pickled objects.*NotATensor"):
        mexit.load(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--input-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights_only" not in err and "allowlist" not in err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("name,value", [("transformer.h.1.mlp.c_fc.weight", float("nan")),
                                        ("name_to_lm_exit_head.lm_head_2.weight", float("inf"))])
def test_non_finite_tensor_is_refused_by_name(checkpoint, name, value, capsys):
    from mexit.frontends.cli import main

    def poison(state):
        state[name].view(-1)[0 if value != value else slice(None)] = value

    edit_state(checkpoint, poison)
    before = digest(checkpoint)
    with pytest.raises(ValueError, match=rf"{name} holds non-finite values \(NaN or inf\)"):
        mexit.load(checkpoint)
    assert main(["generate", "--model", str(checkpoint), "--input-ids", "1,2"]) == 2
    assert name in capsys.readouterr().err
    assert mexit.load(checkpoint, check_weights=False).config.n_layer == 4  # the switch skips the check
    assert digest(checkpoint) == before


def test_overflow_in_half_precision_is_refused(checkpoint):
    edit_state(checkpoint, lambda s: s["transformer.h.0.mlp.c_proj.weight"].view(-1).__setitem__(3, 1e6))
    mexit.load(checkpoint)  # fine in fp32
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.c_proj.weight holds values up to 1e\+06, beyond "
                                         r"float16's range \(\+-6.55e\+04\)"):
        mexit.load(checkpoint, dtype="fp16")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_invalid_config_json(checkpoint, text):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        mexit.load(checkpoint)


@pytest.mark.parametrize("field,value", [("n_layer", "4"), ("n_head", 2.0), ("layer_norm_epsilon", "1e-5"),
                                         ("vocab_size", None), ("lm_head_layer_indices", "1,2,3,4")])
def test_a_wrongly_typed_config_field_is_one_line(checkpoint, capsys, field, value):
    """transformers' typed config fields raise their own error type: one line naming the file and the field."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(dict(cfg, **{field: value})))
    assert main(["generate", "--model", str(checkpoint), "--input-ids", "1,2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint / 'config.json'}: ") and field in err and err.count("\n") == 1


@pytest.mark.parametrize("pair,message", [((6, "original"), "lower entry must be an exit layer"),
                                          ((6,), "must be a pair"), ("original", "must be a pair")])
def test_bad_contrast_layer_indices(pair, message):
    with pytest.raises(ValueError, match=message):
        mexit.MultiExitConfiguration(use_original_head=False, contrast_layer_indices=pair).to_decode_config()


def test_contrast_decode_limits(checkpoint):
    lm = mexit.load(checkpoint)
    with pytest.raises(ValueError, match="min_candidates=300 exceeds the vocabulary"):
        lm.generate([[1, 2]], 2, contrast=(4, 2), min_candidates=300)
    with pytest.raises(ValueError, match="exit_layer and contrast choose different modes"):
        lm.generate([[1, 2]], 2, exit_layer=4, contrast=(4, 2))
    with pytest.raises(ValueError, match="not both"):
        lm.generate([[1, 2]], 2, exit_layer=4, output_layer_index=2)


def test_original_head_against_the_exit_head_of_the_same_layer(checkpoint):
    """contrast=("original", n_layer): the tied head against the separately trained exit head of the last layer,
    as autocontrastive-gen allows."""
    from mexit.kernels.acd_contrast_ref import acd_contrast_ref

    lm = mexit.load(checkpoint)
    prompt = [5, 17, 200]
    out = lm.generate([prompt], 1, contrast=("original", 4), eos_token_id=None)
    model = lm.model
    cache = model.new_cache(1, 3)
    cache.valid.fill_(True)
    h = model.run_layers(model.embed(torch.tensor([prompt]), torch.arange(3)[None]), 0, 4, cache, 0)[0, -1]
    want = acd_contrast_ref(model.head_logits(h, "original")[None], model.head_logits(h, 4)[None]).argmax(-1)
    assert out.tokens == [[int(want)]]
