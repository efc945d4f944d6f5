"""The Python API's arguments as a new user passes them (a trial on the shipped models, 2026-12-07): every option is
applied, refused by name, or (unused sampling settings, an ignored compile) warned about, never ignored in silence;
a wrongly typed value is named as given."""

import shutil
import warnings

import pytest
import torch

import mexit
from mexit.decoding.early_exit import ExitPolicy
from mexit.decoding.speculative import SpeculativeConfig
from mexit.frontends.compat import FastMultiExitModel

PROMPT = [[41, 45, 37, 47]]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return mexit.load(tiny_checkpoint[0])


@pytest.mark.parametrize("kw,message", [
    (dict(alpha=0.5), "alpha and min_candidates set ACD's contrast: pass them with contrast="),
    (dict(exit_layer=2, min_candidates=3), "this call decodes no contrast"),
    (dict(early_exit=ExitPolicy(0.5), alpha=0.3), "this call decodes no contrast"),
    (dict(dola_layers="high", alpha=0.3), "this call decodes no contrast"),
    (dict(decode=mexit.DecodeConfig("contrast", upper=4, lower=2), alpha=0.3),
     "alpha and min_candidates: decode= carries its own; set them there"),
    (dict(contrast=4), r"contrast must be a pair \(upper, lower\) of layers .*got 4"),
    (dict(contrast=(4, 2, 1)), r"contrast must be a pair .*got \(4, 2, 1\)"),
    (dict(contrast=(4, "original")), r"contrast lower must be a layer number \(an int\), got .original."),
    (dict(exit_layer="2"), r"exit_layer must be a layer number \(an int\), got .2."),
    (dict(mode="foo"), r"unknown mode 'foo'; use original, exit:L, .*early-exit:MEASURE"),
    (dict(mode=SpeculativeConfig(2, 2)), "pass speculative=SpeculativeConfig"),
    (dict(stop_strings=[]), "stop_strings must be a non-empty string or a list of them, got"),
    (dict(stop=lambda tokens: True), r"a stop rule returns one bool per row \(1 here\), got True"),
    (dict(stop=lambda tokens: [True, False]), r"one bool per row \(1 here\), got \[True, False\]"),
    (dict(eos_token_id=257), "eos_token_id 257 is outside the vocabulary 0..256"),
    (dict(prompts={"input_ids": PROMPT}), "prompts is a mapping .*: pass its input_ids"),
    (dict(prompts=True), "prompts must be text, a list of texts or token ids, got True"),
])
def test_a_wrong_argument_is_refused_by_name(lm, kw, message):
    prompts = kw.pop("prompts", PROMPT)
    with pytest.raises(ValueError, match=message):
        lm.generate(prompts, 3, **kw)


def test_acd_parameters_still_reach_a_contrast(lm):
    kw = dict(max_new_tokens=4, eos_token_id=None)
    assert (lm.generate(PROMPT, contrast=(4, 2), alpha=1.0, **kw).tokens
            != lm.generate(PROMPT, contrast=(4, 2), **kw).tokens)  # alpha reaches the contrast
    for alpha, n in ((1.0, 1), (0.01, 3)):
        by_keyword = lm.generate(PROMPT, contrast=(4, 2), alpha=alpha, min_candidates=n, **kw).tokens
        assert lm.generate(PROMPT, mode="acd:4,2", alpha=alpha, min_candidates=n, **kw).tokens == by_keyword
        assert lm.generate(PROMPT, decode=mexit.DecodeConfig("contrast", upper=4, lower=2, alpha=alpha,
                                                             min_candidates=n), **kw).tokens == by_keyword


def test_an_exits_value_that_is_not_a_list_is_named():
    with pytest.raises(ValueError, match=r"exits is a list of exit layers \(or None: every exit\), got 4"):
        ExitPolicy(0.5, exits=4)


