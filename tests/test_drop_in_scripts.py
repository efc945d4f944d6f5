"""The drop-in under real scripts' calls, against transformers' own generate on the same checkpoint:
autocontrastive-gen's inference pattern (output_hidden_states, return_dict_in_generate, a StoppingCriteriaList with a
max-length and a custom criterion, stop_strings, a LogitsProcessorList of transformers' processors)."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MaxLengthCriteria,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TopKLogitsWarper,
)

from mexit.frontends.compat import FastMultiExitModel

IDS = torch.tensor([[0, 0, 5, 17, 200], [42, 7, 128, 255, 1], [0, 9, 9, 31, 64]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])


class EndsWithToken(StoppingCriteria):
    """A caller's criterion: a row ends once its last token is `token` (reads input_ids only)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return FastMultiExitModel.from_pretrained(tiny_checkpoint[0]), tiny_checkpoint[1]


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_autocontrastive_gen_inference_pattern_matches_transformers(pair, engine):
    fast, hf = pair
    fast.lm.engine = engine
    free = hf.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=12, do_sample=False, pad_token_id=3)
    token = int(free[1, IDS.shape[1] + 3])  # row 1's fourth new token ends row 1 (and any row that makes it)
    outputs = []
    for model in (fast, hf):
        criteria = StoppingCriteriaList([MaxLengthCriteria(IDS.shape[1] + 10), EndsWithToken(token)])
        outputs.append(model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=12, do_sample=False,
                                      pad_token_id=3, output_hidden_states=True, return_dict_in_generate=True,
                                      stopping_criteria=criteria))
    ours, theirs = outputs
    assert torch.equal(ours.sequences, theirs.sequences)
    assert ours.sequences.shape[1] <= IDS.shape[1] + 10 and (ours.sequences[1, IDS.shape[1] + 4:] == 3).all()
    assert len(ours.hidden_states) == len(theirs.hidden_states) == ours.sequences.shape[1] - IDS.shape[1]
    for step, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert len(a) == len(b) == hf.config.n_layer + 1
        for layer, (x, y) in enumerate(zip(a, b)):
            real = MASK.bool() if step == 0 else torch.ones(len(IDS), 1, dtype=torch.bool)
            assert x.shape == y.shape, (step, layer)
            torch.testing.assert_close(x[real], y[real], atol=1e-4, rtol=1e-4)  # padding positions: no meaning


def test_output_hidden_states_without_a_dict_is_inert_as_in_transformers(pair):
    fast, hf = pair
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False, pad_token_id=3)
    ours = fast.generate(**kw, output_hidden_states=True)
    assert torch.equal(ours, hf.generate(**kw, output_hidden_states=True)) and torch.equal(ours, fast.generate(**kw))
    states = fast(IDS[1:2], output_hidden_states=True).hidden_states
    theirs = hf(IDS[1:2], output_hidden_states=True).hidden_states
    assert len(states) == len(theirs)
    for x, y in zip(states, theirs):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_stop_strings_match_transformers(pair):
    fast, hf = pair
    tokenizer = fast.lm.tokenizer
    ids = torch.tensor([tokenizer.encode("Hello there"), tokenizer.encode("The cat sat")])
    free = hf.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    new = [tokenizer.decode(t) for t in free[0, ids.shape[1]:]]
    at = next(i for i, piece in enumerate(new) if i and piece.isalnum())  # a printable token of row 0's output
    text = new[at - 1] + new[at] if new[at - 1].isprintable() else new[at]
    kw = dict(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0, stop_strings=[text],
              tokenizer=tokenizer)
    ours = fast.generate(**kw)
    assert torch.equal(ours, hf.generate(**kw))
    assert (ours[0, ids.shape[1] + at + 1:] == 0).all() and not torch.equal(ours[0], free[0])  # row 0 ended there
    assert torch.equal(fast.generate(**{**kw, "tokenizer": None}), ours)  # the checkpoint's own tokenizer


def test_logits_processors_match_transformers(pair):
    fast, hf = pair
    ids = torch.tensor([[42, 7, 128, 255, 1], [9, 9, 31, 64, 2]])  # no padding: transformers counts padding ids
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(2)])
    kw = dict(input_ids=ids, max_new_tokens=14, do_sample=False, pad_token_id=0, logits_processor=processors)
    ours = fast.generate(**kw)
    assert torch.equal(ours, hf.generate(**kw))
    assert not torch.equal(ours, fast.generate(input_ids=ids, max_new_tokens=14, do_sample=False, pad_token_id=0))
    with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor given while repetition_penalty"):
        fast.generate(**kw, repetition_penalty=1.2)
    with pytest.raises(NotImplementedError, match="filter_value"):
        fast.generate(input_ids=ids, max_new_tokens=2, logits_processor=[TopKLogitsWarper(5, filter_value=-9.0)])


def test_trust_remote_code_and_dtype_follow_transformers(tiny_checkpoint):
    with pytest.warns(UserWarning, match="trust_remote_code=True has no effect"):
        model = FastMultiExitModel.from_pretrained(tiny_checkpoint[0], trust_remote_code=True)
    assert model.dtype == torch.float32  # "auto": the stored dtype, as transformers 5 loads
    assert FastMultiExitModel.from_pretrained(tiny_checkpoint[0], dtype="fp16").dtype == torch.float16
