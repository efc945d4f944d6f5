"""The native decoder against transformers' GPT-2: original-head and exit logits, prefill and decode steps."""

import json
import os

import pytest
import torch
from hf_reference import hf_block_outputs, hf_head_logits

import mexit


def run_mexit(model, seq, prefill_len, layers):
    """Prefill seq[:prefill_len], then decode the rest one token at a time; hidden states per layer, [T, d]."""
    cache = model.new_cache(1, len(seq))
    cache.valid[:, :prefill_len] = True
    h = model.embed(torch.tensor([seq[:prefill_len]]), torch.arange(prefill_len)[None])
    per_layer = {layer: [] for layer in layers}
    start = 0
    for layer in layers:  # keep every position of the prefill, not only the last
        h = model.run_layers(h, start, layer, cache, 0)
        per_layer[layer].append(h[0])
        start = layer
    for slot in range(prefill_len, len(seq)):
        cache.valid[:, slot] = True
        h = model.embed(torch.tensor([[seq[slot]]]), torch.tensor([[slot]]))
        states = model.run_to(h, layers, cache, slot)
        for layer in layers:
            per_layer[layer].append(states[layer][:, -1])
    return {layer: torch.cat([t.reshape(-1, t.shape[-1]) for t in hs]) for layer, hs in per_layer.items()}


def test_original_and_exit_logits_match_transformers(tiny_checkpoint):
    folder, hf, heads = tiny_checkpoint
    model = mexit.load(folder).model
    seq = [5, 17, 200, 3, 99, 42, 7, 128, 255, 1, 64]
    outputs = hf_block_outputs(hf, torch.tensor([seq]))
    states = run_mexit(model, seq, prefill_len=4, layers=[1, 2, 3, 4])
    for layer in (1, 2, 3, 4):
        torch.testing.assert_close(states[layer], outputs[layer][0], atol=1e-4, rtol=1e-4)
        ours = model.head_logits(states[layer], layer)
        torch.testing.assert_close(ours, hf_head_logits(hf, heads, outputs, layer)[0], atol=1e-4, rtol=1e-4)
    original = model.head_logits(states[4], "original")
    torch.testing.assert_close(original, outputs["original"][0], atol=1e-4, rtol=1e-4)


def test_layer_ranges_compose(tiny_checkpoint):
    model = mexit.load(tiny_checkpoint[0]).model
    h0 = model.embed(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5)[None])
    whole, parts = model.new_cache(1, 6), model.new_cache(1, 6)
    for cache in (whole, parts):
        cache.valid[:, :5] = True
    full = model.run_layers(h0, 0, 4, whole, 0)
    h = model.run_layers(h0, 0, 1, parts, 0)
    h = model.run_layers(h, 1, 3, parts, 0)
    h = model.run_layers(h, 3, 4, parts, 0)
    torch.testing.assert_close(h, full)
    torch.testing.assert_close(parts.k, whole.k)


def test_bin_checkpoint_loads_with_weights_only(tmp_path, tiny_checkpoint, monkeypatch):
    from tiny_checkpoints import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, fmt="bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    from_bin = mexit.load(tmp_path).model
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    from_safetensors = mexit.load(tiny_checkpoint[0]).model
    torch.testing.assert_close(from_bin.w.attn_w, from_safetensors.w.attn_w)
    torch.testing.assert_close(from_bin.w.exit_heads[3], from_safetensors.w.exit_heads[3])


