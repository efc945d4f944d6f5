"""Loading every layout transformers accepts, `mexit convert` and the drop-in's save_pretrained, on a small file
written exactly as the published checkpoint is (bench/load_checkpoint.py's recipe): tokens against transformers,
the code path each file takes, and one named error per damaged file."""

import json
import os

import pytest
import torch
from hf_reference import hf_greedy
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

import mexit
from mexit.bench.load_checkpoint import write_autocontrastive_checkpoint
from mexit.frontends.cli import main
from mexit.model.config import ModelConfig

SHAPE = ModelConfig(n_layer=4, n_embd=32, n_head=4, vocab_size=257, n_positions=64, exit_layers=(2, 4))
MODES = [dict(mode="original"), dict(mode="exit", exit_layer=2), dict(mode="contrast", contrast=(4, 2))]
PROMPTS = [[5, 17, 200, 3], [42, 7, 128, 255, 1, 64, 12]]
HEADS = [f"name_to_lm_exit_head.lm_head_{layer}.weight" for layer in SHAPE.exit_layers]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(folder, transformers model, exit heads) of a file in the published layout, with peaked weights."""
    folder = write_autocontrastive_checkpoint(tmp_path_factory.mktemp("published"), SHAPE, std=0.35)
    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    return folder, hf, {layer: state[HEADS[i]] for i, layer in enumerate(SHAPE.exit_layers)}


def tokens(folder, case, **load_kw):
    lm = mexit.load(folder, backend="torch", **load_kw)
    return lm.generate(PROMPTS, max_new_tokens=8, eos_token_id=None, **case).tokens


def reference(hf, heads, case):
    return [hf_greedy(hf, heads, p, 8, case["mode"], case.get("exit_layer"), case.get("contrast")) for p in PROMPTS]


def test_the_recipe_writes_the_published_layout(published):
    folder = published[0]
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    names = list(state)
    assert names[:6] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                         "transformer.h.0.ln_1.bias", "transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"]
    assert state["transformer.h.0.attn.bias"].dtype == torch.uint8 and state["transformer.h.0.attn.bias"].shape == (
        1, 1, 64, 64)
    assert state["lm_head.weight"].untyped_storage().data_ptr() == state["transformer.wte.weight"].untyped_storage(
        ).data_ptr()
    assert names[-2:] == HEADS
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MultiHeadGPT2"] and config["lm_head_layer_indices"] == [2, 4]
    assert config["torch_dtype"] == "float32" and config["output_hidden_states"] is True


@pytest.mark.parametrize("case", MODES, ids=lambda c: c["mode"])
def test_tokens_equal_transformers_before_and_after_convert(published, tmp_path, case):
    folder, hf, heads = published
    expected = reference(hf, heads, case)
    assert tokens(folder, case) == expected
    out = mexit.convert(folder, tmp_path / "converted")  # the stored dtype: fp32
    assert tokens(out, case) == expected
    from mexit.decoding.fixed import MultiExitConfiguration
    from mexit.frontends.compat import AutoMultiExitModel

    names = {"original": dict(use_original_head=True), "exit": dict(use_original_head=False, output_layer_index=2),
             "contrast": dict(use_original_head=False, contrast_layer_indices=(4, 2))}[case["mode"]]
    drop_in = AutoMultiExitModel.from_pretrained(out, multi_exit_config=MultiExitConfiguration(**names))
    for prompt, new in zip(PROMPTS, expected):
        assert drop_in.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None)[0, len(prompt):].tolist() == new


def test_converted_folder_loads_in_transformers(published, tmp_path):
    folder, hf, _ = published
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"])
    theirs, info = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == HEADS and not info["missing_keys"]
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, hf(ids).logits, rtol=0, atol=0)
    config, source = (json.loads((f / "config.json").read_text()) for f in (out, folder))
    assert config == source  # every field kept, the dtype unchanged
    state = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in state and not any(k.endswith(".attn.bias") for k in state)
    umask = os.umask(0)
    os.umask(umask)
    assert {(out / name).stat().st_mode & 0o777 for name in os.listdir(out)} == {0o666 & ~umask}
    os.chmod(out / "tokenizer.json", 0o444)  # a read-only file of an earlier save is replaced, not opened
    os.chmod(folder / "vocab.json", 0o400)  # a source's mode is not copied
    try:
        drop_in_dir = mexit.save_checkpoint(mexit.load(folder).model, out)
    finally:
        os.chmod(folder / "vocab.json", 0o644)
    assert {(drop_in_dir / name).stat().st_mode & 0o777 for name in os.listdir(out)} == {0o666 & ~umask}


def test_fp16_convert_shards_and_loads_with_right_tokens(published, tmp_path, capsys):
    folder = published[0]
    out = tmp_path / "fp16"
    assert main(["convert", str(folder), str(out), "--dtype", "fp16", "--shard-size", "40KB"]) == 0
    assert "safetensors file(s)" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # every tensor here is under 40 kB, so each shard holds at most 40 kB of them plus its header; per-layer views of
    # one stacked buffer count their own bytes
    assert len(shards) > 2 and all(os.path.getsize(out / s) < 40_000 + 8_000 for s in shards)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    # the reference: transformers and the heads with every weight rounded to fp16, computed in fp32
    hf = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    state = {}
    for shard in shards:
        state.update(load_file(out / shard))
    heads = {layer: state[HEADS[i]].float() for i, layer in enumerate(SHAPE.exit_layers)}
    for case in MODES:
        assert tokens(out, case, dtype="fp32") == reference(hf, heads, case)
    half_bin, half_st = mexit.load(folder, dtype="fp16").model.w, mexit.load(out, dtype="fp16").model.w
    assert torch.equal(half_bin.fc_w, half_st.fc_w) and torch.equal(half_bin.exit_heads[2], half_st.exit_heads[2])


def split_bin(folder, out, shards: int = 3):
    """`folder`'s .bin rewritten as transformers' sharded .bin: pytorch_model-0000i-of-0000n.bin + index."""
    import shutil

    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(folder / name, out / name)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_sharded_bin_loads_memory_mapped(published, tmp_path, monkeypatch):
    folder, hf, heads = published
    sharded = split_bin(folder, tmp_path / "sharded")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: calls.append((os.path.basename(path), kw))
                        or real_load(path, **kw))
    for case in MODES:
        assert tokens(sharded, case) == reference(hf, heads, case)
    assert {c[0] for c in calls} == {f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)}
    assert all(kw["mmap"] is True and kw["weights_only"] is True for _, kw in calls)


def test_legacy_non_zip_bin_is_read_whole(published, tmp_path, monkeypatch):
    folder, hf, heads = published
    legacy = write_autocontrastive_checkpoint(tmp_path / "legacy", SHAPE, std=0.35, tokenizer=False, legacy=True)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: calls.append(kw) or real_load(path, **kw))
    case = MODES[2]
    assert tokens(legacy, case) == reference(hf, heads, case)
    assert [kw["mmap"] for kw in calls] == [False]


def test_tied_matrix_stored_once_as_lm_head(published, tmp_path):
    folder, hf, heads = published
    out = mexit.convert(folder, tmp_path / "lm_head_only")
    state = load_file(out / "model.safetensors")
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for case in MODES:
        assert tokens(out, case) == reference(hf, heads, case)
    theirs = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)  # transformers loads such files too
    torch.testing.assert_close(theirs.transformer.wte.weight, hf.transformer.wte.weight, rtol=0, atol=0)


def test_every_tensor_is_read_once_into_its_place(published, monkeypatch):
    from mexit.model import checkpoint

    reads = []
    real_open = checkpoint.open_tensors

    def counting_open(folder):
        stored = real_open(folder)
        for name, entry in stored.items():
            entry.read = lambda read=entry.read, name=name: reads.append(name) or read()
        return stored

    monkeypatch.setattr(checkpoint, "open_tensors", counting_open)
    monkeypatch.setattr(torch, "stack", None)  # no stacked copy of the per-layer tensors
    model = checkpoint.load(published[0], dtype="fp16")
    expected = [*checkpoint.expected_shapes(SHAPE), "lm_head.weight", "transformer.wte.weight"]
    # once each into its place, the mask buffers never; the stored tied head and the embedding once more, to compare
    # them (memory-mapped: a pass over their pages, no copy)
    assert sorted(reads) == sorted(expected)
    assert model.w.attn_w.dtype == torch.float16 and model.w.attn_w.shape == (4, 96, 32)  # [L, N, K]


def test_drop_in_save_pretrained_writes_what_convert_writes(published, tmp_path):
    from mexit.frontends.compat import AutoMultiExitModel

    folder = published[0]
    converted = mexit.convert(folder, tmp_path / "converted", dtype="fp16")
    drop_in = AutoMultiExitModel.from_pretrained(folder, dtype="fp16")
    drop_in.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == sorted(os.listdir(converted))
    ours, theirs = (load_file(f / "model.safetensors") for f in (tmp_path / "saved", converted))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    drop_in.save_pretrained(tmp_path / "saved", max_shard_size="30KB")  # a resave: no stale single file left
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    assert mexit.load(tmp_path / "saved").config == mexit.load(converted).config
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        drop_in.save_pretrained(tmp_path / "hub", push_to_hub=True)
    drop_in.save_pretrained(tmp_path / "defaults", True, None, push_to_hub=False, variant=None)  # transformers' order
    assert (tmp_path / "defaults" / "model.safetensors").exists()
    with pytest.raises(NotImplementedError, match="safe_serialization=False"):
        drop_in.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def one_error_line(argv, capsys, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_damaged_or_incomplete_files_are_one_named_error(published, tmp_path, capsys):
    folder = published[0]
    sharded = split_bin(folder, tmp_path / "sharded")
    os.remove(sharded / "pytorch_model-00002-of-00003.bin")
    one_error_line(["generate", "--model", str(sharded), "--input-ids", "1,2"], capsys,
                   "pytorch_model-00002-of-00003.bin", "missing")
    truncated = split_bin(folder, tmp_path / "truncated")
    shard = truncated / "pytorch_model-00003-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    one_error_line(["generate", "--model", str(truncated), "--input-ids", "1,2"], capsys,
                   "pytorch_model-00003-of-00003.bin", "truncated or corrupted")
    out = mexit.convert(folder, tmp_path / "converted", max_shard_size="40KB")
    shards = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 2
    shard = out / shards[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    one_error_line(["generate", "--model", str(out), "--input-ids", "1,2"], capsys, shards[1], "truncated or corrupted")
    one_error_line(["convert", str(folder), str(out)], capsys, "already holds weights")
    one_error_line(["convert", str(folder), str(tmp_path / "new"), "--shard-size", "2XB"], capsys, "'2XB'")
    assert not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("")
    one_error_line(["convert", str(folder), str(tmp_path / "a_file")], capsys, "is a file")
    one_error_line(["convert", str(tmp_path / "missing"), str(tmp_path / "new")], capsys, "does not exist")
    assert not (tmp_path / "new").exists()  # a failed conversion leaves no folder behind
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "model-00001-of-00002.safetensors").write_bytes(b"x")
    one_error_line(["convert", str(folder), str(stray)], capsys, "model-00001-of-00002.safetensors")


def test_a_tensor_in_two_shards_is_named(published, tmp_path):
    sharded = split_bin(published[0], tmp_path / "sharded")
    first = torch.load(sharded / "pytorch_model-00001-of-00003.bin", weights_only=True)
    second = torch.load(sharded / "pytorch_model-00002-of-00003.bin", weights_only=True)
    second["transformer.wte.weight"] = first["transformer.wte.weight"]
    torch.save(second, sharded / "pytorch_model-00002-of-00003.bin")
    with pytest.raises(ValueError, match="transformer.wte.weight is stored in both pytorch_model-00001-of-00003.bin "
                                         "and pytorch_model-00002-of-00003.bin"):
        mexit.load(sharded)


def test_overflow_on_cast_names_the_tensor(published, tmp_path):
    out = mexit.convert(published[0], tmp_path / "big")
    state = load_file(out / "model.safetensors")
    state["name_to_lm_exit_head.lm_head_2.weight"][5, 3] = 1e5
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    assert mexit.load(out, dtype="fp32").config.n_layer == 4
    with pytest.raises(ValueError, match=r"name_to_lm_exit_head.lm_head_2.weight holds values up to 1e\+05, "
                                         r"beyond float16's range"):
        mexit.load(out, dtype="fp16")
    assert mexit.load(out, dtype="bf16").model.w.exit_heads[2].dtype == torch.bfloat16  # within bf16's range


def test_cpu_buffers_ask_for_huge_pages_inside_themselves(monkeypatch):
    from mexit.model import checkpoint

    advised = []

    class Libc:
        def madvise(self, start, length, advice):
            advised.append((start, length, advice))

    monkeypatch.setattr(checkpoint, "_libc", Libc)
    shape = ModelConfig(n_layer=2, n_embd=256, n_head=4, vocab_size=9000, n_positions=64, exit_layers=(1, 2))
    weights = checkpoint.empty_weights(shape, torch.float32, torch.device("cpu"))
    head = weights.exit_heads[1]  # 9.2 MB: at least 2 MB pages fit inside it
    start, end = head.data_ptr(), head.data_ptr() + head.nbytes
    inside = [(a, n) for a, n, advice in advised if start <= a and a + n <= end]
    assert len(inside) == 1 and advised[0][2] == checkpoint._MADV_HUGEPAGE
    a, n = inside[0]
    assert a % (1 << 21) == 0 and n % (1 << 21) == 0 and n >= head.nbytes - 2 * (1 << 21)
    assert all(length > 0 for _, length, _ in advised)  # buffers smaller than a huge page are not advised


def mapped_file(tensor) -> str | None:
    """The file whose mapping holds `tensor`'s data (Linux /proc/self/maps), None for anonymous memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")
