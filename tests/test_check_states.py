"""Non-finite states during decoding: the check kernel against check_states_ref, and a generation that overflows
at a known step names the row and the token, on every engine and backend, with no host read per step."""

import warnings
from collections import Counter

import pytest
import torch
from kernel_utils import DEVICE

import mexit
from mexit.kernels.check_states import check_states
from mexit.kernels.check_states_ref import check_states_ref
from mexit.ops.launches import count_launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s,d,slot,with_rows", [(1, 1, 96, 5, False), (3, 1, 1024, 7, True), (7, 4, 48, 2, False),
                                                  (64, 1, 1600, 0, False), (5, 3, 1001, 4, True)])
@pytest.mark.parametrize("slot_on_device", [False, True])
def test_kernel_equals_reference(b, s, d, slot, with_rows, dtype, slot_on_device):
    g = torch.Generator().manual_seed(b * 7 + s)
    big_b, t = b + 3, slot + s + 2
    h = torch.randn(b, s, d, generator=g).to(dtype)
    h[0, s - 1, d // 2] = float("nan")
    if b > 2:
        h[2, 0, 0] = float("inf")
    if b > 4:
        h[4, s - 1, -1] = float("-inf")
    rows = torch.randperm(big_b, generator=g)[:b] if with_rows else None
    valid = torch.rand(big_b, t, generator=g) > 0.2
    health = torch.zeros(big_b, t)
    health[0, 0] = float("nan")  # an earlier mark stays
    want = health.clone()
    where = torch.tensor([slot]) if slot_on_device else slot
    check_states_ref(h, want, valid, where, rows)
    ours = health.clone().to(DEVICE)
    args = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in (h, ours, valid, where, rows)]
    with count_launches() as launched:
        check_states(*args)
    assert launched == {"triton:_check_states": 1}
    torch.testing.assert_close(ours.cpu(), want, equal_nan=True, rtol=0, atol=0)
    # the reference itself: NaN exactly at the valid slots of tokens with a non-finite value
    row_of = rows if rows is not None else torch.arange(b)
    bad = ~torch.isfinite(h.float()).all(-1)
    for i in range(b):
        for j in range(s):
            r, c = int(row_of[i]), slot + j
            assert bool(want[r, c].isnan()) == (bool(bad[i, j] and valid[r, c]) or (r, c) == (0, 0))


def poisoned(folder, position: int, **kw):
    """The tiny checkpoint with an infinite position embedding at `position`: the token there gets NaN states."""
    lm = mexit.load(folder, **kw)
    lm.model.w.wpe[position] = float("inf")
    return lm


@pytest.mark.parametrize("engine,backend", [("eager", "torch"), ("static", "torch"), ("eager", "triton"),
                                            ("static", "triton")])
@pytest.mark.parametrize("mode", [dict(), dict(contrast=(4, 2)), dict(early_exit=mexit.ExitPolicy(0.3, exits=(2,))),
                                  dict(speculative=mexit.SpeculativeConfig(draft_exit=1, draft_len=2)),
                                  dict(dola_layers="high")], ids=["original", "acd", "early-exit", "spec", "dola"])
def test_an_overflow_names_its_row_and_token(tiny_checkpoint, engine, backend, mode):
    """Row 1 (4 prompt tokens) reaches position 6 at its token 3, row 0 (2 tokens) at its token 5; row 2 (1 token)
    not within 6 tokens. Tokens before the named one are the clean model's. Speculative decoding drafts ahead: a
    draft at position 6 poisons its row's cache earlier (masked attention multiplies its NaN values by 0), and the
    named token is where the row's output really went bad."""
    folder = tiny_checkpoint[0]
    prompts = [[3, 4], [5, 6, 7, 8], [9]]
    lm = poisoned(folder, 6, engine=engine, backend=backend)
    with pytest.warns(mexit.NonFiniteStates, match=r"in 2 of 3 rows: row 0 from token \d, row 1 from token \d") \
            as caught:
        out = lm.generate(prompts, 6, eos_token_id=None, **mode)
    assert sum(issubclass(w.category, mexit.NonFiniteStates) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", mexit.NonFiniteStates)
        clean = mexit.load(folder, engine=engine, backend=backend).generate(prompts, 6, eos_token_id=None, **mode)
    assert clean.nonfinite == {}
    if "speculative" in mode:
        assert set(out.nonfinite) == {0, 1} and out.nonfinite[0] <= 5 and out.nonfinite[1] <= 3
    else:
        assert out.nonfinite == {0: 5, 1: 3}
    for row, j in out.nonfinite.items():
        assert out.tokens[row][:j] == clean.tokens[row][:j]
    assert out.tokens[2] == clean.tokens[2]


def test_a_non_finite_prompt_is_token_zero(tiny_checkpoint):
    """Position 1 is in row 0's prompt (token 0 is named) and is row 1's token 1's input."""
    lm = poisoned(tiny_checkpoint[0], 1)
    with pytest.warns(mexit.NonFiniteStates, match="row 0 from token 0, row 1 from token 1"):
        assert lm.generate([[3, 4, 5], [6]], 3, eos_token_id=None).nonfinite == {0: 0, 1: 1}


@pytest.mark.parametrize("engine", ["static"] + (["graph"] if torch.cuda.is_available() else []))  # off CUDA: static
def test_the_check_is_one_kernel_per_step_and_no_host_read(tiny_checkpoint, engine, monkeypatch):
    """Against the same generation without the check: each further decode step launches one more kernel (the
    step's one run of blocks) and nothing else, and the host reads are the same (the marks are read once, after
    the last step)."""
    from mexit.model.decoder import MultiExitGPT2

    def launches(n: int, check: bool):
        lm = mexit.load(tiny_checkpoint[0], backend="triton", engine=engine)
        if not check:
            plain = MultiExitGPT2.new_cache
            monkeypatch.setattr(MultiExitGPT2, "new_cache", lambda self, b, t, check_states=False: plain(self, b, t))
        lm.generate([[1, 2, 3]], n, eos_token_id=None)
        with count_launches() as launched:
            out = lm.generate([[1, 2, 3]], n, eos_token_id=None)
        monkeypatch.undo()
        return out, launched

    per_step = {}
    for check in (True, False):
        (short, few), (_, many) = launches(5, check), launches(9, check)
        per_step[check] = many - few
        assert short.stats["host_reads"] == launches(5, not check)[0].stats["host_reads"]
    assert per_step[True] - per_step[False] == Counter({"triton:_check_states": 4})  # 4 more steps, one each
    assert per_step[False] - per_step[True] == Counter()


def test_the_cli_json_carries_the_rows_and_the_warning_names_the_weights(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint whose weights hold inf, loaded past the weight check in fp32: `--json` holds `nonfinite`
    {row: token}; the warning names the weights as a cause and offers no dtype advice in fp32."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from mexit.frontends.cli import main

    folder = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint[0], folder)
    path = folder / "model.safetensors"
    state = load_file(path)
    state["transformer.wpe.weight"][3] = float("inf")
    save_file(state, path, metadata={"format": "pt"})
    assert main(["generate", "--model", str(folder), "--input-ids", "5,6", "--max-new-tokens", "4", "--no-eos",
                 "--no-weight-check", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["nonfinite"] == {"0": 2}
    assert "the weights hold NaN or inf" in captured.err and "float16" not in captured.err
