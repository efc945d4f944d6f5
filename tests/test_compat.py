"""Drop-in front ends against transformers itself: same output tensors, padding, streamer calls, logits."""

import io
from contextlib import redirect_stdout

import pytest
import torch
from reference import hf_block_outputs, hf_head_logits
from transformers import GenerationConfig, TextStreamer

import mexit
from mexit.compat import AutoMultiExitModel, FastMultiExitModel
from mexit.kernels.acd_contrast_ref import acd_contrast_ref

IDS = torch.tensor([[0, 0, 5, 17, 200], [42, 7, 128, 255, 1]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def fast(tiny_checkpoint):
    return FastMultiExitModel.from_pretrained(tiny_checkpoint[0])


def test_generate_matches_transformers(tiny_checkpoint, fast):
    hf = tiny_checkpoint[1]
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=9, do_sample=False, pad_token_id=3)
    free = hf.generate(**kw)
    assert torch.equal(fast.generate(**kw), free)
    eos = int(free[0, 7])  # row 0 stops early: transformers pads it with pad_token_id
    ours, theirs = fast.generate(**kw, eos_token_id=eos), hf.generate(**kw, eos_token_id=eos)
    assert torch.equal(ours, theirs)
    assert (ours[0, 8:] == 3).all()
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(IDS, MASK, generation_config=config),
                       hf.generate(input_ids=IDS, attention_mask=MASK, generation_config=config))
    out = fast.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 8)


def test_text_streamer_prints_what_transformers_prints(tiny_checkpoint, fast):
    hf = tiny_checkpoint[1]
    tokenizer = fast.lm.tokenizer
    ids = torch.tensor([tokenizer.encode("Hello there")])
    outputs = []
    for model in (fast, hf):
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           streamer=TextStreamer(tokenizer, skip_prompt=True))
        outputs.append(buffer.getvalue())
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_seeded_sampling_defaults_follow_generation_config(fast):
    torch.manual_seed(0)
    a = fast.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=True)
    torch.manual_seed(0)
    b = fast.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=True)
    assert torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="num_beams=4"):
        fast.generate(input_ids=IDS, num_beams=4, max_new_tokens=3)
    with pytest.raises(TypeError, match="unsupported arguments"):
        fast.generate(input_ids=IDS, max_new_tokens=3, frobnicate=True)


def test_auto_multi_exit_model(tiny_checkpoint):
    config = mexit.MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 2))
    model = AutoMultiExitModel.from_pretrained(tiny_checkpoint[0], multi_exit_config=config)
    out = model.generate(input_ids=IDS[1:], max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = mexit.load(tiny_checkpoint[0]).generate([IDS[1].tolist()], 6, contrast=("original", 2),
                                                        eos_token_id=None).tokens[0]
    assert out[0, 5:].tolist() == expected
    exit_model = AutoMultiExitModel.from_pretrained(
        tiny_checkpoint[0], multi_exit_config=mexit.MultiExitConfiguration(use_original_head=False,
                                                                           output_layer_index=3))
    assert exit_model.decode.mode == "exit" and exit_model.decode.exit_layer == 3
    with pytest.raises(ValueError, match="exit layer 7 is not in this checkpoint"):
        AutoMultiExitModel.from_pretrained(tiny_checkpoint[0], multi_exit_config=mexit.MultiExitConfiguration(
            use_original_head=False, output_layer_index=7))


def test_forward_logits(tiny_checkpoint):
    folder, hf, heads = tiny_checkpoint
    ids = IDS[1:]
    outputs = hf_block_outputs(hf, ids)
    original = FastMultiExitModel.from_pretrained(folder)(ids).logits
    torch.testing.assert_close(original, outputs["original"], atol=1e-4, rtol=1e-4)
    exit2 = FastMultiExitModel.from_pretrained(folder, exit_layer=2)(ids).logits
    torch.testing.assert_close(exit2, hf_head_logits(hf, heads, outputs, 2), atol=1e-4, rtol=1e-4)
    acd = FastMultiExitModel.from_pretrained(folder, contrast=(4, 1))(ids).logits
    expected = acd_contrast_ref(hf_head_logits(hf, heads, outputs, 4)[0], hf_head_logits(hf, heads, outputs, 1)[0])
    torch.testing.assert_close(acd[0], expected, atol=1e-4, rtol=1e-4)
