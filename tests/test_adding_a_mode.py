"""Adding a mode takes its module, one registry entry and its test, nothing else: a mode defined here (the mean of
several exits' log-probabilities, a stand-in for a new algorithm over per-layer predictions) is registered by
adding its `Entry` and then runs through `MultiExitLM.generate(mode=...)`, the CLI's `--mode` and its flags, on
every engine, to the tokens its definition gives."""

import dataclasses
import json

import pytest
import torch

import mexit
from mexit.decoding import modes
from mexit.decoding.step import OneStep
from mexit.frontends.cli import main


@dataclasses.dataclass(frozen=True)
class MeanOfExits:
    """Each token: the argmax of the mean of `layers`' exit log-probabilities."""

    layers: tuple[int, ...]

    def check(self, config) -> None:
        missing = [layer for layer in self.layers if layer not in config.exit_layers]
        if missing:
            raise ValueError(f"exits {missing} are not in this checkpoint")


class MeanOfExitsMode(OneStep):
    def __init__(self, model, settings: MeanOfExits):
        settings.check(model.config)
        self.model, self.settings = model, settings
        self.stops = sorted(set(settings.layers))
        self.depth, self.full_heads = max(settings.layers), len(settings.layers)

    def step(self, rows) -> None:
        hidden = [rows.states(layer) for layer in self.settings.layers]
        out = self.model.exit_stage(hidden, list(self.settings.layers), rows.backend, with_logprobs=True)
        scores = out.logprobs.mean(0)
        rows.emit(rows.choose(scores.argmax(-1), scores))


def words(rest: str) -> dict:
    """The mini-language's text after "mean-exits:" -> its flag."""
    try:
        return {"mean_layers": tuple(int(x) for x in rest.split(","))}
    except ValueError:
        raise modes.Malformed from None


ENTRY = modes.Entry("mean-exits", "", __name__, "MeanOfExits", "MeanOfExitsMode", "mean-exits:L1,L2,...",
                    flags=("mean_layers",), needs="mean_layers", words=words,
                    make=lambda flags: MeanOfExits(tuple(flags["mean_layers"])))


@pytest.fixture
def registered(monkeypatch):
    """The registry with the new entry (the one line a new mode adds to `modes.MODES`)."""
    monkeypatch.setattr(modes, "MODES", (*modes.MODES, ENTRY))
    monkeypatch.setattr(modes, "NAMES", (*modes.NAMES, ENTRY.name))
    monkeypatch.setattr(modes, "FLAGS", (*modes.FLAGS, "mean_layers"))


def expected(lm, prompt: list[int], n: int, layers) -> list[int]:
    """The definition, by full passes over the sequence so far (no cache, no engine)."""
    ids = list(prompt)
    for _ in range(n):
        _, states = lm.model.forward(torch.tensor([ids]), list(layers))
        hidden = [states[layer][:, -1] for layer in layers]
        out = lm.model.exit_stage(hidden, list(layers), with_logprobs=True)
        ids.append(int(out.logprobs.mean(0).argmax(-1)))
    return ids[len(prompt):]


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_registered_mode_runs_everywhere(tiny_checkpoint, registered, engine):
    lm = mexit.load(tiny_checkpoint[0], engine=engine)
    prompts = [[5, 17, 200], [9]]
    out = lm.generate(prompts, 6, mode="mean-exits:1,3", eos_token_id=None)
    assert out.tokens == [expected(lm, p, 6, (1, 3)) for p in prompts]
    assert out.engine == engine
    one = lm.generate(prompts, 6, mode="mean-exits:2", eos_token_id=None).tokens
    assert one == lm.generate(prompts, 6, mode="exit:2", eos_token_id=None).tokens  # one exit: that exit's head
    with pytest.raises(ValueError, match=r"mode 'mean-exits:1,9': exits \[9\] are not in this checkpoint"):
        lm.generate(prompts, 2, mode="mean-exits:1,9")
    with pytest.raises(ValueError, match="unknown mode 'mean-exits:x'; use original, .*, mean-exits:L1,L2,..."):
        lm.generate(prompts, 2, mode="mean-exits:x")


def test_an_entry_finds_its_module_inside_mexit_or_by_full_name():
    assert modes.entry("dola").mode.__module__ == "mexit.decoding.dola"
    assert ENTRY.mode is MeanOfExitsMode
    dotted = dataclasses.replace(ENTRY, module="json.decoder", settings_class="JSONDecoder")  # a package's module
    assert dotted.settings.__module__ == "json.decoder"


def test_a_registered_mode_reaches_the_cli(tiny_checkpoint, registered, capsys, monkeypatch):
    """--mode takes its string (no parser change: a flag of its own is optional), and the registry's checks name
    flags of other modes and what the bare name lacks."""
    base = ["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200", "--max-new-tokens", "4",
            "--no-eos", "--json"]
    assert main([*base, "--mode", "mean-exits:1,3"]) == 0
    lm = mexit.load(tiny_checkpoint[0])
    assert json.loads(capsys.readouterr().out)["tokens"] == [expected(lm, [5, 17, 200], 4, (1, 3))]
    assert main([*base, "--mode", "mean-exits:1,3", "--threshold", "0.5"]) == 2
    assert "--threshold applies to --mode early-exit, not --mode mean-exits" in capsys.readouterr().err
    assert main([*base, "--mode", "mean-exits"]) == 2
    assert "--mode mean-exits needs --mean-layers (or write it as mean-exits:L1,L2,...)" in capsys.readouterr().err