def test_uncast_unstacked_tensors_are_the_file_pages(published, tmp_path):
    folder, hf, heads = published
    model = mexit.load(folder, dtype="fp32", backend="torch").model
    file = str(folder / "pytorch_model.bin")
    assert mapped_file(model.w.exit_heads[2]) == file and mapped_file(model.w.wte) == file
    assert mapped_file(model.w.fc_w) is None  # stacked: copied once
    torch.testing.assert_close(model.w.exit_heads[2], heads[2], rtol=0, atol=0)
    model.w.exit_heads[2][0, 0] += 1  # a private mapping: the file does not change
    assert torch.equal(torch.load(folder / "pytorch_model.bin", weights_only=True)[HEADS[0]], heads[2])
    half = mexit.load(folder, dtype="fp16").model
    assert mapped_file(half.w.exit_heads[2]) is None  # cast: a copy
    converted = mexit.convert(folder, tmp_path / "fp16", dtype="fp16")
    from_safetensors = mexit.load(converted, dtype="fp16").model
    assert mapped_file(from_safetensors.w.exit_heads[2]) == str(converted / "model.safetensors")
    assert torch.equal(from_safetensors.w.exit_heads[2], half.w.exit_heads[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_is_the_cpu_load_moved(published, tmp_path):
    from mexit.model.checkpoint import load, named_weights

    folder = published[0]
    for source in (folder, mexit.convert(folder, tmp_path / "fp16", dtype="fp16")):
        on_gpu, on_cpu = load(source, dtype="fp16", device="cuda"), load(source, dtype="fp16", device="cpu")
        for (name, gpu), (_, cpu) in zip(named_weights(on_gpu.w), named_weights(on_cpu.w)):
            assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu), name


def test_sizes_and_auto_dtype(published, tmp_path):
    from mexit.model.save import parse_size

    assert parse_size("20000") == parse_size(20000) == 20000 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 mb") == 1_500_000
    out = mexit.convert(published[0], tmp_path / "double")
    state = load_file(out / "model.safetensors")
    save_file({k: v.double() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="stores float64, which mexit does not compute in; pass dtype"):
        mexit.load(out, dtype="AUTO")
    assert mexit.load(out, dtype="fp32").model.w.wte.dtype == torch.float32
