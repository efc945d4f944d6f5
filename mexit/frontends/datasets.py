"""Generation over a data set: a prompts file in, one JSON line per prompt out, in input order, batched and
resumable (`mexit generate --prompts-file`).

Input: a text file with one prompt per line, or JSONL with one object per line holding "prompt" (text) or
"input_ids" (token ids) and optionally "id". Output: JSONL, one object per prompt with its index, id, prompt,
tokens (and text, exit layers, drafted flags, DoLa's premature layers where the mode has them), written as each
batch finishes. A rerun skips the prompts the file already holds. Sampled runs give row i the seed `seed + i`, so
a prompt gets the same tokens whatever the batch size, the resume point or the machine.
`mexit.frontends.cluster.generate_file_on_ray` spreads the same over a Ray cluster."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from mexit.values import plain, read_text


def read_prompt_file(path) -> list[dict]:
    """[{"index", "line", "prompt" | "input_ids", "id"?}] of a prompts file. JSON lines when the file is named
    .jsonl or every non-empty line is a JSON object (one object per line with "prompt" (text) or "input_ids", and
    optionally "id"); otherwise text: one prompt per line exactly as written (only the line end removed; an empty
    line is not a prompt). "line" is the 1-based line number. ValueError naming the line for a bad JSON line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [(n + 1, line) for n, line in enumerate(read_text(path).split("\n")) if line != ""]
    if not lines:
        raise ValueError(f"prompts file {path} holds no prompt")
    if path.suffix != ".jsonl" and not all(isinstance(_json(line), dict) for _, line in lines):
        return [{"index": i, "line": n, "prompt": line} for i, (n, line) in enumerate(lines)]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            item = json.loads(line, parse_constant=_refuse_constant)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n} is not JSON: {err.msg}") from None
        except ValueError as err:
            raise ValueError(f"{path} line {n} is not strict JSON: {err}") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("input_ids" in item):
            raise ValueError(f"{path} line {n}: an object with either \"prompt\" or \"input_ids\"")
        if "prompt" in item and not isinstance(item["prompt"], str):
            raise ValueError(f"{path} line {n}: \"prompt\" is text (a JSON string), got {json.dumps(item['prompt'])}")
        ids = item.get("input_ids", [])
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise ValueError(f"{path} line {n}: \"input_ids\" is one list of integer token ids, got "
                             f"{json.dumps(ids)[:80]}")
        records.append({"index": i, "line": n, **{k: item[k] for k in ("id", "prompt", "input_ids") if k in item}})
    return records


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _json(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def new_tokens(generate_kw: dict, defaults: dict) -> tuple[int | None, int | None]:
    """(max_new_tokens, max_length) as `generate` resolves them: the argument, else generation_config.json's
    max_new_tokens, else its max_length (then max_new_tokens is None: the prompt's length decides), else mexit's
    default."""
    from mexit.model.generation_config import DEFAULT_MAX_NEW_TOKENS

    if generate_kw.get("max_new_tokens") is not None:
        return generate_kw["max_new_tokens"], None
    if defaults.get("max_new_tokens") is not None:
        return defaults["max_new_tokens"], None
    if defaults.get("max_length") is not None:
        return None, defaults["max_length"]
    return DEFAULT_MAX_NEW_TOKENS, None


def bad_prompts(records: list[dict], encode, config, max_new_tokens: int | None,
                max_length: int | None = None) -> dict[int, str]:
    """{index: why} for the records that cannot run: text that tokenizes to nothing, ids that are not token ids of
    the model, a prompt that with its new tokens (max_new_tokens, or up to max_length) exceeds the context. Every
    prompt is checked (tokenized) before any generation."""
    from mexit.decoding.prompts import check_prompts

    bad = {}
    for r in records:
        try:
            ids = encode(r["prompt"]) if "prompt" in r else r["input_ids"]
            if not isinstance(ids, list):
                raise ValueError("input_ids must be a list of token ids")
            n = max_new_tokens
            if n is None and max_length is not None:
                n = max_length - len(ids)
                if n < 1:
                    raise ValueError(f"the prompt's {len(ids)} tokens leave no room under generation_config.json's "
                                     f"max_length {max_length}")
            check_prompts([ids], config, n)
        except ValueError as err:
            bad[r["index"]] = " ".join(str(err).split())
    return bad


SKIP_BAD = "--skip-bad-prompts records them as rows with \"error\" and generates the others"


def refuse_bad_prompts(path, records: list[dict], bad: dict[int, str], remedy: str = SKIP_BAD) -> None:
    """ValueError naming the first five bad prompts by line, and the remedy."""
    lines = {r["index"]: r["line"] for r in records}
    listed = "; ".join(f"line {lines[i]}: {why}" for i, why in list(bad.items())[:5])
    raise ValueError(f"{path}: {len(bad)} prompt(s) cannot run, nothing was generated: {listed}"
                     f"{' ...' if len(bad) > 5 else ''} ({remedy})")


def complete_lines(out: Path, redo: str) -> str:
    """The text of a JSON-lines file an earlier run wrote, without a partial last line (a write cut short by a kill,
    an out-of-memory or a full disk: every row is written with its line end), which is dropped from the file with a
    warning ending in `redo`."""
    text = out.read_text()
    if text and not text.endswith("\n"):
        keep = text[: text.rfind("\n") + 1]
        if all(_json(line) is not None for line in keep.splitlines()):  # else not our file: the caller refuses it
            warnings.warn(f"{out}: dropped a partial last line (an interrupted write); {redo}", stacklevel=3)
            out.write_text(keep)
            text = keep
    return text


def finished_indices(out: Path, records: list[dict]) -> set[int]:
    """Indices an earlier run already wrote to `out` (each checked against this prompts file). A partial last line
    (a write cut short by a kill, an out-of-memory or a full disk) is dropped from the file, with a warning: its
    prompt is generated again."""
    if not out.exists():
        return set()
    text = complete_lines(out, "its prompt is generated again")
    done = set()
    for n, line in enumerate(text.splitlines()):
        row = _json(line)
        if not isinstance(row, dict):
            raise ValueError(f"{out} line {n + 1} is not a JSON object: not a file this command wrote; use another "
                             "--out")
        i = row.get("index")
        if not isinstance(i, int) or i >= len(records) or any(row.get(k) != records[i].get(k)
                                                              for k in ("prompt", "input_ids", "id")):
            raise ValueError(f"{out} line {n + 1} does not belong to this prompts file: use another --out")
        done.add(i)
    return done


def settings_path(out) -> Path:
    """The file beside `out` that records the settings its rows were generated with."""
    out = Path(out)
    return out.with_name(out.name + ".settings.json")


RECORD = 3  # the form of run_settings' record (2: the mode's settings whole, from the mode registry; 3: arguments
# given as None kept, e.g. eos_token_id None: no stop id)
MISSING = object()


def run_settings(model, dtype, generate_kw: dict, defaults: dict) -> dict:
    """What decides a data-set run's rows, as plain JSON: the model, the dtype, the generate arguments (mode,
    lengths, sampling; settings dataclasses as their fields), the checkpoint's generation_config.json defaults that
    fill the arguments left out (stop ids, sampling); the versions ride along (not compared)."""
    from mexit.version import dependency_versions

    def plain_json(value):
        if dataclasses.is_dataclass(value):
            return {"type": type(value).__name__, **{k: plain_json(v) for k, v in dataclasses.asdict(value).items()}}
        value = plain(value)
        return list(map(plain_json, value)) if isinstance(value, (list, tuple)) else value

    model = str(Path(model).resolve()) if Path(str(model)).is_dir() else str(model)  # one name, whatever the cwd
    return {"model": model, "dtype": str(dtype).removeprefix("torch."),
            "generate": {k: plain_json(v) for k, v in sorted(generate_kw.items())},
            "defaults": {k: plain_json(v) for k, v in sorted(defaults.items())},
            "versions": dependency_versions(), "record": RECORD}


def shown(generate: dict, key: str) -> str:
    """A recorded generate argument as the refusal names it."""
    return f"{key}={generate[key]!r}" if key in generate else f"{key} left to its default"


def check_settings(out, settings: dict, resuming: bool) -> None:
    """Refuse to add rows to `out` under other settings than its rows were written with (named), or when its rows'
    settings are unknown (its record is missing); a new file gets the record."""
    path = settings_path(out)
    if resuming and not path.exists():
        raise ValueError(f"{out} has rows but no settings record ({path.name}): the settings its rows were written "
                         "with are unknown; restore the record or write to another --out")
    if resuming:
        earlier = json.loads(path.read_text())
        if earlier.get("record") != settings.get("record"):
            raise ValueError(f"{out}'s settings were recorded by an earlier mexit, in another form (record "
                             f"{earlier.get('record', 1)}, now {settings.get('record')}): resume it with that mexit, "
                             "or write to another --out")
        for key in ("model", "dtype", "generate", "defaults"):
            if key == "defaults" and key not in earlier:  # recorded before the defaults were
                continue
            old, new = earlier.get(key), settings[key]
            if key == "generate":
                old = old or {}
                changed = sorted(k for k in set(old) | set(new) if old.get(k, MISSING) != new.get(k, MISSING))
                if changed:
                    k = changed[0]
                    raise ValueError(f"{out} was written with {shown(old, k)}, this run asks {shown(new, k)} "
                                     f"({len(changed)} setting(s) differ: {', '.join(changed)}): rerun with the "
                                     "settings of its rows or write to another --out")
            elif key == "defaults" and old != new:
                raise ValueError(f"{out} was written under the checkpoint's generation_config.json defaults {old}, "
                                 f"which are now {new}: restore the file's values or write to another --out")
            elif old != new:
                raise ValueError(f"{out} was written with {key} {old!r}, this run has {new!r}: rerun with the "
                                 "settings of its rows or write to another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1, allow_nan=False) + "\n")


def generate_rows(lm, records: list[dict], seed: int | None, **generate_kw) -> list[dict]:
    """One generate call for `records` (read_prompt_file's); each output row is its record plus tokens (and text,
    exit layers, drafted flags, premature layers where the mode has them). Sampled: row i samples with seed + i (and
    says so)."""
    sampling = generate_kw.get("do_sample") or lm.defaults.get("do_sample")
    prompts = [r["prompt"] if "prompt" in r else r["input_ids"] for r in records]
    if len({"prompt" in r for r in records}) > 1:  # text and ids in one batch: ids for all
        prompts = [lm.encode(p)[0] if isinstance(p, str) else p for p in prompts]
    seeds = [seed + r["index"] for r in records] if sampling else None
    result = lm.generate(prompts, seed=seeds, **generate_kw)
    rows = []
    for b, r in enumerate(records):
        row = dict(r, tokens=result.tokens[b])
        if result.text is not None:
            row["text"] = result.text[b]
        if result.exit_layers is not None:
            row["exit_layers"] = result.exit_layers[b]
        if result.drafted is not None:
            row["drafted"] = result.drafted[b]
        if result.premature_layers is not None:
            row["premature_layers"] = result.premature_layers[b]
        if sampling:
            row["seed"] = seeds[b]
        rows.append(row)
    return rows


def new_seed(records: list[dict]) -> int:
    """A base seed for a sampled run given none: seed + i stays a valid seed for every row i."""
    import torch

    return int(torch.randint(2**31 - 1 - len(records), ()))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a data-set run; its message says what was saved and how to resume."""


def write_rows(rows, out: Path, total: int, done: int, progress: bool) -> int:
    """Append rows (an iterable of lists of rows, as they finish) to `out` as JSON lines, with a progress bar; the
    file is opened at the first row (a run that fails before it leaves no file). Returns the rows written; Ctrl-C
    raises `Interrupted` saying how many were saved."""
    from tqdm import tqdm

    f, written = None, 0
    try:
        with tqdm(total=total, initial=done, desc="generate", unit="prompt", disable=not progress) as bar:
            for batch in rows:
                if f is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    f = open(out, "a")
                for row in batch:
                    f.write(json.dumps(row, allow_nan=False) + "\n")
                f.flush()
                written += len(batch)
                bar.update(len(batch))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {written} new row(s) saved in {out} ({done + written} of {total} prompts "
                          "done); rerun the same command to resume") from None
    finally:
        if f is not None:
            f.close()
    return written


def with_error_rows(batches, todo: list[dict], bad: dict[int, str]):
    """The generated batches with a row {record..., "error"} for every bad prompt, in input order."""
    errors = [dict(r, error=bad[r["index"]]) for r in todo if r["index"] in bad]
    for rows in batches:
        last = rows[-1]["index"]
        now, errors = [e for e in errors if e["index"] < last], [e for e in errors if e["index"] >= last]
        yield sorted(rows + now, key=lambda row: row["index"])
    if errors:
        yield errors


def open_output(prompts_file, out, batch: int, seed: int | None) -> tuple[list[dict], set[int], int | None]:
    """(records, indices already in `out`, seed): a resumed sampled run keeps the base seed its rows were drawn
    with (ValueError if another --seed is given), so its remaining rows are what an uninterrupted run writes."""
    records = read_prompt_file(prompts_file)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    out = Path(out)
    done = finished_indices(out, records)
    earlier = {row["seed"] - row["index"] for row in map(json.loads, out.read_text().splitlines()) if "seed" in row} \
        if done else set()
    if earlier:
        if seed is not None and {seed} != earlier:
            raise ValueError(f"{out} was sampled with seed {min(earlier)} + row index; resume it with that --seed "
                             "or write to another --out")
        seed = min(earlier)
    return records, done, seed


def checked_todo(prompts_file, out, records: list[dict], done: set[int], encode, config, settings: dict,
                 skip_bad: bool, max_length: int | None = None) -> tuple[list[dict], dict[int, str]]:
    """(prompts still to do, {index: why} of the bad ones among them) once every prompt left is checked against
    the model (refused by line unless skip_bad) and the run's settings against those `out` was written with.
    settings["generate"]["max_new_tokens"] is the resolved count (`new_tokens`), or absent with max_length."""
    todo = [r for r in records if r["index"] not in done]
    bad = bad_prompts(todo, encode, config, settings["generate"].get("max_new_tokens"), max_length)
    if bad and not skip_bad:
        refuse_bad_prompts(prompts_file, records, bad)
    check_settings(out, settings, resuming=bool(done))
    return todo, bad


def generate_file(lm, prompts_file, out, batch: int = 8, seed: int | None = None, progress: bool = True,
                  skip_bad: bool = False, **generate_kw) -> dict:
    """Generate for every prompt of `prompts_file` into `out` (JSONL), `batch` prompts per call; generate_kw go to
    `lm.generate` (mode, lengths, sampling). Every prompt is checked before the first batch: a bad one (empty,
    too long for the context with the new tokens, ids outside the vocabulary) is refused by line number, or with
    skip_bad written as a row holding "error". The settings are recorded beside `out` (`settings_path`) and a
    resume under other settings is refused. Returns {"prompts", "skipped", "written", "bad", "seed"}."""
    records, done, seed = open_output(prompts_file, out, batch, seed)
    n, max_length = new_tokens(generate_kw, lm.defaults)
    kw = dict(generate_kw, max_new_tokens=n)
    settings = run_settings(lm.model.folder or "RANDOM weights", lm.model.dtype, kw, lm.defaults)
    todo, bad = checked_todo(prompts_file, out, records, done, lambda text: lm.encode(text)[0], lm.config, settings,
                             skip_bad, max_length)
    sampling = generate_kw.get("do_sample") or lm.defaults.get("do_sample")
    if sampling and seed is None:
        seed = new_seed(records)
    good = [r for r in todo if r["index"] not in bad]
    batches = (generate_rows(lm, good[i: i + batch], seed, **kw) for i in range(0, len(good), batch))
    write_rows(with_error_rows(batches, todo, bad), Path(out), len(records), len(done), progress)
    return {"prompts": len(records), "skipped": len(done), "written": len(good), "bad": len(bad), "seed": seed}


class GenerateWorker:
    """A model loaded once on a worker (`mexit.frontends.cluster.generate_file_on_ray`) by `load(**load_kw)` (e.g.
    MultiExitLM.from_pretrained) with `threads` CPU threads: batches of JSON-encoded records in, JSON-encoded rows
    out, in the same order. A user error (a missing checkpoint, a bad setting) comes back as rows holding "error",
    for the driver to raise."""

    def __init__(self, load, load_kw: dict, seed: int, generate_kw: dict, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.seed, self.generate_kw = seed, generate_kw
        try:
            self.lm, self.error = load(**load_kw), None
        except (ValueError, OSError, NotImplementedError, RuntimeError) as err:
            self.lm, self.error = None, err

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        records = [json.loads(text) for text in batch["record"]]
        try:
            if self.error is not None:
                raise self.error
            rows = generate_rows(self.lm, records, self.seed, **self.generate_kw)
        except (ValueError, OSError, NotImplementedError, RuntimeError) as err:
            rows = [{"error": " ".join(str(err).split()) or type(err).__name__} for _ in records]
        return {"row": np.array([json.dumps(row, allow_nan=False) for row in rows], dtype=object)}
