"""GPT-2 variants whose config fields change the math: untied lm_head, n_inner, scale_attn_by_inverse_layer_idx,
scale_attn_weights, reorder_and_upcast_attn. Each generates exactly what transformers generates (greedy), on both
backends and engines; a field mexit does not implement is refused by name."""

import json

import pytest
import torch
from hf_reference import hf_block_outputs, hf_greedy, hf_head_logits
from tiny_checkpoints import make_hf_checkpoint

import mexit
from mexit.frontends.compat import FastMultiExitModel

VARIANTS = {
    "untied": dict(tie_word_embeddings=False),
    "n_inner": dict(n_inner=48),
    "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "unscaled": dict(scale_attn_weights=False),
    "upcast": dict(reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True),
}
PROMPT = [5, 17, 200, 3]
TRITON_VARIANTS = {"untied", "n_inner", "upcast"}  # the head weight, the MLP width, a per-layer attention scale


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf, heads = make_hf_checkpoint(folder, **VARIANTS[request.param])
    return request.param, folder, hf, heads


def test_config_fields_reach_the_model(variant):
    name, folder, hf, _ = variant
    config = mexit.load(folder).config
    for field, value in VARIANTS[name].items():
        assert getattr(config, field) == value
    if name == "untied":
        assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # the test means something


@pytest.mark.parametrize("backend,engine", [("torch", "eager"), ("torch", "static"), ("triton", "static")])
def test_greedy_equals_transformers(variant, backend, engine):
    name, folder, hf, heads = variant
    if backend == "triton" and name not in TRITON_VARIANTS:
        pytest.skip("on the triton path this variant only changes the attention scale's value (an argument of the "
                    "decode-attention kernel), which 'upcast' already varies per layer")
    lm = mexit.load(folder, backend=backend, engine=engine)
    ids = torch.tensor([PROMPT])
    want = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert lm.generate([PROMPT], 8, eos_token_id=None).tokens[0] == want
    assert lm.generate([PROMPT], 6, exit_layer=2, eos_token_id=None).tokens[0] == hf_greedy(
        hf, heads, PROMPT, 6, "exit", exit_layer=2)
    assert lm.generate([PROMPT], 6, contrast=("original", 2), eos_token_id=None).tokens[0] == hf_greedy(
        hf, heads, PROMPT, 6, "contrast", contrast=("original", 2))


def test_logits_equal_transformers(variant):
    _, folder, hf, heads = variant
    ids = torch.tensor([PROMPT + [9, 9, 31]])
    outputs = hf_block_outputs(hf, ids)
    torch.testing.assert_close(FastMultiExitModel.from_pretrained(folder)(ids).logits, outputs["original"],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(FastMultiExitModel.from_pretrained(folder, exit_layer=3)(ids).logits,
                               hf_head_logits(hf, heads, outputs, 3), atol=1e-4, rtol=1e-4)


def test_early_exit_final_head_is_the_untied_head(tmp_path):
    from mexit.decoding.early_exit import ExitPolicy

    hf, heads = make_hf_checkpoint(tmp_path, tie_word_embeddings=False)
    lm = mexit.load(tmp_path)
    never = ExitPolicy(threshold=1.0, exits=(2,))  # never fires: every token from the final head
    want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, 4:].tolist()
    out = lm.generate([PROMPT], 6, early_exit=never, eos_token_id=None)
    assert out.tokens[0] == want and set(out.exit_layers[0]) == {4}


def test_untied_checkpoint_without_its_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_checkpoint(tmp_path, tie_word_embeddings=False)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("lm_head.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensors: lm_head.weight"):
        mexit.load(tmp_path)


def test_unimplemented_field_is_refused_by_name(tmp_path):
    make_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["add_cross_attention"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        mexit.load(tmp_path)