def test_plain_gpt2_checkpoint(tmp_path):
    from tiny_checkpoints import make_hf_checkpoint

    hf, _ = make_hf_checkpoint(tmp_path, exits=())
    lm = mexit.load(tmp_path)
    assert lm.config.exit_layers == ()
    out = lm.generate([[1, 2, 3]], max_new_tokens=3, eos_token_id=None)
    assert len(out.tokens[0]) == 3
    with pytest.raises(ValueError, match="exit layer 2 is not in this checkpoint"):
        lm.generate([[1, 2, 3]], max_new_tokens=3, exit_layer=2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_follows_fp32(tiny_checkpoint, dtype):
    folder, hf, _ = tiny_checkpoint
    model = mexit.load(folder, dtype=dtype).model
    assert model.dtype == mexit.model.placement.resolve_dtype(dtype)
    seq = [5, 17, 200, 3, 99, 42]
    states = run_mexit(model, seq, prefill_len=3, layers=[4])
    ours = model.head_logits(states[4], "original")
    ref = hf_block_outputs(hf, torch.tensor([seq]))["original"][0]
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_random_model_and_roundtrip(tmp_path):
    config = mexit.ModelConfig(n_layer=3, n_embd=16, n_head=2, vocab_size=31, n_positions=16, exit_layers=(1, 3))
    model = mexit.random_model(config, seed=1)
    assert model.random_weights
    mexit.save_checkpoint(model, tmp_path)
    lm = mexit.load(tmp_path)
    loaded = lm.model
    assert loaded.config == config and loaded.random_weights and lm.is_random  # still labelled random
    torch.testing.assert_close(loaded.w.fc_proj_w, model.w.fc_proj_w)
    torch.testing.assert_close(loaded.w.exit_heads[1], model.w.exit_heads[1])
    assert loaded.predictors.layers == model.predictors.layers == (1,)  # the side files travel with the weights
    assert torch.equal(loaded.predictors.weight, model.predictors.weight)
    assert torch.equal(loaded.token_counts, model.token_counts)
    again = mexit.save_checkpoint(lm, tmp_path / "again")  # what mexit.load returns is saved as its model
    assert mexit.load(again).is_random and json.loads((again / "config.json").read_text())["mexit_random_weights"]
    other = mexit.random_model(config, seed=2)  # saved over the first: its own side files, not the first's
    mexit.save_checkpoint(other, tmp_path)
    assert torch.equal(mexit.load(tmp_path).model.predictors.weight, other.predictors.weight)
    with pytest.raises(TypeError, match="save_checkpoint writes a mexit model .* got dict"):
        mexit.save_checkpoint({}, tmp_path / "no")


def test_a_saved_trained_model_is_not_labelled_random(tiny_checkpoint, tmp_path):
    out = mexit.save_checkpoint(mexit.load(tiny_checkpoint[0]), tmp_path)
    assert "mexit_random_weights" not in json.loads((out / "config.json").read_text())
    assert not mexit.load(out).is_random


def hub_listing(names):
    """What huggingface_hub.model_info answers for a repository holding `names` (the fields mexit reads)."""
    from types import SimpleNamespace

    return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in sorted(names)])


@pytest.mark.parametrize("repo_files,weights", [
    (["config.json", "model.safetensors", "pytorch_model.bin"], ["model.safetensors"]),
    (["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "README.md"],
     ["pytorch_model.bin.index.json"]),
])
def test_hub_id_downloads_one_layout(tiny_checkpoint, monkeypatch, repo_files, weights):
    import huggingface_hub

    from mexit.model.files import METADATA_FILES

    asked = []

    def fake_download(repo_id, allow_patterns=None, **_kw):
        asked.append((repo_id, allow_patterns))
        return str(tiny_checkpoint[0])

    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, **_kw: hub_listing(repo_files))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    lm = mexit.load("IBM/gpt2-medium-multiexit")
    assert asked == [("IBM/gpt2-medium-multiexit", [*METADATA_FILES, *weights])]
    assert lm.config.exit_layers == (1, 2, 3, 4) and lm.tokenizer is not None


def test_hub_id_offline_uses_the_cached_snapshot(tiny_checkpoint, monkeypatch):
    import huggingface_hub

    def offline(*_a, **_kw):
        raise ConnectionError("no network")

    cached = []
    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: cached.append(kw) or str(tiny_checkpoint[0]))
    assert mexit.load("IBM/gpt2-medium-multiexit").config.n_layer == 4
    assert cached == [dict(revision=None, cache_dir=None, token=None, local_files_only=True, allow_patterns=None)]


def test_hub_shards_are_those_the_index_names(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    sharded = mexit.convert(tiny_checkpoint[0], tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (sharded / first).rename(sharded / "custom-name.safetensors")  # transformers reads any name the index gives
    index["weight_map"] = {k: "custom-name.safetensors" if v == first else v for k, v in index["weight_map"].items()}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    asked = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, **_kw: hub_listing(os.listdir(sharded)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns=None, **_kw: asked.append(allow_patterns) or str(sharded))
    assert mexit.load("someone/sharded").config.n_layer == 4
    assert asked[1] == list(dict.fromkeys(index["weight_map"].values()))
    assert "custom-name.safetensors" in asked[1] and "model.safetensors.index.json" in asked[0]


def test_hub_refusal_is_reported_not_hidden_by_the_cache(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def unknown(*_a, **_kw):  # what the hub client raises for a 404 (a stand-in for its HTTP response)
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found for url: ...",
                                      response=SimpleNamespace(headers={}, request=None, status_code=404))

    monkeypatch.setattr(huggingface_hub, "model_info", unknown)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("no cache lookup"))
    with pytest.raises(FileNotFoundError, match="the Hugging Face hub refused it .RepositoryNotFoundError: 404"):
        mexit.load("someone/no-such-model")


def test_an_unreachable_hub_is_asked_once(tmp_path):
    """A hub id on a machine where the hub cannot be reached fails at once with one line (huggingface_hub's
    list_repo_files would retry the connection for about 25 s): the real client, against an address where nothing
    listens."""
    import subprocess
    import sys

    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    run = subprocess.run([sys.executable, "-m", "mexit", "generate", "--model", "someone/some-model", "--prompt", "hi"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "Retrying" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: 'someone/some-model' is not in the hub cache")
    assert "could not be reached (ConnectError" in run.stderr