def test_a_stop_rule_answers_in_any_sequence_and_is_checked_beside_stop_strings(lm):
    import numpy as np

    for answer in (torch.tensor, np.array, iter, list):
        assert len(lm.generate(PROMPT, 3, stop=lambda t, a=answer: a([len(t[0]) >= 2])).tokens[0]) == 2
    with pytest.raises(ValueError, match=r"one bool per row \(1 here\), got \[False, True\]"):
        lm.generate(PROMPT, 3, stop=lambda t: [False, True], stop_strings="zz")


def test_unused_sampling_settings_and_an_ignored_compile_warn(lm, tiny_checkpoint):
    with pytest.warns(UserWarning, match=r"temperature, top_k, seed unused: greedy decoding \(pass do_sample=True"):
        greedy = lm.generate(PROMPT, 3, temperature=0.5, top_k=5, seed=3, eos_token_id=None)
    assert greedy.tokens == lm.generate(PROMPT, 3, eos_token_id=None).tokens and greedy.seed is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate(PROMPT, 3, do_sample=True, temperature=0.5, seed=3)  # used: no warning
    with pytest.warns(UserWarning, match="compile ignored: nothing is compiled on the eager engine"):
        assert not mexit.load(tiny_checkpoint[0], engine="eager", compile=True).compiles


def test_drop_in_takes_transformers_inputs_name_and_names_its_own_arguments(tiny_checkpoint):
    model = FastMultiExitModel.from_pretrained(tiny_checkpoint[0], dtype="fp32")
    ids = torch.tensor(PROMPT)
    assert torch.equal(model.generate(inputs=ids, max_new_tokens=3), model.generate(ids, max_new_tokens=3))
    with pytest.raises(ValueError, match="pass the prompt ids once"):
        model.generate(ids, inputs=ids, max_new_tokens=3)
    with pytest.raises(NotImplementedError, match="output_scores / output_logits with speculative="):
        model.generate(ids, max_new_tokens=3, speculative=SpeculativeConfig(2, 2), return_dict_in_generate=True,
                       output_scores=True)


def test_a_checkpoint_generation_field_named_as_not_applied_is_not_applied(tiny_checkpoint, tmp_path):
    """generation_config.json's num_beams=3 is named at load as not applied; the drop-in then decodes greedily
    (as the native API does), refuses num_beams=3 only where the caller asks for it, and save_pretrained keeps it."""
    import json

    folder = tmp_path / "beams"
    shutil.copytree(tiny_checkpoint[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"num_beams": 3, "max_new_tokens": 3}))
    with pytest.warns(UserWarning, match="num_beams=3, which mexit does not implement: those fields are not applied"):
        model = FastMultiExitModel.from_pretrained(folder, dtype="fp32")
    ids = torch.tensor(PROMPT)
    assert model.generate(ids).shape == (1, 7)
    with pytest.raises(NotImplementedError, match="num_beams=3"):
        model.generate(ids, num_beams=3)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text())["num_beams"] == 3
    model.generation_config.num_beams = 4  # the caller's own setting now: refused, not dropped
    with pytest.raises(NotImplementedError, match="num_beams=4"):
        model.generate(ids)


def test_a_checkpoint_eos_outside_its_vocabulary_stops_nothing_and_says_so(tmp_path):
    """A config's eos_token_id outside the vocabulary (transformers' GPT-2 default 50256 in a small vocabulary) is
    dropped with a warning, as transformers only warns; the same id passed by the caller is refused."""
    import json

    from tiny_checkpoints import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, vocab_size=100)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, eos_token_id=50256)))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)  # config.json's eos is the stop id
    lm = mexit.load(tmp_path)
    with pytest.warns(UserWarning, match="the checkpoint's eos_token_id 50256 is outside its vocabulary 0..99"):
        assert len(lm.generate([[1, 2]], 3).tokens[0]) == 3
    with pytest.warns(UserWarning, match="eos_token_id 50256 is outside its vocabulary"):
        assert FastMultiExitModel.from_pretrained(tmp_path).generate(torch.tensor([[1, 2]]), max_new_tokens=3).shape \
            == (1, 5)
    with pytest.raises(ValueError, match="eos_token_id 50256 is outside the vocabulary 0..99"):
        lm.generate([[1, 2]], 3, eos_token_id=50256)
