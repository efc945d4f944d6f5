"""The mode registry (mexit/decoding/modes.py): every mode's string of the mini-language gives its settings and mode
class, runs through `MultiExitLM.generate(mode=...)` to the same tokens as its keywords, and bad strings fail by
name."""

import pytest

import mexit
from mexit.decoding import modes
from mexit.decoding.dola import DolaConfig
from mexit.decoding.early_exit import ExitPolicy
from mexit.decoding.fixed import DecodeConfig
from mexit.decoding.speculative import Speculation, SpeculativeConfig

# (mode string, the keywords of the same mode)
SAME = [
    ("original", {}),
    ("exit:2", dict(exit_layer=2)),
    ("contrast:4,1", dict(contrast=(4, 1))),
    ("acd:original,2", dict(contrast=("original", 2))),
    ("dola:low", dict(dola_layers="low")),
    ("dola:2,3:exit", dict(dola_layers=[2, 3], dola_heads="exit")),
    ("early-exit:max-prob:0.2", dict(early_exit=ExitPolicy(0.2))),
    ("ee:cosine:0.5:1,2:deferred", dict(early_exit=ExitPolicy(0.5, measure="cosine", exits=(1, 2),
                                                              propagation="deferred"))),
    ("ee:learned:0.6:all", dict(early_exit=ExitPolicy(0.6, measure="learned"))),
    ("spec:2:3", dict(speculative=SpeculativeConfig(2, 3))),
    ("speculative:1:2:0.4", dict(speculative=SpeculativeConfig(1, 2, 0.4))),
    ("spec:1:2@acd:4,2", dict(speculative=SpeculativeConfig(1, 2), contrast=(4, 2))),
    ("spec:1:2:0.4@exit:3", dict(speculative=SpeculativeConfig(1, 2, 0.4), exit_layer=3)),
]


@pytest.mark.parametrize("text,keywords", SAME)
def test_a_mode_string_equals_its_keywords(tiny_checkpoint, text, keywords):
    lm = mexit.load(tiny_checkpoint[0])
    settings = modes.parse(text, lm.config)
    entry = next(e for e in modes.MODES if text.partition(":")[0] in (e.name, e.short))
    assert isinstance(settings, entry.settings)
    mode = modes.build(lm.model, settings)
    assert type(mode) is entry.mode and mode.settings == settings
    by_string = lm.generate([[5, 17, 200], [9]], 6, mode=text, eos_token_id=None)
    by_settings = lm.generate([[5, 17, 200], [9]], 6, mode=settings, eos_token_id=None)
    by_keywords = lm.generate([[5, 17, 200], [9]], 6, eos_token_id=None, **keywords)
    assert by_string.tokens == by_keywords.tokens == by_settings.tokens
    assert by_string.exit_layers == by_keywords.exit_layers


def test_each_entry_is_one_mode_with_its_own_names():
    names = [name for e in modes.MODES for name in (e.name, e.short) if name]
    assert len(names) == len(set(names))
    assert set(modes.settings_classes()) == {DecodeConfig, DolaConfig, ExitPolicy, Speculation}
    assert all(e.form.partition(":")[0] == e.name for e in modes.MODES)


@pytest.mark.parametrize("text,message", [
    ("beam:4", "unknown mode 'beam:4'; use original, exit:L"),
    ("exit:x", "unknown mode 'exit:x'"),
    ("original:2", "unknown mode 'original:2'"),
    ("acd:4", "unknown mode 'acd:4'"),
    ("ee:max-prob", "unknown mode 'ee:max-prob'"),
    ("exit:7", "mode 'exit:7': exit layer 7 is not in this checkpoint"),
    ("acd:1,3", "mode 'acd:1,3': contrast upper layer 1 must be above the lower layer 3"),
    ("ee:max-prob:1.5", r"mode 'ee:max-prob:1.5': threshold for max-prob must be in \[0, 1\]"),
    ("ee:sharpness:0.5", "unknown confidence measure 'sharpness'"),
    ("spec:4:2", "draft exit 4 must sit below the target's depth"),
    ("dola:9", "mode 'dola:9'"),
    ("", "unknown mode ''"),
    (":", "unknown mode ':'"),
])
def test_bad_strings_fail_by_name(tiny_checkpoint, text, message):
    config = mexit.load(tiny_checkpoint[0]).config
    with pytest.raises(ValueError, match=message):
        modes.parse(text, config)


def test_a_mode_string_takes_no_other_mode_argument(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    with pytest.raises(ValueError, match="do not combine it with exit_layer"):
        lm.generate([[1]], 2, mode="ee:max-prob:0.5", exit_layer=2)
    with pytest.raises(ValueError, match="alpha and min_candidates apply to a contrast mode string"):
        lm.generate([[1]], 2, mode="exit:2", alpha=0.3)
    with pytest.raises(ValueError, match="verifies a fixed mode"):
        lm.generate([[1]], 2, mode="dola:low", speculative=SpeculativeConfig(2, 1))
    acd = lm.generate([[1, 2]], 4, mode="acd:4,1", alpha=0.3, eos_token_id=None).tokens
    assert acd == lm.generate([[1, 2]], 4, contrast=(4, 1), alpha=0.3, eos_token_id=None).tokens
    with pytest.raises(TypeError, match="unknown mode settings int"):
        modes.build(lm.model, 3)
    with pytest.raises(ValueError, match="do not combine it with dola_heads"):
        lm.generate([[1]], 2, mode="dola:high", dola_heads="exit")
    with pytest.raises(ValueError, match="takes its settings: write it as dola:low"):
        lm.generate([[1]], 2, mode="dola")
    with pytest.raises(ValueError, match="mode is empty"):
        lm.generate([[1]], 2, mode="")
    with pytest.raises(ValueError, match="a DecodeConfig carries its own"):  # not silently replaced
        lm.generate([[1]], 2, mode=DecodeConfig("contrast", upper=4, lower=1, alpha=0.5), alpha=0.3)
    kept = lm.generate([[1, 2]], 4, mode=DecodeConfig("contrast", upper=4, lower=1, alpha=0.5, min_candidates=3),
                       eos_token_id=None).tokens
    assert kept == lm.generate([[1, 2]], 4, contrast=(4, 1), alpha=0.5, min_candidates=3, eos_token_id=None).tokens
    with pytest.raises(ValueError, match="mode 'exit:7': exit layer 7 is not in this checkpoint"):
        lm.generate([[1]], 2, mode="exit:7")

