"""One registry of modes: each mode's user name, its settings class and mode class, its form in the mode
mini-language, its flags, and (`check`) its check against a checkpoint. The front ends turn user words into settings
here (`MultiExitLM.generate(mode=...)`, the CLI's `--mode` and its flags by `from_flags`, the `--modes` of
`mexit bench` / `mexit ablate` and the bench scripts), and `build` turns settings into the mode object the loop runs.
Adding a mode: its module (a settings class with `check(config)` and a `Mode`), one `Entry` below, its test
(tests/test_adding_a_mode.py shows one).

The mini-language: `original`, `exit:L`, `contrast:UPPER,LOWER` (UPPER may be `original`),
`dola:low|high|L1,L2[:exit]`, `early-exit:MEASURE:THRESHOLD[:L1,L2|all][:eager|deferred|predicated]`,
`speculative:DRAFT_EXIT:K[:THRESHOLD][@TARGET]` (of TARGET, a fixed mode's string such as `exit:12` or
`acd:24,12`; without it the original head, or the target the CLI's `--exit-layer` / `--contrast` name); the short
names `acd`, `ee` and `spec` stand for contrast, early-exit and speculative."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig

    from .step import Mode


@dataclass(frozen=True)
class Entry:
    """One mode of the registry. name: the user name (CLI `--mode`, mini-language); short: the mini-language's
    short name ("" none); module: its module in mexit.decoding (or a module's full name), holding its settings class
    and mode class (named here, imported on use: the CLI reads the names without importing torch; the settings class
    has `check(config)`, and the mode class is called with the model and the settings); form: how the mini-language
    writes it; flags: the flags its settings take (the CLI's `--flag`s by their argparse names, values as the CLI
    parses them; a flag the CLI does not declare is set by the mode string alone); needs: the one it cannot run
    without; words: the text after "name:" -> the flags it fixes (every flag the form decides, None where it leaves
    the settings' default; `Malformed` when not of the form); make: flags (those given; None: not given) ->
    settings (a settings class's ValueError when a value is out of its range)."""

    name: str
    short: str
    module: str
    settings_class: str
    mode_class: str
    form: str
    flags: tuple[str, ...]
    needs: str | None
    words: Callable[[str], dict]
    make: Callable[[dict], object]

    @property
    def settings(self) -> type:
        return getattr(self._module(), self.settings_class)

    @property
    def mode(self) -> type:
        return getattr(self._module(), self.mode_class)

    def _module(self):
        """`module` of mexit.decoding when it names one, else the module of that full name (a mode kept outside
        mexit: "mypackage.mymode", or a top-level module)."""
        inside = f"mexit.decoding.{self.module}"
        if "." not in self.module and importlib.util.find_spec(inside):
            return importlib.import_module(inside)
        return importlib.import_module(self.module)


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


def _given(flags: dict, *names: str, **renamed: str) -> dict:
    """The flags among `names` (and `renamed` flag -> field) that are set, by their settings field names."""
    pairs = [(name, name) for name in names] + [(flag, field) for field, flag in renamed.items()]
    return {field: flags[flag] for flag, field in pairs if flags.get(flag) is not None}


def _original_words(rest: str) -> dict:
    if rest:
        raise Malformed
    return {}


def _original(flags: dict):
    from .heads import DecodeConfig

    return DecodeConfig("original")


def _exit(flags: dict):
    from .heads import DecodeConfig

    return DecodeConfig("exit", exit_layer=flags["exit_layer"])


def _contrast_words(rest: str) -> dict:
    upper, lower = _parts(rest, ",", (2,))
    return {"contrast": (upper if upper == "original" else _int(upper), _int(lower))}


def _contrast(flags: dict):
    from .heads import DecodeConfig

    upper, lower = flags["contrast"]
    return DecodeConfig("contrast", upper=upper, lower=lower, **_given(flags, "alpha", "min_candidates"))


def _dola_words(rest: str) -> dict:
    layers, _, heads = rest.partition(":")
    if not layers or heads not in ("", "exit"):
        raise Malformed
    return {"dola_layers": layers if layers in ("low", "high") else _ints(layers), "dola_heads": heads or None}


def _dola(flags: dict):
    from .dola import DolaConfig

    return DolaConfig(flags["dola_layers"], **_given(flags, heads="dola_heads"))


def _early_exit_words(rest: str) -> dict:
    parts = rest.split(":")
    variant = parts.pop() if parts[-1] in ("eager", "deferred", "predicated") else "eager"
    if len(parts) not in (2, 3):
        raise Malformed
    return {"measure": parts[0], "threshold": _float(parts[1]),
            "exits": _ints(parts[2]) if len(parts) == 3 and parts[2] != "all" else None,
            "propagation": "deferred" if variant == "deferred" else None,
            "schedule": "predicated" if variant == "predicated" else None}


def _early_exit(flags: dict):
    from .early_exit import ExitPolicy

    return ExitPolicy(**_given(flags, "threshold", "measure", "exits", "min_layer", "decay_tau", "propagation",
                               "schedule", "final_head"))


def _speculative_words(rest: str) -> dict:
    rest, at, target = rest.partition("@")
    parts = _parts(rest, ":", (2, 3))
    words = {"draft_exit": _int(parts[0]), "draft_len": _int(parts[1]),
             "draft_threshold": _float(parts[2]) if len(parts) == 3 else None}
    if at:  # @TARGET: a fixed mode's string; without it the target's flags stay open (default: the original head)
        kind, _, target_rest = target.partition(":")
        found = entry(kind) if kind in FIXED_NAMES else None
        if found is None:
            raise Malformed
        words.update(found.words(target_rest))
    return words


def _speculative(flags: dict):
    from .speculative import Speculation, SpeculativeConfig

    if flags.get("exit_layer") is not None and flags.get("contrast") is not None:
        raise ValueError("speculative decoding verifies one target: pass --exit-layer or --contrast, not both")
    if flags.get("contrast") is None and _given(flags, "alpha", "min_candidates"):
        raise ValueError("--alpha and --min-candidates apply to ACD (--contrast)")
    target = (_contrast(flags) if flags.get("contrast") is not None else
              _exit(flags) if flags.get("exit_layer") is not None else _original(flags))
    spec = SpeculativeConfig(**_given(flags, "draft_exit", "draft_len", "draft_threshold"),
                             draft_vocab=flags.get("draft_vocab") or None)  # 0: the whole head
    return Speculation(spec, target)


_FIXED = dict(module="fixed", settings_class="DecodeConfig", mode_class="FixedMode")
MODES = (
    Entry("original", "", form="original", flags=(), needs=None, words=_original_words, make=_original, **_FIXED),
    Entry("exit", "", form="exit:L", flags=("exit_layer",), needs="exit_layer",
          words=lambda rest: {"exit_layer": _int(rest)}, make=_exit, **_FIXED),
    Entry("contrast", "acd", form="contrast:UPPER,LOWER", flags=("contrast", "alpha", "min_candidates"),
          needs="contrast", words=_contrast_words, make=_contrast, **_FIXED),
    Entry("dola", "", "dola", "DolaConfig", "DolaMode", "dola:low|high|L1,L2[:exit]", ("dola_layers", "dola_heads"),
          "dola_layers", _dola_words, _dola),
    Entry("early-exit", "ee", "early_exit", "ExitPolicy", "EarlyExit",
          "early-exit:MEASURE:THRESHOLD[:L1,L2|all][:eager|deferred|predicated]",
          ("threshold", "measure", "exits", "min_layer", "decay_tau", "propagation", "schedule", "final_head"),
          "threshold",
          _early_exit_words, _early_exit),
    Entry("speculative", "spec", "speculative", "Speculation", "Speculative",
          "speculative:DRAFT_EXIT:K[:THRESHOLD][@TARGET]",
          ("draft_exit", "draft_len", "draft_threshold", "draft_vocab", "exit_layer", "contrast", "alpha",
           "min_candidates"), "draft_exit", _speculative_words, _speculative),
)
NAMES = tuple(entry.name for entry in MODES)
FIXED_NAMES = ("original", "exit", "contrast", "acd")  # the modes speculative decoding verifies (a target)
SHORT_NAMES = tuple(entry.short for entry in MODES if entry.short)
FLAGS = tuple(dict.fromkeys(flag for entry in MODES for flag in entry.flags))  # every mode's flags, once each


def form(name: str) -> str:
    """The mini-language form of the mode called `name` (its name or short name)."""
    return entry(name).form


def entry(name: str) -> Entry:
    """The entry of a mode's name or short name (KeyError: none)."""
    found = next((e for e in MODES if name in (e.name, e.short) and name), None)
    if found is None:
        raise KeyError(name)
    return found


def from_flags(mode: str, flags: dict) -> tuple[str, object]:
    """The CLI's mode: `mode` is a mode's name, with its settings from the flags ({flag: value}, None: not given),
    or a mode string, with the flags of its mode it leaves open (`--mode acd:24,12 --alpha 0.2`). Returns (the
    mode's name, its settings). Errors (ValueError, naming the flag): a flag of another mode, a flag the string
    fixes, the one flag the mode needs missing, values its settings refuse."""
    text = mode if ":" in mode else None
    name, fixed = parse_words(text) if text is not None else (entry(mode).name, {})
    found = entry(name)
    given = {flag: value for flag, value in flags.items() if value is not None}
    foreign = [flag for flag in given if flag not in found.flags]
    if foreign:
        owners = " or ".join(e.name for e in MODES if foreign[0] in e.flags)
        raise ValueError(f"{_flag(foreign[0])} applies to --mode {owners}, not --mode {name}")
    twice = [flag for flag in given if flag in fixed]
    if twice:
        raise ValueError(f"--mode {text} carries its settings: do not pass {_flag(twice[0])} too")
    given.update(fixed)
    if found.needs is not None and given.get(found.needs) is None:
        raise ValueError(f"--mode {name} needs {_flag(found.needs)} (or write it as {found.form})")
    try:
        return name, found.make(given)
    except ValueError as err:  # a value its settings refuse
        raise ValueError(f"mode {text!r}: {err}" if text is not None else str(err)) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_words(text: str) -> tuple[str, dict]:
    """A mode string -> its mode's name and the flags it fixes (ValueError: unknown or malformed, naming every
    form)."""
    kind, _, rest = text.partition(":")
    try:
        mode = entry(kind)
        return mode.name, mode.words(rest)
    except (KeyError, Malformed):
        forms = ", ".join(e.form for e in MODES)
        shorts = ", ".join(f"{e.short} = {e.name}" for e in MODES if e.short)
        raise ValueError(f"unknown mode {text!r}; use {forms} (short names: {shorts})") from None


def settings_classes() -> tuple[type, ...]:
    """The settings classes, once each."""
    return tuple(dict.fromkeys(entry.settings for entry in MODES))


def parse(text: str, config: ModelConfig | None = None):
    """A mode string of the mini-language -> its settings, checked against `config` when given. Errors
    (ValueError): an unknown or malformed string (naming every form), settings the checkpoint cannot run."""
    name, flags = parse_words(text)
    try:
        settings = entry(name).make(flags)
        if config is not None:
            check(settings, config)
    except ValueError as err:  # a value its settings or the checkpoint refuse
        raise ValueError(f"mode {text!r}: {err}") from None
    return settings


def check(settings, config: ModelConfig) -> None:
    """Settings against a checkpoint's config (its exits and depth): each settings class's `check(config)`;
    ValueError when the checkpoint cannot run them. The learned measure's predictors and a draft vocabulary's token
    counts are checked where the mode is built."""
    if not isinstance(settings, settings_classes()):
        raise TypeError(unknown(settings))
    settings.check(config)


def build(model, settings) -> Mode:
    """The mode object of `settings` (one of `settings_classes()`) on `model`, checked against the checkpoint. A
    field of `settings` that is itself a mode's settings (speculative decoding's target) is built first and passed
    to the mode class by its field name."""
    entry = next((e for e in MODES if isinstance(settings, e.settings)), None)
    if entry is None:
        raise TypeError(unknown(settings))
    inner = {f.name: build(model, getattr(settings, f.name)) for f in dataclasses.fields(settings)
             if isinstance(getattr(settings, f.name), settings_classes())}
    return entry.mode(model, settings, **inner)


def unknown(settings) -> str:
    return (f"unknown mode settings {type(settings).__name__}; use one of "
            f"{[cls.__name__ for cls in settings_classes()]}")
