"""Self-speculative decoding: greedy output equals the target's full-depth greedy output for every target,
draft exit, draft length and threshold, on batches whose rows accept different numbers of drafts; the KV cache
holds the full model's keys/values at every accepted position; sampling keeps the target distribution
(chi-square); bad settings are named errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import make_hf_checkpoint

import mexit
from mexit import SpeculativeConfig

PROMPTS = [[5, 17, 200, 3], [9], [42, 7, 128], [1, 2, 3, 4, 5, 6], [77], [250, 13], [8, 8, 8]]
N_NEW = 12
# chi-square critical values at significance 0.001 by degrees of freedom
CHI2_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def agreeing_checkpoint(folder, vocab=257, scale=0.35):
    """Random checkpoint whose upper blocks barely change the residual stream and whose exit heads are close to
    the tied embedding: drafts from low exits agree with the full model often, but not always."""
    make_hf_checkpoint(folder, scale=scale, vocab_size=vocab)
    path = folder / "model.safetensors"
    state = load_file(path)
    gen = torch.Generator().manual_seed(1)
    for j in (1, 2, 3):
        for name in ("attn.c_proj", "mlp.c_proj"):
            state[f"transformer.h.{j}.{name}.weight"] *= 0.15
    for layer in (1, 2, 3, 4):
        wte = state["transformer.wte.weight"]
        state[f"name_to_lm_exit_head.lm_head_{layer}.weight"] = wte + 0.3 * scale * torch.randn(
            wte.shape, generator=gen)
    save_file(state, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return mexit.load(agreeing_checkpoint(tmp_path_factory.mktemp("spec")))


TARGETS = [dict(), dict(exit_layer=4), dict(exit_layer=3), dict(contrast=(4, 2)), dict(contrast=("original", 1))]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_greedy_equals_full_depth(lm, target):
    full = lm.generate(PROMPTS, N_NEW, eos_token_id=None, **target).tokens
    depth = max(v if isinstance(v, int) else 4 for v in [target.get("exit_layer", 4), *target.get("contrast", [])])
    rates = []
    for draft_exit in range(1, depth):
        for k in (1, 2, 3, 5, 8):
            for threshold in (None, 0.3):
                spec = SpeculativeConfig(draft_exit, k, threshold)
                out = lm.generate(PROMPTS, N_NEW, eos_token_id=None, speculative=spec, **target)
                assert out.tokens == full, (draft_exit, k, threshold)
                rates.append(out.stats["acceptance_rate"])
    assert max(rates) > 0.3 and min(rates) < 1.0  # drafts both accepted and rejected: the test exercises both


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_rows_alone_and_in_a_batch(lm, batch):
    spec = SpeculativeConfig(2, 4)
    together = lm.generate(PROMPTS[:batch], N_NEW, eos_token_id=None, speculative=spec)
    assert together.tokens == [lm.generate([p], N_NEW, eos_token_id=None, speculative=spec).tokens[0]
                               for p in PROMPTS[:batch]]
    flags = together.drafted
    assert [len(f) for f in flags] == [len(t) for t in together.tokens]
    assert sum(map(sum, flags)) == together.stats["accepted"] or batch == 1 and sum(flags[0]) <= N_NEW


def test_eos_inside_a_draft_and_budget_inside_a_round(lm):
    full = lm.generate(PROMPTS, N_NEW, eos_token_id=None).tokens
    eos = full[0][5]
    for k in (3, 8):
        spec = SpeculativeConfig(2, k)
        assert lm.generate(PROMPTS, N_NEW, eos_token_id=eos, speculative=spec).tokens == lm.generate(
            PROMPTS, N_NEW, eos_token_id=eos).tokens
        for budget in (1, 2, 5, 7):
            assert lm.generate(PROMPTS, budget, eos_token_id=None, speculative=spec).tokens == [
                row[:budget] for row in full]


def test_cache_equals_full_depth_at_every_accepted_position(lm):
    spec = SpeculativeConfig(2, 5)
    out = lm.generate(PROMPTS, N_NEW, eos_token_id=None, speculative=spec, return_cache=True)
    ref = lm.generate(PROMPTS, N_NEW, eos_token_id=None, return_cache=True)
    assert out.tokens == ref.tokens
    for r, prompt in enumerate(PROMPTS):
        n = len(prompt) + N_NEW - 1  # positions fed to the model (the last token never is)
        mine, theirs = out.cache.valid[r].nonzero()[:, 0][:n], ref.cache.valid[r].nonzero()[:, 0]
        assert len(theirs) == n and len(mine) == n
        torch.testing.assert_close(out.cache.k[:, r][:, :, mine], ref.cache.k[:, r][:, :, theirs], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.cache.v[:, r][:, :, mine], ref.cache.v[:, r][:, :, theirs], atol=1e-5, rtol=0)


def test_triton_backend_equals_torch(tmp_path):
    folder = agreeing_checkpoint(tmp_path)
    spec = SpeculativeConfig(2, 3)
    torch_lm, triton_lm = mexit.load(folder), mexit.load(folder, backend="triton")
    want = torch_lm.generate(PROMPTS[:3], 8, eos_token_id=None).tokens
    got = triton_lm.generate(PROMPTS[:3], 8, eos_token_id=None, speculative=spec)
    assert got.tokens == want and got.backend == "triton"


def exact_marginals(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Exact distribution of each of the first `steps` sampled tokens (temperature 1), by enumeration."""
    from mexit.frontends.compat import FastMultiExitModel

    v = model.config.vocab_size
    prefixes, weights = [[]], torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        ids = torch.tensor([prompt + p for p in prefixes])
        probs = FastMultiExitModel(model, mexit.DecodeConfig())(ids).logits[:, -1].double().softmax(-1)
        joint = weights[:, None] * probs
        marginals.append(joint.sum(0))
        prefixes = [p + [t] for p in prefixes for t in range(v)]
        weights = joint.reshape(-1)
    return marginals


def chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic with cells of expectation < 5 pooled; returns (statistic, degrees of freedom)."""
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]]) if small.any() else counts.double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


@pytest.mark.parametrize("draft_exit,k", [(1, 2), (2, 3)])
def test_sampling_keeps_the_target_distribution(tmp_path, draft_exit, k):
    folder = agreeing_checkpoint(tmp_path, vocab=8, scale=0.12)
    lm = mexit.load(folder)
    prompt, n, steps = [3, 1, 4], 3000, 3
    out = lm.generate([prompt] * n, steps, do_sample=True, seed=list(range(n)), eos_token_id=None,
                      speculative=SpeculativeConfig(draft_exit, k))
    rate = out.stats["acceptance_rate"]
    assert 0.2 < rate < 0.95  # both the accept and the residual path are taken often
    for step, probs in enumerate(exact_marginals(lm, prompt, steps)):
        counts = torch.bincount(torch.tensor([row[step] for row in out.tokens]), minlength=8)
        stat, dof = chi_square(counts, probs, n)
        assert stat < CHI2_001[dof], (step, stat, dof, counts.tolist(), (probs * n).tolist())
    again = lm.generate([prompt] * 4, steps, do_sample=True, seed=[0, 1, 2, 3], eos_token_id=None,
                        speculative=SpeculativeConfig(draft_exit, k))
    assert again.tokens == out.tokens[:4]  # seeded: reproducible, and a row's draw does not depend on the batch


@pytest.mark.parametrize("spec,kw,message", [
    (dict(draft_exit=7), {}, "draft exit 7 is not in this checkpoint"),
    (dict(draft_exit=4), {}, "must sit below the target's depth"),
    (dict(draft_exit=3), dict(exit_layer=3), "must sit below the target's depth"),
    (dict(draft_exit=2, draft_len=0), {}, "draft_len must be an integer >= 1"),
    (dict(draft_exit=2, draft_threshold=1.5), {}, r"draft_threshold must be in \[0, 1\]"),
])
def test_bad_settings(lm, spec, kw, message):
    with pytest.raises(ValueError, match=message):
        lm.generate([[1, 2]], 3, speculative=SpeculativeConfig(**spec), **kw)


def test_cli_bench_and_drop_in(tmp_path, capsys):
    import json

    from mexit.decoding import modes
    from mexit.frontends.cli import main
    from mexit.frontends.compat import FastMultiExitModel

    folder = agreeing_checkpoint(tmp_path)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--input-ids", "5,17,200", "--mode", "speculative",
                 "--draft-exit", "2", "--draft-len", "3", "--max-new-tokens", "8", "--no-eos", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    want = mexit.load(folder).generate([[5, 17, 200]], 8, eos_token_id=None).tokens
    assert payload["tokens"] == want and len(payload["drafted"][0]) == 8
    assert 0 <= payload["speculative"]["acceptance_rate"] <= 1
    assert main(["generate", "--model", str(folder), "--input-ids", "1", "--mode", "speculative"]) == 2
    assert "needs --draft-exit" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--input-ids", "1", "--draft-exit", "2"]) == 2
    assert "applies to --mode speculative" in capsys.readouterr().err
    config = mexit.load(folder).config
    assert modes.parse("spec:2:4:0.5", config).spec == SpeculativeConfig(2, 4, 0.5)
    with pytest.raises(ValueError, match="draft exit 4 must sit below the target's depth"):
        modes.parse("spec:4:2", config)
    ids = torch.tensor([[5, 17, 200]])
    model = FastMultiExitModel.from_pretrained(folder)
    assert torch.equal(model.generate(ids, max_new_tokens=6, speculative=SpeculativeConfig(1, 2), pad_token_id=0),
                       model.generate(ids, max_new_tokens=6, pad_token_id=0))


def test_small_real_model_greedy_equals_full_depth():
    """On the shipped small trained model (real exits: drafts often right, sometimes wrong)."""
    from pathlib import Path

    lm = mexit.load(Path(__file__).resolve().parents[1] / "bench" / "small_model")
    prompts = ["ROMEO. But soft, what light", "KING. Now, my lords,", "HAMLET. I have"]
    rates = []
    for target in (dict(), dict(contrast=(8, 4))):
        full = lm.generate(prompts, 24, eos_token_id=None, **target).tokens
        for spec in (SpeculativeConfig(4, 3), SpeculativeConfig(2, 6, 0.5), SpeculativeConfig(6, 2)):
            out = lm.generate(prompts, 24, eos_token_id=None, speculative=spec, **target)
            assert out.tokens == full
            rates.append(out.stats["acceptance_rate"])
    assert max(rates) > 0.3 and min(rates) < 1.0  # drafts accepted and rejected


STATIC = ["static"] + (["graph"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = agreeing_checkpoint(tmp_path_factory.mktemp("spec_engines"))
    return {name: mexit.load(folder, device=DEVICE, engine=name) for name in ["eager", *STATIC]}


def assert_same_as_eager(engines, prompts, n, **kw):
    """Every static engine gives the eager engine's tokens, drafted flags and statistics."""
    want = engines["eager"].generate(prompts, n, **kw)
    for name in STATIC:
        got = engines[name].generate(prompts, n, **kw)
        assert got.engine == name
        assert got.tokens == want.tokens and got.drafted == want.drafted, (name, kw)
        assert got.stats == pytest.approx(want.stats), (name, kw)
    return want


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_static_engine_equals_eager_for_every_target_and_draft_len(engines, target):
    depth = max(v if isinstance(v, int) else 4 for v in [target.get("exit_layer", 4), *target.get("contrast", [])])
    for draft_exit in range(1, depth):
        for k in range(1, 6):
            spec = SpeculativeConfig(draft_exit, k, 0.3 if k == 4 else None)
            assert_same_as_eager(engines, PROMPTS[:3], N_NEW, eos_token_id=None, speculative=spec, **target)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_static_engine_batches_eos_and_budgets(engines, batch):
    prompts = PROMPTS[:batch]  # different prompt lengths
    full = engines["eager"].generate(prompts, N_NEW, eos_token_id=None).tokens
    eos = full[0][4]  # inside a round for draft lengths above 1
    for spec in (SpeculativeConfig(2, 3), SpeculativeConfig(1, 5, 0.3)):
        out = assert_same_as_eager(engines, prompts, N_NEW, eos_token_id=eos, speculative=spec)
        assert out.tokens == engines["eager"].generate(prompts, N_NEW, eos_token_id=eos).tokens
        for budget in (1, 2, 5):  # budgets ending inside a round
            out = assert_same_as_eager(engines, prompts, budget, eos_token_id=None, speculative=spec)
            assert out.tokens == [row[:budget] for row in full]
            assert sum(map(sum, out.drafted)) == out.stats["accepted"]  # no draft past the budget is counted


