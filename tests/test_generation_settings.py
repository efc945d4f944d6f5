"""Generation settings every entry point reads the same way: the checkpoint's generation_config.json, several stop
ids in every mode and engine, streaming that ends with the rows, transformers' length rule and processor order in the
drop-in, every GenerationConfig field implemented or refused by name, and named errors for ids and lengths."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import mexit
from mexit.decoding.early_exit import ExitPolicy
from mexit.frontends.cli import main
from mexit.frontends.compat import FastMultiExitModel
from mexit.model.generation_config import APPLIED, INERT, OFF

SMALL = Path(__file__).resolve().parents[1] / "bench" / "small_model"
ENGINES = ["eager", "static"] + (["graph"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def two_stops(tmp_path_factory):
    """A copy of the small model whose generation_config.json stops at ids 0 and 12 (config.json keeps 0)."""
    folder = tmp_path_factory.mktemp("two_stops")
    for path in SMALL.iterdir():
        if path.suffix in (".json", ".txt", ".safetensors"):
            shutil.copy(path, folder / path.name)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [0, 12]}))
    return folder


def test_generation_config_stop_ids_in_the_cli_and_as_transformers(two_stops, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    assert main(["generate", "--model", str(two_stops), "--prompt", "ROMEO. But soft,", "--max-new-tokens", "10",
                 "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"][0]
    hf = GPT2LMHeadModel.from_pretrained(two_stops, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(two_stops)("ROMEO. But soft,", return_tensors="pt").input_ids
    want = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert tokens == want and tokens[-1] == 12 and len(tokens) < 10


@pytest.mark.parametrize("engine", ENGINES)
def test_several_stop_ids_in_every_mode(two_stops, engine):
    lm = mexit.load(two_stops, engine=engine)
    prompts = ["ROMEO. But soft,", "KING. Now, my lords,", "HAMLET. I have"]
    modes = {"original": {}, "acd": dict(contrast=(8, 4)), "early exit": dict(early_exit=ExitPolicy(0.4)),
             "speculative": dict(speculative=mexit.SpeculativeConfig(4, 3))}
    free = lm.generate(prompts, 24, eos_token_id=None).tokens
    stops = [free[0][3], free[1][5]]  # two ids that end two rows at different steps
    for name, kw in modes.items():
        unstopped = lm.generate(prompts, 24, eos_token_id=None, **kw).tokens
        out = lm.generate(prompts, 24, eos_token_id=stops, **kw).tokens
        for row, full in zip(out, unstopped):
            cut = next((i + 1 for i, t in enumerate(full) if t in stops), len(full))
            assert row == full[:cut], name


@pytest.mark.parametrize("engine", ENGINES)
def test_a_finished_row_streams_nothing_more(engine):
    lm = mexit.load(SMALL, engine=engine)
    free = lm.generate(["ROMEO. But soft,"], 30, eos_token_id=None).tokens[0]
    eos = free[4]
    for kw in ({}, dict(speculative=mexit.SpeculativeConfig(4, 3))):
        streamed = []
        out = lm.generate(["ROMEO. But soft,"], 30, eos_token_id=eos, on_token=lambda t: streamed.append(t.tolist()),
                          **kw)
        assert [t[0] for t in streamed] == out.tokens[0] == free[: free.index(eos) + 1]


def test_the_drop_in_follows_transformers_lengths_and_processor_order(two_stops):
    from transformers import GenerationConfig
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from mexit.decoding.sampling import SamplingConfig
    from mexit.frontends.compat import warp

    model = FastMultiExitModel.from_pretrained(SMALL)
    ids = torch.tensor([[5 + i for i in range(14)]])
    assert model.generate(ids, eos_token_id=None).shape[1] == 14 + 20  # no length set anywhere: 20 new tokens
    assert model.generate(ids, max_length=18, eos_token_id=None).shape[1] == 18
    stopped = FastMultiExitModel.from_pretrained(two_stops)  # generation_config.json's stop ids
    free = stopped.generate(ids, max_new_tokens=30, eos_token_id=None)[0, 14:].tolist()
    cut = next(i + 1 for i, t in enumerate(free) if t in (0, 12))
    assert stopped.generate(ids, max_new_tokens=30)[0, 14: 14 + cut].tolist() == free[:cut]
    assert isinstance(stopped.generation_config, GenerationConfig)
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    sampling = SamplingConfig(do_sample=True, top_k=40, top_p=0.7, top_p_after_top_k=True)
    theirs = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(40)(None, logits.clone()))
    assert torch.equal(warp(logits, sampling) > float("-inf"), theirs > float("-inf"))


def test_every_generation_config_field_is_implemented_or_refused(two_stops):
    """A field the installed transformers adds must be classified: applied, inert, or refused unless off."""
    from transformers import GenerationConfig

    fields = {k for k in vars(GenerationConfig()) if not k.startswith("__")}
    unclassified = fields - set(APPLIED) - set(INERT) - set(OFF)
    assert not unclassified
    model = FastMultiExitModel.from_pretrained(SMALL)
    ids = torch.tensor([[5, 6, 7]])
    for field, value in (("token_healing", True), ("top_h", 0.3), ("num_beams", 2), ("min_new_tokens", 3)):
        with pytest.raises(NotImplementedError, match=field):
            model.generate(ids, max_new_tokens=2, **{field: value})
    assert model.generate(ids, max_new_tokens=2, min_new_tokens=0).shape == (1, 5)  # off: fine
    for field, value in (("repetition_penalty", 1.2), ("no_repeat_ngram_size", 2)):  # tests/test_repetition_*
        assert model.generate(ids, max_new_tokens=2, **{field: value}).shape == (1, 5)
    assert model.generate(ids, max_new_tokens=2, dola_layers="high").shape == (1, 5)  # DoLa (tests/test_dola.py)


@pytest.mark.parametrize("bad", [2048, -1])
def test_ids_outside_the_vocabulary_are_named(bad, tmp_path):
    from tiny_checkpoints import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, vocab_size=2048)
    model = FastMultiExitModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, bad]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, bad]]), max_new_tokens=2)


def test_native_attention_mask_and_lengths(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    kw = dict(eos_token_id=None)
    padded = lm.generate(torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]]), 3,
                         attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), **kw)
    assert padded.tokens == lm.generate([[5, 6], [1, 2, 3, 4]], 3, **kw).tokens
    right = lm.generate(torch.tensor([[5, 6, 0, 0]]), 3, attention_mask=torch.tensor([[1, 1, 0, 0]]), **kw)
    assert right.tokens == lm.generate([[5, 6]], 3, **kw).tokens
    assert lm.generate([[5, 6]], 3.0, **kw).tokens == lm.generate([[5, 6]], 3, **kw).tokens
    for bad in ("3", 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
            lm.generate([[5, 6]], bad, **kw)
    sampled = lm.generate([[5, 6]], 4, do_sample=True, **kw)
    assert isinstance(sampled.seed, int)  # drawn and reported: the run can be repeated
    assert lm.generate([[5, 6]], 4, do_sample=True, seed=sampled.seed, **kw).tokens == sampled.tokens


def test_autocontrastive_gen_configuration_forms():
    from enum import Enum

    from mexit import DecodeConfig, MultiExitConfiguration

    class VocabularyProjectionMode(Enum):  # autocontrastive-gen's enum, as its scripts pass it
        LAYER_SPECIFIC_PROJECTION = 0
        SHARED_PROJECTION_CAST_OUTPUTS = 1

    given = MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION,
                                   use_original_head="False", contrast_layer_indices="original;4")
    assert given.to_decode_config() == DecodeConfig("contrast", upper="original", lower=4)
    exit6 = MultiExitConfiguration(use_original_head="False", output_layer_index="6", lm_head_layer_indices="2;4;6")
    assert exit6.to_decode_config() == DecodeConfig("exit", exit_layer=6) and exit6.lm_head_layer_indices == (2, 4, 6)
    with pytest.raises(ValueError, match="SHARED_PROJECTION_CAST_OUTPUTS"):
        MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.SHARED_PROJECTION_CAST_OUTPUTS)
    with pytest.raises(ValueError, match="use_original_head=True"):
        MultiExitConfiguration(contrast_layer_indices=(8, 4))  # at construction, as autocontrastive-gen does
    with pytest.raises(ValueError, match="must be True or False"):
        MultiExitConfiguration(use_original_head="no")


@pytest.mark.parametrize("engine", ["static", "eager"])
def test_the_drop_in_streamer_stops_with_the_row(engine, capsys):
    """transformers' TextStreamer through the drop-in: the text ends where the row does (no eos text repeated
    until the engine's next all-finished check)."""
    from transformers import AutoTokenizer, TextStreamer

    model = FastMultiExitModel.from_pretrained(SMALL, engine=engine)
    tokenizer = AutoTokenizer.from_pretrained(SMALL)
    ids = tokenizer("ROMEO. But soft,", return_tensors="pt").input_ids
    free = model.generate(ids, max_new_tokens=30, eos_token_id=None)[0, ids.shape[1]:].tolist()
    eos = free[3]
    capsys.readouterr()
    model.generate(ids, max_new_tokens=30, eos_token_id=eos, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == tokenizer.decode(free[: free.index(eos) + 1]) + "\n"
