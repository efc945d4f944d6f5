"""Generation over a data set: a prompts file in, one JSON line per prompt out, in input order, batched and
resumable (`mexit generate --prompts-file`).

Input: a text file with one prompt per line, or JSONL with one object per line holding "prompt" (text) or
"input_ids" (token ids) and optionally "id". Output: JSONL, one object per prompt with its index, id, prompt,
tokens (and text, exit layers, drafted flags where the mode has them), written as each batch finishes. A rerun
skips the prompts the file already holds. Sampled runs give row i the seed `seed + i`, so a prompt gets the same
tokens whatever the batch size, the resume point or the machine. `mexit.frontends.cluster.generate_file_on_ray`
spreads the same over a Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

from mexit.values import read_text


def read_prompt_file(path) -> list[dict]:
    """[{"index", "prompt" | "input_ids", "id"?}] from a text file (one prompt per line) or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} holds no prompt")
    if path.suffix != ".jsonl":
        return [{"index": i, "prompt": line.strip()} for i, line in enumerate(lines)]
    records = []
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {i + 1} is not JSON: {err.msg}") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("input_ids" in item):
            raise ValueError(f"{path} line {i + 1}: an object with either \"prompt\" or \"input_ids\"")
        record = {"index": i, **{k: item[k] for k in ("id", "prompt", "input_ids") if k in item}}
        records.append(record)
    return records


def finished_indices(out: Path, records: list[dict]) -> set[int]:
    """Indices an earlier run already wrote to `out` (each checked against this prompts file)."""
    if not out.exists():
        return set()
    done = set()
    for n, line in enumerate(out.read_text().splitlines()):
        row = json.loads(line)
        i = row.get("index")
        if not isinstance(i, int) or i >= len(records) or any(row.get(k) != records[i].get(k)
                                                              for k in ("prompt", "input_ids", "id")):
            raise ValueError(f"{out} line {n + 1} does not belong to this prompts file: use another --out")
        done.add(i)
    return done


def generate_rows(lm, records: list[dict], seed: int | None, **generate_kw) -> list[dict]:
    """One generate call for `records` (read_prompt_file's); each output row is its record plus tokens (and text,
    exit layers, drafted flags where the mode has them). Sampled: row i samples with seed + i (and says so)."""
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
        if sampling:
            row["seed"] = seeds[b]
        rows.append(row)
    return rows


def new_seed(records: list[dict]) -> int:
    """A base seed for a sampled run given none: seed + i stays a valid seed for every row i."""
    import torch

    return int(torch.randint(2**31 - 1 - len(records), ()))


def write_rows(rows, out: Path, total: int, done: int, progress: bool) -> None:
    """Append rows (an iterable of lists of rows, as they finish) to `out` as JSON lines, with a progress bar; the
    file is opened at the first row (a run that fails before it leaves no file)."""
    from tqdm import tqdm

    f = None
    try:
        with tqdm(total=total, initial=done, desc="generate", unit="prompt", disable=not progress) as bar:
            for batch in rows:
                if f is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    f = open(out, "a")
                for row in batch:
                    f.write(json.dumps(row, allow_nan=False) + "\n")
                f.flush()
                bar.update(len(batch))
    finally:
        if f is not None:
            f.close()


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


def generate_file(lm, prompts_file, out, batch: int = 8, seed: int | None = None, progress: bool = True,
                  **generate_kw) -> dict:
    """Generate for every prompt of `prompts_file` into `out` (JSONL), `batch` prompts per call; generate_kw go to
    `lm.generate` (mode, lengths, sampling). Returns {"prompts", "skipped", "written", "seed"}."""
    records, done, seed = open_output(prompts_file, out, batch, seed)
    sampling = generate_kw.get("do_sample") or lm.defaults.get("do_sample")
    if sampling and seed is None:
        seed = new_seed(records)
    todo = [r for r in records if r["index"] not in done]
    batches = (generate_rows(lm, todo[i: i + batch], seed, **generate_kw) for i in range(0, len(todo), batch))
    write_rows(batches, Path(out), len(records), len(done), progress)
    return {"prompts": len(records), "skipped": len(done), "written": len(todo), "seed": seed}


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
