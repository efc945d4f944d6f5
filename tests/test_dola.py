"""DoLa against transformers 4.51.3's tokens (recorded in a side environment by tests/dola_reference.py on
checkpoints rebuilt here bit for bit), per-row layer choice, the multi-exit variant and the settings' errors."""

import json
from pathlib import Path

import pytest
import torch
from dola_reference import DOLA_LAYERS, SHAPES, write_checkpoint

import mexit
from mexit.decoding.dola import DolaConfig, dola_scores, js_divergence
from mexit.frontends.cli import main

RECORDED = json.loads((Path(__file__).parent / "data" / "dola_transformers_4.51.3.json").read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for name, (n_layer, tied) in SHAPES.items():
        folder = tmp_path_factory.mktemp(name)
        assert write_checkpoint(folder, n_layer, tied) == RECORDED["checkpoints"][name]["digest"], name
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name,engine,backend", [(name, engine, "torch") for name in SHAPES for engine in
                                                 ("eager", "static")] + [("tied-8", "eager", "triton")])
def test_greedy_tokens_equal_transformers_4_51(checkpoints, name, engine, backend):
    lm = mexit.load(checkpoints[name], dtype="fp32", engine=engine, backend=backend)
    runs = [r for r in RECORDED["checkpoints"][name]["runs"] if r["repetition_penalty"] == 1.0]
    assert len(runs) == len(DOLA_LAYERS) * 3
    if backend == "triton" and not torch.cuda.is_available():  # interpreted: every dola_layers form once, the
        # prompts in turn (torch, and the kernels compiled on a GPU: all)
        runs = [runs[3 * i + i % 3] for i in range(len(DOLA_LAYERS))]
        assert [r["dola_layers"] for r in runs] == DOLA_LAYERS
    for run in runs:
        out = lm.generate([run["prompt"]], RECORDED["new_tokens"], dola_layers=run["dola_layers"], eos_token_id=None)
        assert out.tokens[0] == run["tokens"], (run["dola_layers"], run["prompt"])


def test_candidate_layers_follow_transformers_rules():
    from mexit.model.config import ModelConfig

    def shape(n_layer, tied=True):
        return ModelConfig(n_layer=n_layer, n_embd=8, n_head=2, vocab_size=11, n_positions=8, exit_layers=(),
                           tie_word_embeddings=tied)

    assert DolaConfig("low").candidates(shape(24)) == [2, 4, 6, 8, 10]
    assert DolaConfig("high").candidates(shape(24)) == [12, 14, 16, 18, 20, 22]
    assert DolaConfig("low").candidates(shape(4)) == [2] and DolaConfig("high").candidates(shape(4)) == [2]
    assert DolaConfig("low").candidates(shape(6, tied=False)) == [0, 2]
    assert DolaConfig("high").candidates(shape(48)) == list(range(28, 48, 2))
    with pytest.warns(UserWarning, match=r"dola_layers \[30\] are not below the last layer \(24\): left out, as "
                      r"transformers does; candidates \[3, 7\]"):  # transformers' rule, said rather than silent
        assert DolaConfig((3, 30, 7)).candidates(shape(24)) == [3, 7]
    exits = ModelConfig(n_layer=8, n_embd=8, n_head=2, vocab_size=11, n_positions=8, exit_layers=(2, 4, 6, 8))
    assert DolaConfig("low", "exit").candidates(exits) == [2]  # transformers' halves: below 4, and from 4
    assert DolaConfig("high", "exit").candidates(exits) == [4, 6]


