"""Inputs from public bug reports, each with the right behaviour: numpy / torch values wherever an int or a list is
taken, prompts files with a UTF-8 byte-order mark or CRLF line ends, empty and all-padding drop-in inputs, and a
stored head that config.json calls tied."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import make_hf_checkpoint
from transformers import GPT2LMHeadModel

import mexit
from mexit.frontends.cli import main
from mexit.frontends.compat import FastMultiExitModel
from mexit.frontends.datasets import read_prompt_file

IDS = [[41, 45, 37, 47], [5, 17]]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return mexit.load(tiny_checkpoint[0])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_numpy_and_torch_values_equal_python_ones(lm, kind):
    """Token ids (1-d, 2-d, ragged lists of arrays), max_new_tokens, eos ids, seeds, layers and sampling settings
    as numpy / torch scalars and arrays give what the Python values give."""
    array = np.array if kind == "numpy" else torch.tensor
    scalar = (lambda v: np.int64(v)) if kind == "numpy" else (lambda v: torch.tensor(v))
    real = (lambda v: np.float32(v)) if kind == "numpy" else (lambda v: torch.tensor(v))
    want = lm.generate(IDS[:1], max_new_tokens=4, eos_token_id=None).tokens
    assert lm.generate(array([IDS[0]]), max_new_tokens=scalar(4), eos_token_id=None).tokens == want
    assert lm.generate(array(IDS[0]), max_new_tokens=scalar(4), eos_token_id=None).tokens == want
    assert lm.generate([array(row) for row in IDS], 3, eos_token_id=None).tokens == \
        lm.generate(IDS, 3, eos_token_id=None).tokens
    kw = dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=[3, 4],
              contrast=(4, 2), eos_token_id=[7, 9], repetition_penalty=1.2, no_repeat_ngram_size=2)
    converted = dict(max_new_tokens=scalar(5), do_sample=np.bool_(True) if kind == "numpy" else torch.tensor(True),
                     temperature=real(0.7), top_k=scalar(20), top_p=real(0.9), seed=array([3, 4]),
                     contrast=array([4, 2]), eos_token_id=array([7, 9]), repetition_penalty=real(1.2),
                     no_repeat_ngram_size=scalar(2))
    assert lm.generate(IDS, **converted).tokens == lm.generate(IDS, **kw).tokens
    assert lm.generate(IDS, 3, exit_layer=scalar(2)).tokens == lm.generate(IDS, 3, exit_layer=2).tokens
    policy = mexit.ExitPolicy(real(0.3), exits=array([2, 3]), max_steps=scalar(8))
    assert policy == mexit.ExitPolicy(float(real(0.3)), exits=(2, 3), max_steps=8)
    assert type(policy.threshold) is float and type(policy.max_steps) is int
    assert hash(policy) is not None  # settings stay hashable (a static step's key)
    spec = mexit.SpeculativeConfig(draft_exit=scalar(1), draft_len=scalar(2))
    assert spec == mexit.SpeculativeConfig(1, 2)
    assert lm.generate(IDS, 4, speculative=spec).tokens == lm.generate(IDS, 4).tokens


@pytest.mark.parametrize("bad,message", [
    (np.array([[[1, 2]]]), "1-d or 2-d array"),
    (np.array([1.5, 2.0]), "token ids must be integers"),
    (np.int64(7), "got the single number 7"),
    (np.array([[1, 2], [3, 999]]), r"token ids \[999\] are outside the vocabulary"),
])
def test_a_refused_array_names_the_real_problem(lm, bad, message):
    with pytest.raises(ValueError, match=message):
        lm.generate(bad, max_new_tokens=2)


def test_the_drop_in_takes_numpy_ids_and_settings(tiny_checkpoint):
    fast = FastMultiExitModel.from_pretrained(tiny_checkpoint[0])
    ids = torch.tensor(IDS[:1])
    want = fast.generate(ids, max_new_tokens=4, eos_token_id=None)
    got = fast.generate(ids.numpy(), max_new_tokens=np.int64(4), eos_token_id=None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2), r"shape \(1, 0\) holds no token"),
    (lambda m: m.generate(torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2), r"shape \(0, 3\) holds no token"),
    (lambda m: m(torch.tensor([[5, 6], [7, 8]]), attention_mask=torch.tensor([[1, 1], [0, 0]])),
     r"attention_mask rows \[1\] are all zeros"),
    (lambda m: m.generate(torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]]), max_new_tokens=2),
     r"attention_mask rows \[0\] are all zeros"),
    (lambda m: m.generate(torch.tensor([[5.0, 6.0]]), max_new_tokens=2), "integer token ids, got dtype torch.float32"),
])
def test_empty_and_all_padding_drop_in_inputs_are_named(tiny_checkpoint, call, message):
    fast = FastMultiExitModel.from_pretrained(tiny_checkpoint[0])
    with pytest.raises(ValueError, match=message):
        call(fast)


def test_prompts_files_with_a_byte_order_mark_and_crlf(tmp_path, tiny_checkpoint):
    """A BOM never reaches the first prompt (text and JSONL alike), CRLF and CR line ends are line ends."""
    text = tmp_path / "prompts.txt"
    text.write_bytes("\ufeffROMEO. But soft,\r\nJULIET.\r\nthird\rline\r\n".encode())
    assert [r["prompt"] for r in read_prompt_file(text)] == ["ROMEO. But soft,", "JULIET.", "third", "line"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "ROMEO."}\r\n{"input_ids": [5, 6]}\r\n')
    assert read_prompt_file(jsonl) == [{"index": 0, "line": 1, "prompt": "ROMEO."},
                                       {"index": 1, "line": 2, "input_ids": [5, 6]}]
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_checkpoint[0]), "--prompts-file", str(text), "--out", str(out),
                 "--max-new-tokens", "3"]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    lm = mexit.load(tiny_checkpoint[0])
    assert first["prompt"] == "ROMEO. But soft," and first["tokens"] == lm.generate("ROMEO. But soft,", 3).tokens[0]


def test_ablation_prompts_drop_the_byte_order_mark(tmp_path):
    from mexit.bench.ablate import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffone\r\ntwo\n".encode())
    assert [r["prompt"] for r in read_prompts(path)] == ["one", "two"]


@pytest.fixture(scope="module")
def stored_head_called_tied(tmp_path_factory):
    """A checkpoint whose config.json says tie_word_embeddings=true but whose file holds an lm_head.weight that
    differs from the embedding (a fine-tune saved untied)."""
    folder = tmp_path_factory.mktemp("tied_but_stored")
    make_hf_checkpoint(folder)
    state = load_file(os.path.join(folder, "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"]) * 0.35
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True)
    return folder


def test_a_stored_head_the_config_calls_tied_is_used_as_transformers_does(stored_head_called_tied, tmp_path):
    """The installed transformers keeps the stored head (untied); mexit does the same, says so once, and
    `convert` writes the head with tie_word_embeddings false. Native, CLI-loaded and drop-in tokens all equal
    transformers' greedy tokens."""
    folder = stored_head_called_tied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # what transformers does
    prompt = torch.tensor([[5, 17, 200, 3]])
    want = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    with pytest.warns(UserWarning, match="tie_word_embeddings=true, but the stored lm_head.weight differs") as caught:
        lm = mexit.load(folder)
    assert sum("lm_head.weight differs" in str(w.message) for w in caught) == 1
    assert lm.config.tie_word_embeddings is False
    assert lm.generate(prompt, 6, eos_token_id=None).tokens[0] == want
    with pytest.warns(UserWarning, match="lm_head.weight differs"):
        fast = FastMultiExitModel.from_pretrained(folder)
    assert fast.generate(prompt, max_new_tokens=6, eos_token_id=None)[0, 4:].tolist() == want
    out = tmp_path / "converted"
    with pytest.warns(UserWarning, match="lm_head.weight differs"):
        mexit.convert(folder, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"], hf.lm_head.weight.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the converted folder says what it holds: no warning
        assert mexit.load(out).generate(prompt, 6, eos_token_id=None).tokens[0] == want


def test_a_head_stored_twice_with_equal_values_stays_tied(tiny_checkpoint, tmp_path):
    """The common case of a tied head saved twice (equal values) is read once and stays tied, silently."""
    folder = tmp_path / "twice"
    make_hf_checkpoint(folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mexit.load(folder).config.tie_word_embeddings is True


@pytest.mark.parametrize("kw,message", [
    (dict(early_exit=dict(threshold="0.5")), r"threshold must be a number, got '0.5' \(str\)"),
    (dict(early_exit=dict(threshold=0.5, exits=("4",))), r"integers .* got '4' \(str\)"),
    (dict(do_sample=True, seed=2**70), r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    (dict(do_sample=True, seed=-3), "got -3"),
])
def test_mistyped_settings_name_what_they_got(tiny_checkpoint, kw, message):
    """A value of the wrong type or range is named as it was given (a string exit is not 'not among the exits', an
    out-of-range seed is not an overflow deep in torch)."""
    lm = mexit.load(tiny_checkpoint[0])
    with pytest.raises(ValueError, match=message):
        if "early_exit" in kw:
            lm.generate([[1, 2]], 2, early_exit=mexit.ExitPolicy(**kw["early_exit"]))
        else:
            lm.generate([[1, 2]], 2, **kw)


def test_a_mistyped_generation_config_is_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": "20"}))
    assert main(["generate", "--model", str(folder), "--input-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "generation_config.json cannot be read" in err and "Traceback" not in err
    # fields transformers reads without checking: refused by name before they reach a comparison (a TypeError)
    for field, value, kind in (("temperature", "hot", "a number"), ("do_sample", "yes", "true or false"),
                               ("eos_token_id", "0", "an integer or a list of them"), ("top_k", 2.5, "an integer")):
        (folder / "generation_config.json").write_text(json.dumps({field: value}))
        assert main(["generate", "--model", str(folder), "--input-ids", "1,2"]) == 2
        err = capsys.readouterr().err
        assert f"error: generation_config.json: {field} must be {kind}, got {value!r}" in err, err
        assert "Traceback" not in err


def test_a_mistyped_local_folder_is_not_sent_to_the_hub(tiny_checkpoint, tmp_path, monkeypatch):
    """"models/tiny_chekpoint" looks like a hub id, but its first part is a local folder: it fails at once, naming
    the checkpoints that are there, instead of retrying the hub."""
    import shutil

    from mexit.model.checkpoint import resolve_folder

    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_checkpoint[0], tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.model_info", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(FileNotFoundError, match="checkpoints there: tiny"):
        resolve_folder("models/tiyn")


def test_an_address_where_no_ray_cluster_answers_fails_at_once():
    import socket

    from mexit.frontends.cluster import reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        reachable(f"127.0.0.1:{port}")
    reachable("auto")  # the local cluster: nothing to check


def test_texts_and_id_lists_mix_in_one_batch(tmp_path, tiny_checkpoint, capsys):
    """A batch of texts and id lists is each row as given (the README's prompts: texts, ids, batches of these); a
    JSON-lines file of both kinds times early exit against full depth on its first batch."""
    lm = mexit.load(tiny_checkpoint[0])
    text = lm.encode("ROMEO. But soft,")[0]
    assert lm.generate(["ROMEO. But soft,", [5, 6, 7]], 4).tokens == lm.generate([text, [5, 6, 7]], 4).tokens
    prompts = tmp_path / "mixed.jsonl"
    prompts.write_text('{"prompt": "ROMEO."}\n{"input_ids": [5, 6, 7]}\n')
    assert main(["generate", "--model", str(tiny_checkpoint[0]), "--prompts-file", str(prompts), "--out",
                 str(tmp_path / "out.jsonl"), "--mode", "ee:cosine:0.7", "--max-new-tokens", "4",
                 "--time-full-depth"]) == 0
    assert "# early exit against full depth (the file's first batch of good prompts): " in capsys.readouterr().out


def test_ablation_prompts_are_read_as_generate_reads_them(tmp_path, tiny_checkpoint):
    """The benchmarks' prompt files are `--prompts-file`'s: JSON lines by content, text exactly as written, and a
    prompt that cannot run named by its line before any work."""
    from mexit.bench.ablate import encode, read_prompts

    lm = mexit.load(tiny_checkpoint[0])
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": " ROMEO. "}\n{"input_ids": [5, 6, 7]}\n')
    ids, encoding = encode(lm, read_prompts(path), 4, path)
    assert ids == [lm.tokenizer.encode(" ROMEO. "), [5, 6, 7]] and encoding == "tokenizer"
    path = tmp_path / "p.txt"
    path.write_text("ROMEO.\n" + "x " * 300 + "\n")
    with pytest.raises(ValueError, match=r"p.txt: 1 prompt\(s\) cannot run, nothing was generated: line 2: the "
                                         r"prompt \(\d+ tokens\) plus max_new_tokens \(4\) exceeds"):
        encode(lm, read_prompts(path), 4, path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ROMEO.\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8 \(first bad byte at offset 7\)"):
        read_prompts(bad)


@pytest.mark.parametrize("kw,message", [
    (dict(early_exit=0.9), r"early_exit takes ExitPolicy\(\.\.\.\) from mexit.decoding.early_exit, got float 0.9; "
                           r"a mode string does it in one: mode='ee:max-prob:0.9'"),
    (dict(speculative=(2, 2)), r"speculative takes SpeculativeConfig\(\.\.\.\) from mexit.decoding.speculative"),
    (dict(decode="exit:2"), r"decode takes a mode's settings \(DecodeConfig, .*DolaConfig.*\), got str 'exit:2'"),
])
def test_a_mode_keyword_of_another_type_names_its_public_class(tiny_checkpoint, kw, message):
    with pytest.raises(TypeError, match=message):
        mexit.load(tiny_checkpoint[0]).generate([[1, 2]], 2, **kw)