def test_static_engine_sampling_and_reuse(engines):
    spec = SpeculativeConfig(2, 3)
    for target in (dict(), dict(contrast=(4, 2))):  # ACD whose lower exit drafts: its logits are reused
        assert_same_as_eager(engines, PROMPTS[:4], N_NEW, eos_token_id=None, do_sample=True, seed=[5, 6, 7, 8],
                             top_k=50, speculative=spec, **target)


def test_static_engine_reads_the_host_once_per_round(engines):
    """Without a draft threshold a round reads the device once (every row's count); a threshold adds one read per
    draft. Reported as `host_reads` beside `rounds`."""
    lm = engines[STATIC[-1]]
    out = lm.generate(PROMPTS[:3], N_NEW, eos_token_id=None, speculative=SpeculativeConfig(2, 3))
    assert out.stats["host_reads"] == out.stats["rounds"]
    out = lm.generate(PROMPTS[:3], N_NEW, eos_token_id=None, speculative=SpeculativeConfig(2, 3, 0.3))
    assert out.stats["rounds"] < out.stats["host_reads"] <= 4 * out.stats["rounds"]


def test_speculative_streams_every_row_per_position(engines):
    for name, lm in engines.items():
        streamed = []
        out = lm.generate(PROMPTS[:3], N_NEW, eos_token_id=None, speculative=SpeculativeConfig(2, 4),
                          on_token=lambda t: streamed.append(t.tolist()))
        assert [list(col) for col in zip(*streamed)] == out.tokens, name
