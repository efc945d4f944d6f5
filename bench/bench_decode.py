"""A decode call per mode on the shipped small model (`bench/small_model`, real weights; 8 layers, exits 2..8):
the original head, an exit, ACD, early exit (max-prob and learned), self-speculative decoding and DoLa, at batch 1
and 8. These measure on the CPU as on a GPU:

    python -m pytest bench/bench_decode.py --benchmark-only -p no:xdist --benchmark-json out.json

A round is one whole `generate` call (prompt and 32 new tokens; fp32 on CPU with one thread unless
OMP_NUM_THREADS says otherwise, fp16 on a GPU, the default engine); extra_info adds the per-token time from the
generation's own step clock (marks at every token on the device clock, median over the rounds), the prefill
time, the weight bytes read per token and the launches of a call. `mexit bench` gives the end-to-end per-token
tables with baselines and plots; both read `mexit.timing.DeviceClock`."""

import statistics
from pathlib import Path

import pytest

import mexit
from mexit.bench.common import set_threads
from mexit.timing import DeviceClock

SMALL = Path(__file__).resolve().parent / "small_model"
NEW_TOKENS = 32
MODES = {
    "original": {}, "exit 4": dict(exit_layer=4), "acd 8,4": dict(contrast=(8, 4)),
    "early exit max-prob 0.9": dict(early_exit=mexit.ExitPolicy(0.9)),
    "early exit learned 0.9": dict(early_exit=mexit.ExitPolicy(0.9, measure="learned")),
    "speculative draft 2, k 1": dict(speculative=mexit.SpeculativeConfig(draft_exit=2, draft_len=1)),
    "dola high": dict(dola_layers="high"),
}


@pytest.fixture(scope="module")
def small(device):
    set_threads(None, device)
    lm = mexit.load(SMALL, device=device)
    prompts = (SMALL / "prompts.txt").read_text().splitlines()
    return lm, [lm.tokenizer.encode(p) for p in prompts if p.strip()]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", list(MODES))
def test_decode(benchmark, measure, device, small, mode, batch):
    lm, ids = small
    prompts = (ids * batch)[:batch]
    clock = DeviceClock(device)
    marks: list = []
    per_token, prefill = [], []

    def call():
        marks.clear()
        marks.append(clock.mark())
        out = lm.generate(prompts, NEW_TOKENS, eos_token_id=None, on_token=lambda _t: marks.append(clock.mark()),
                          **MODES[mode])
        first, last = marks[1], marks[-1]
        prefill.append(clock.ms(marks[0], first))
        per_token.append(clock.ms(first, last) / (len(marks) - 2))
        return out

    out = call()
    stats = out.stats
    nbytes = int(stats["weight_bytes_per_token"] * NEW_TOKENS)
    benchmark.group = f"decode call, small model, batch {batch}"
    rounds = 20 if device.type == "cuda" else 5
    measure(call, nbytes, cold=False, rounds=rounds, mode=mode, batch=batch,
            new_tokens=NEW_TOKENS, dtype=str(lm.model.dtype).removeprefix("torch."), engine=out.engine,
            backend=out.backend, weight_bytes_per_token=round(stats["weight_bytes_per_token"]))
    if benchmark.disabled:
        return
    per_token, prefill = per_token[-rounds:], prefill[-rounds:]  # the timed rounds only (not warm-up or counting)
    benchmark.extra_info.update(ms_per_token=round(statistics.median(per_token), 4),
                                ms_per_token_min=round(min(per_token), 4), ms_per_token_max=round(max(per_token), 4),
                                prefill_ms=round(statistics.median(prefill), 4))
