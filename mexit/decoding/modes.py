"""One registry of modes: each mode's user name, its settings class and mode class, its form in the mode
mini-language, and (`check`) its check against a checkpoint. The front ends turn user words into settings here
(`MultiExitLM.generate(mode=...)`, the CLI's `--mode` choices, the `--modes` of `mexit bench` / `mexit ablate` and
the bench scripts), and `build` turns settings into the mode object the loop runs. Adding a mode: its module (a
settings class and a `Mode`), one `Entry` below and its branch of `check`, its test.

The mini-language: `original`, `exit:L`, `contrast:UPPER,LOWER` (UPPER may be `original`),
`dola:low|high|L1,L2[:exit]`, `early-exit:MEASURE:THRESHOLD[:L1,L2|all][:eager|deferred|predicated]`,
`speculative:DRAFT_EXIT:K[:THRESHOLD]` (of the original head); the short names `acd`, `ee` and `spec` stand for
contrast, early-exit and speculative."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig

    from .step import Mode


@dataclass(frozen=True)
class Entry:
    """One mode of the registry. name: the user name (CLI `--mode`, mini-language); short: the mini-language's
    short name ("" none);
    module: its module in mexit.decoding, holding its settings class and mode class (named here, imported on use:
    the CLI reads the names without importing torch); form: how the mini-language writes it; parse: the text after
    "name:" -> settings (`Malformed` when not of the form; a settings class's ValueError when a value is out of its
    range)."""

    name: str
    short: str
    module: str
    settings_class: str
    mode_class: str
    form: str
    parse: Callable[[str], object]

    @property
    def settings(self) -> type:
        return getattr(importlib.import_module(f"mexit.decoding.{self.module}"), self.settings_class)

    @property
    def mode(self) -> type:
        return getattr(importlib.import_module(f"mexit.decoding.{self.module}"), self.mode_class)


class Malformed(ValueError):
    """A mode string that is not of its mode's form."""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Malformed from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Malformed from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(_int(x) for x in text.split(","))


def _parts(text: str, sep: str, counts: tuple[int, ...]) -> list[str]:
    parts = text.split(sep)
    if len(parts) not in counts:
        raise Malformed
    return parts


def _original(rest: str):
    from .fixed import DecodeConfig

    if rest:
        raise Malformed
    return DecodeConfig("original")


def _exit(rest: str):
    from .fixed import DecodeConfig

    return DecodeConfig("exit", exit_layer=_int(rest))


def _contrast(rest: str):
    from .fixed import DecodeConfig

    upper, lower = _parts(rest, ",", (2,))
    return DecodeConfig("contrast", upper=upper if upper == "original" else _int(upper), lower=_int(lower))


def _dola(rest: str):
    from .dola import DolaConfig

    layers, _, heads = rest.partition(":")
    if not layers or heads not in ("", "exit"):
        raise Malformed
    return DolaConfig(layers if layers in ("low", "high") else _ints(layers), heads or "embedding")


def _early_exit(rest: str):
    from .early_exit import ExitPolicy

    parts = rest.split(":")
    variant = parts.pop() if parts[-1] in ("eager", "deferred", "predicated") else "eager"
    if len(parts) not in (2, 3):
        raise Malformed
    exits = _ints(parts[2]) if len(parts) == 3 and parts[2] != "all" else None
    return ExitPolicy(_float(parts[1]), measure=parts[0], exits=exits,
                      propagation="deferred" if variant == "deferred" else "eager",
                      schedule="predicated" if variant == "predicated" else "segments")


def _speculative(rest: str):
    from .fixed import DecodeConfig
    from .speculative import Speculation, SpeculativeConfig

    parts = _parts(rest, ":", (2, 3))
    spec = SpeculativeConfig(_int(parts[0]), _int(parts[1]), _float(parts[2]) if len(parts) == 3 else None)
    return Speculation(spec, DecodeConfig("original"))


MODES = (
    Entry("original", "", "fixed", "DecodeConfig", "FixedMode", "original", _original),
    Entry("exit", "", "fixed", "DecodeConfig", "FixedMode", "exit:L", _exit),
    Entry("contrast", "acd", "fixed", "DecodeConfig", "FixedMode", "contrast:UPPER,LOWER", _contrast),
    Entry("dola", "", "dola", "DolaConfig", "DolaMode", "dola:low|high|L1,L2[:exit]", _dola),
    Entry("early-exit", "ee", "early_exit", "ExitPolicy", "EarlyExit",
          "early-exit:MEASURE:THRESHOLD[:L1,L2|all][:eager|deferred|predicated]", _early_exit),
    Entry("speculative", "spec", "speculative", "Speculation", "Speculative", "speculative:DRAFT_EXIT:K[:THRESHOLD]",
          _speculative),
)
NAMES = tuple(entry.name for entry in MODES)
SHORT_NAMES = tuple(entry.short for entry in MODES if entry.short)


def form(name: str) -> str:
    """The mini-language form of the mode called `name` (its name or short name)."""
    return next(e.form for e in MODES if name in (e.name, e.short) and name)


def settings_classes() -> tuple[type, ...]:
    """The settings classes, once each."""
    return tuple(dict.fromkeys(entry.settings for entry in MODES))


def parse(text: str, config: ModelConfig | None = None):
    """A mode string of the mini-language -> its settings, checked against `config` when given. Errors
    (ValueError): an unknown or malformed string (naming every form), settings the checkpoint cannot run."""
    kind, _, rest = text.partition(":")
    entry = next((e for e in MODES if kind in (e.name, e.short) and kind), None)
    try:
        if entry is None:
            raise Malformed
        settings = entry.parse(rest)
        if config is not None:
            check(settings, config)
    except Malformed:
        forms = ", ".join(e.form for e in MODES)
        shorts = ", ".join(f"{e.short} = {e.name}" for e in MODES if e.short)
        raise ValueError(f"unknown mode {text!r}; use {forms} (short names: {shorts})") from None
    except ValueError as err:  # a value its settings or the checkpoint refuse
        raise ValueError(f"mode {text!r}: {err}") from None
    return settings


def check(settings, config: ModelConfig) -> None:
    """Settings against a checkpoint's config (its exits and depth); ValueError when it cannot run them. The
    learned measure's predictors and a draft vocabulary's token counts are checked where the mode is built."""
    from .dola import DolaConfig
    from .early_exit import ExitPolicy
    from .fixed import DecodeConfig
    from .speculative import Speculation

    if isinstance(settings, DecodeConfig):
        settings.validate_for(config)
    elif isinstance(settings, ExitPolicy):
        settings.checked_exits(config)
    elif isinstance(settings, DolaConfig):
        settings.candidates(config)
    elif isinstance(settings, Speculation):
        settings.target.validate_for(config)
        draft = settings.spec.draft_exit
        if draft not in config.exit_layers or draft >= config.n_layer:
            raise ValueError(f"draft exit {draft} must be one of the checkpoint's exits below the top layer "
                             f"({[e for e in config.exit_layers if e < config.n_layer]})")
    else:
        raise TypeError(unknown(settings))


def build(model, settings) -> Mode:
    """The mode object of `settings` (one of `settings_classes()`) on `model`, checked against the checkpoint."""
    entry = next((e for e in MODES if isinstance(settings, e.settings)), None)
    if entry is None:
        raise TypeError(unknown(settings))
    return entry.mode(model, settings)


def unknown(settings) -> str:
    return (f"unknown mode settings {type(settings).__name__}; use one of "
            f"{[cls.__name__ for cls in settings_classes()]}")
