"""Every snippet the README shows runs: its Python blocks (in order, in one namespace, as a reader pastes them) and
each line of its shell blocks, except those that need a GPU, the network or a set-up of their own (listed below
with the reason). Placeholders are filled with test inputs: PATH and path/to/gpt2-medium-multiexit are a random
24-layer checkpoint with gpt2-medium-multiexit's exits (2, 4, ..., 24) and a byte-level tokenizer, FOLDER and
gpt2-folder copies of it, the shipped models are copies (commands write predictors and token counts into them),
cuda runs on the cpu, and the data files the commands name are written from the shipped prompts."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_checkpoints import make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# shell lines not run here, by what they need
NOT_RUN = {
    "python3 -m venv": "the set-up command: .ci/run runs it",
    "python -m pytest -q -n 2": "the test command: .ci/run runs it",
    "ibm-research/": "a hub download (network)",
    " ... ": "an elided command (its flags are shown on the line above)",
    "--ray": "a Ray cluster (tests/test_ray.py starts a local one for the same commands)",
    "--tasks lambada_openai": "lm-eval's hub data sets (network; tests/test_harness.py runs local tasks)",
}


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block in `language`."""
    found = re.finditer(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)
    return [(README[: m.start()].count("\n") + 1, m.group(1)) for m in found]


def shell_commands() -> list[tuple[int, str]]:
    """(line, command) of every shell line (continuations joined), comments dropped."""
    out = []
    for start, text in blocks("bash"):
        lines = text.replace("\\\n", " ").split("\n")
        for i, line in enumerate(lines):
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                out.append((start + i + 1, command))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding the placeholders' checkpoints, copies of the shipped models and the data files."""
    work = tmp_path_factory.mktemp("readme")
    model = work / "gpt2-medium-multiexit"
    make_hf_checkpoint(model, exits=tuple(range(2, 25, 2)), n_layer=24, n_positions=1024, vocab_size=50257)
    (work / "bench").mkdir()
    for name in ("small_model", "small_model_12l"):
        shutil.copytree(ROOT / "bench" / name, work / "bench" / name)
    for name in ("FOLDER", "gpt2-folder"):
        shutil.copytree(model, work / name)
    text = (ROOT / "bench" / "shakespeare_prompts.txt").read_text()
    (work / "train.txt").write_text(text * 40)
    (work / "eval.txt").write_text(text * 8)
    (work / "data.jsonl").write_text('{"prompt": "ROMEO."}\n{"prompt": "The capital of France is", "id": "b"}\n')
    (work / "few_prompts.txt").write_text("".join(text.splitlines(keepends=True)[:3]))  # the ablations' prompts
    return work


# commands that train or sweep run shorter here (an ablation: 3 prompts): the README's flags, then these (the last
# value of a flag wins); the benchmark suite runs one decode call of its own folder
SHORTER = {"mexit ablate": " --max-new-tokens 4 --repeats 2 --prompts few_prompts.txt",
           "mexit train-exit-predictors": " --steps 10",
           "mexit train-heads --model": " --epochs 0.002 --batch-size 2 --seq-len 128"}
SUITE = ("python -m pytest bench ", f"python -m pytest {ROOT / 'bench' / 'bench_decode.py'} -k 'original and 1' ")
# two 5-round CPU runs on a busy 2-core machine differ by more than 10%: the README's own threshold would be noise
LOOSER = ("--benchmark-compare-fail=median:10%", "--benchmark-compare-fail=median:300%")


def fill(command: str, work: Path) -> str:
    command = re.sub(r"\bPATH\b", str(work / "gpt2-medium-multiexit"), command)
    return command.replace("path/to/gpt2-medium-multiexit", str(work / "gpt2-medium-multiexit"))


def test_every_readme_python_block_runs(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    python = blocks("python")
    assert len(python) >= 4
    for line, text in python:
        code = fill(text, workdir).replace('device="cuda"', 'device="cpu"')
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - the README line and the error are the finding
            pytest.fail(f"README.md block at line {line}: {type(err).__name__}: {err}")


COMMANDS = shell_commands()


@pytest.mark.parametrize("line,command", COMMANDS, ids=[str(line) for line, _ in COMMANDS])
def test_every_readme_shell_command_runs(workdir, line, command):
    skipped = next((why for key, why in NOT_RUN.items() if key in command), None)
    if skipped:
        pytest.skip(f"README.md:{line} needs {skipped}")
    command = fill(command, workdir).replace(*SUITE).replace(*LOOSER)
    command += next((extra for key, extra in SHORTER.items() if command.startswith(key)), "")
    assert command.split()[0] in ("mexit", "python"), f"README.md:{line}: an unexpected command"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not this run's xdist worker
    env.update(PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    done = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

def test_the_skips_are_few_and_named():
    """What is not run is a short, named list: set-up, network, elided and cluster lines."""
    skipped = [c for _, c in COMMANDS if any(key in c for key in NOT_RUN)]
    assert len(skipped) <= 8 and len(COMMANDS) - len(skipped) >= 15


def test_ci_runs_exactly_the_readme_set_up_commands():
    """.ci/run's two commands are the README's first two shell blocks, character for character."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [text.strip() for _, text in blocks("bash")[:2]]