def test_each_row_takes_its_own_premature_layer(checkpoints):
    lm = mexit.load(checkpoints["tied-12"], dtype="fp32", backend="torch")
    prompts = [r["prompt"] for r in RECORDED["checkpoints"]["tied-12"]["runs"][:3]]
    for engine in ("eager", "static"):
        lm = mexit.load(checkpoints["tied-12"], dtype="fp32", backend="torch", engine=engine)
        batch = lm.generate(prompts, 10, dola_layers="high", eos_token_id=None).tokens
        assert batch == [lm.generate([p], 10, dola_layers="high", eos_token_id=None).tokens[0] for p in prompts]
    final = torch.randn(3, 50) * 3
    premature = torch.randn(4, 3, 50) * 3
    premature[2, 1] = final[1]  # row 1's candidate 2 equals the final distribution: never the most divergent
    chosen = js_divergence(final, premature).argmax(0)
    assert chosen[1] != 2
    per_row = torch.stack([dola_scores(final[b:b + 1], premature[chosen[b]:chosen[b] + 1, b:b + 1])[0][0]
                           for b in range(3)])
    scores, best = dola_scores(final, premature)
    torch.testing.assert_close(scores, per_row)
    assert best.tolist() == chosen.tolist()


def test_multi_exit_dola_and_errors(tiny_checkpoint, capsys):
    folder = tiny_checkpoint[0]
    lm = mexit.load(folder, dtype="fp32", backend="torch")
    out = lm.generate([[5, 17, 200]], 6, dola_layers=[2], dola_heads="exit", eos_token_id=None)
    final = mexit.load(folder, dtype="fp32", backend="torch")
    # by hand: the first token contrasts the original head with exit 2's head (ln_f then the head)
    from mexit.decoding.dola import relative_top_filter
    model = final.model
    cache = model.new_cache(1, 3)
    cache.valid[:, :3] = True
    ids = torch.tensor([[5, 17, 200]])
    states = model.run_to(model.embed(ids, torch.arange(3)[None]), [2, 4], cache, 0)
    top, low = relative_top_filter(model.head_logits(states[4][0, -1:], "original"),
                                   model.head_logits(states[2][0, -1:], 2))
    assert out.tokens[0][0] == int((top - low).argmax())
    for kw, needle in ((dict(dola_layers="mid"), "dola_layers must be"), (dict(dola_layers=[9]), "no layer below"),
                       (dict(dola_layers=[2, 2]), r"dola_layers lists a layer twice: \[2, 2\]"),
                       (dict(dola_layers=[4], dola_heads="exit"), "have no exit head"),
                       (dict(dola_layers="high", mode="exit", exit_layer=2), "do not combine"),
                       (dict(dola_heads="exit"), "dola_heads goes with dola_layers")):
        with pytest.raises(ValueError, match=needle):
            lm.generate([[1, 2]], 2, **kw)
    assert main(["generate", "--model", str(folder), "--input-ids", "5,17,200", "--max-new-tokens", "6", "--mode",
                 "dola", "--dola-layers", "2", "--dola-heads", "exit", "--no-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == out.tokens


def test_shipped_small_model_equals_transformers_4_51():
    import hashlib

    small = Path(__file__).resolve().parents[1] / "bench" / "small_model"
    recorded = RECORDED["small_model"]
    assert hashlib.sha256((small / "model.safetensors").read_bytes()).hexdigest() == recorded["digest"]
    lm = mexit.load(small, dtype="fp32", backend="torch")
    assert len(recorded["runs"]) == 18  # low / high / [2, 6] x repetition penalty 1.0 / 1.2 x 3 prompts
    for run in recorded["runs"]:
        out = lm.generate([run["prompt"]], RECORDED["new_tokens"], dola_layers=run["dola_layers"],
                          repetition_penalty=run["repetition_penalty"], eos_token_id=None)
        assert out.tokens[0] == run["tokens"], (run["dola_layers"], run["repetition_penalty"], run["prompt"])


def test_bench_rows_count_dola_launches_and_bytes(tiny_checkpoint, tmp_path):
    from mexit.bench import latency

    argv = ["--model", str(tiny_checkpoint[0]), "--batch", "1", "--prompt-len", "5", "--new-tokens", "4", "--warmup",
            "0", "--repeats", "1", "--engine", "static", "--modes", "original", "dola:high", "dola:0,2", "dola:2:exit",
            "--baselines", "--no-plot", "--out", str(tmp_path)]
    assert latency.main(argv) == 0
    rows = {r["mode"]: r for r in json.loads((tmp_path / "latency.json").read_text())}
    head = rows["original"]["weight_bytes_per_step"]
    # a DoLa step reads the final head and each candidate's (4 layers, tied: high = [2]; exit head 2)
    assert rows["dola:high"]["weight_bytes_per_step"] > head and rows["dola:2:exit"]["weight_bytes_per_step"] > head
    assert rows["dola:0,2"]["weight_bytes_per_step"] > rows["dola:high"]["weight_bytes_per_step"]
    assert all(rows[m]["launches_per_step"] > rows["original"]["launches_per_step"] for m in rows if "dola" in m)
    with pytest.raises(ValueError, match="unknown mode 'dola:'"):
        latency.main([*argv[:-6], "--modes", "dola:", "--out", str(tmp_path / "bad")])


def test_drop_in_takes_one_layer_per_batch_as_transformers(checkpoints):
    from dola_reference import left_padded

    from mexit.frontends.compat import AutoMultiExitModel

    model = AutoMultiExitModel.from_pretrained(checkpoints["tied-12"], dtype="fp32")
    native = mexit.load(checkpoints["tied-12"], dtype="fp32", backend="torch")
    ids, mask = left_padded([r["prompt"] for r in RECORDED["checkpoints"]["tied-12"]["runs"][:3]])
    differs = 0
    for case in RECORDED["batches"]:
        out = model.generate(ids, attention_mask=mask, dola_layers=case["dola_layers"], do_sample=False,
                             max_new_tokens=RECORDED["new_tokens"], eos_token_id=None)
        assert out[:, ids.shape[1]:].tolist() == case["tokens"], case["dola_layers"]
        per_row = native.generate([row[m].tolist() for row, m in zip(ids, mask.bool())], RECORDED["new_tokens"],
                                  dola_layers=case["dola_layers"], eos_token_id=None).tokens
        differs += per_row != case["tokens"]
    assert differs > 0  # the batch rule changes some rows' tokens here: both rules are exercised


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("per_batch", [False, True])
def test_each_token_reports_its_premature_layer(checkpoints, engine, per_batch):
    """result.premature_layers[b][t]: the candidate with the largest Jensen-Shannon divergence from the final
    distribution at token t of row b, recomputed here from one teacher-forced pass over each row's prompt and output
    (every layer's states); with per_batch, every row of a step reports the batch's one choice. The JSON output
    carries it with its histogram."""
    from mexit.decoding.dola import DolaMode
    from mexit.decoding.fixed import DecodeConfig, teacher_forced

    lm = mexit.load(checkpoints["tied-12"], dtype="fp32", backend="torch", engine=engine)
    prompts = [r["prompt"] for r in RECORDED["checkpoints"]["tied-12"]["runs"][:3]]
    dola = DolaConfig("high", per_batch=per_batch)
    out = lm.generate(prompts, 8, decode=dola, eos_token_id=None)
    mode = DolaMode(lm.model, dola)
    assert len(set(map(tuple, out.premature_layers))) > 1 or per_batch  # rows differ: not one constant
    for b, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
        ids = torch.tensor([prompt + tokens[:-1]])
        _, states = teacher_forced(lm.model, DecodeConfig(), ids, torch.ones_like(ids, dtype=torch.bool),
                                   every_layer=True)
        positions = range(len(prompt) - 1, ids.shape[1])
        final = lm.model.head_logits(states[12][0, positions], "original")
        premature = torch.stack([mode.premature_logits(layer, states[layer][0, positions]) for layer in
                                 mode.candidates])
        expected = [mode.candidates[i] for i in js_divergence(final, premature).argmax(0).tolist()]
        assert len(out.premature_layers[b]) == len(tokens)
        if not per_batch:
            assert out.premature_layers[b] == expected, b
    if per_batch:
        assert all(len(set(step)) == 1 for step in zip(*out.premature_layers))
    assert set(x for row in out.premature_layers for x in row) <= set(mode.candidates)
