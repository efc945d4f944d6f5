"""Drop-in front ends against transformers itself: same output tensors, padding, streamer calls, logits."""

import io
from contextlib import redirect_stdout

import pytest
import torch
from hf_reference import hf_block_outputs, hf_head_logits
from transformers import GenerationConfig, MinLengthLogitsProcessor, TextStreamer

import mexit
from mexit.frontends.compat import AutoMultiExitModel, FastMultiExitModel
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


def test_a_mode_string_configures_the_drop_in(tiny_checkpoint):
    """from_pretrained(mode=...) takes a fixed mode's string of the registry's mini-language (the same settings as
    its keywords); a mode that is not fixed is refused by name."""
    folder = tiny_checkpoint[0]
    by_string = FastMultiExitModel.from_pretrained(folder, mode="acd:4,1", alpha=0.3)
    assert by_string.decode == FastMultiExitModel.from_pretrained(folder, contrast=(4, 1), alpha=0.3).decode
    assert FastMultiExitModel.from_pretrained(folder, mode="exit:2").decode.exit_layer == 2
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(by_string.generate(**kw),
                       FastMultiExitModel.from_pretrained(folder, contrast=(4, 1), alpha=0.3).generate(**kw))
    with pytest.raises(ValueError, match="the drop-in's configured mode is a fixed one"):
        FastMultiExitModel.from_pretrained(folder, mode="ee:max-prob:0.5")
    with pytest.raises(ValueError, match="mode 'exit:7': exit layer 7 is not in this checkpoint"):
        FastMultiExitModel.from_pretrained(folder, mode="exit:7")


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


def transformers_script(from_pretrained, folder):
    """A plain transformers script; only the loading line differs between the two runs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    model = from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    model = model.to("cpu")
    assert model.device.type == "cpu" and model.dtype == torch.float32 and model.config.n_layer == 4
    assert model.generation_config is not None and sum(p.numel() for p in model.parameters()) > 0
    batch = tokenizer(["Hello there", "A"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, output_logits=True, pad_token_id=0, eos_token_id=None)
    text = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    ids = batch["input_ids"][:1]
    loss = model(ids, labels=ids).loss
    first, logits = model(ids, labels=ids)[:2]  # a transformers ModelOutput: indexing skips unset fields
    as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(ids)[0]) and torch.equal(first, loss)
    assert torch.equal(logits, model(ids).logits) and model(ids).to_tuple()[0].shape[:2] == ids.shape
    return out, text, loss


def test_plain_transformers_script_with_one_line_changed(tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    folder = tiny_checkpoint[0]
    ours, theirs = (transformers_script(load, folder)
                    for load in (FastMultiExitModel.from_pretrained, GPT2LMHeadModel.from_pretrained))
    (out, text, loss), (hf_out, hf_text, hf_loss) = ours, theirs
    assert torch.equal(out.sequences, hf_out.sequences) and text == hf_text
    assert len(out.scores) == len(hf_out.scores) == 5 and len(out.logits) == 5
    for mine, want in zip(out.scores, hf_out.scores):
        torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-4)
    for mine, want in zip(out.logits, hf_out.logits):
        torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_drop_in_refuses_what_it_does_not_do(fast):
    with pytest.raises(ValueError, match="input_ids must be a 2-D tensor"):
        fast.generate(input_ids=IDS[0], max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="logits_processor MinLengthLogitsProcessor"):
        fast.generate(input_ids=IDS, max_new_tokens=2, logits_processor=[MinLengthLogitsProcessor(3, 0)])
    with pytest.raises(NotImplementedError, match="train"):
        fast.train()
    for name in ("position_ids", "token_type_ids"):  # a tensor keyword: refused by name (an `in` test would raise)
        with pytest.raises(NotImplementedError, match=rf"forward arguments not supported by mexit: \['{name}'\]"):
            fast(IDS, **{name: torch.zeros_like(IDS)})
    assert fast(IDS, use_cache=False, output_attentions=None).logits.shape[:2] == IDS.shape  # off values pass
    with pytest.raises(ValueError, match="input_ids holds a row of 65 tokens: the model.s context is 64"):
        fast(torch.zeros(1, 65, dtype=torch.long))
    mask = torch.ones(2, 66, dtype=torch.long)
    mask[0, :4], mask[1, :2] = 0, 0  # left padding: the rows hold 62 and 64 tokens, which fit
    assert fast(torch.ones(2, 66, dtype=torch.long), attention_mask=mask).logits.shape[:2] == (2, 66)
    with pytest.raises(NotImplementedError, match="resize_token_embeddings"):
        fast.resize_token_embeddings(10)
    assert not hasattr(fast, "gradient_checkpointing_enable")
    with pytest.raises(NotImplementedError, match="several devices"):
        FastMultiExitModel.from_pretrained("unused", device_map={"a": 0, "b": 1})


def test_to_moves_and_converts(tiny_checkpoint):
    model = FastMultiExitModel.from_pretrained(tiny_checkpoint[0], device_map="auto", torch_dtype="auto")
    assert model.device.type == "cpu" and model.dtype == torch.float32
    before = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, pad_token_id=0)
    assert model.half().dtype == torch.float16 and model.float().dtype == torch.float32
    assert torch.equal(model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, pad_token_id=0), before)


def test_sampled_row_is_the_same_alone_and_in_a_batch(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    prompts = [[5, 17, 200], [42, 7], [9]]
    kw = dict(do_sample=True, seed=11, eos_token_id=None, top_k=50)
    batch = lm.generate(prompts, 8, **kw).tokens
    assert [lm.generate([p], 8, **kw).tokens[0] for p in prompts] == batch
    per_row = lm.generate(prompts, 8, do_sample=True, seed=[1, 2, 3], eos_token_id=None).tokens
    assert per_row[1] == lm.generate([prompts[1]], 8, do_sample=True, seed=2, eos_token_id=None).tokens[0]
    static = mexit.load(tiny_checkpoint[0], engine="static").generate(prompts, 8, **kw).tokens
    assert static == batch
