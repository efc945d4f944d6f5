"""lm-eval's `mexit` model against lm-eval's own `hf` model on the same checkpoint folder, offline, on tasks defined
here (local YAML over local JSON lines): a multiple-choice task, a rolling log-likelihood task and a generation task
with stop sequences."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

import mexit  # noqa: E402
import mexit.frontends.harness  # noqa: E402,F401  (registers --model mexit)
from mexit.__main__ import main  # noqa: E402

QUESTIONS = [("The cat sat on the", [" mat", " dog", " moon"], 0), ("One, two,", [" three", " four"], 0),
             ("Red, green and", [" blue", " bread", " b"], 1), ("Hello", [" world", " there", "!"], 2),
             ("A B C", [" D", " E"], 1)]
TEXTS = ["It was a bright cold day in April.", "Call me Ishmael.", "All happy families are alike."]
PROMPTS = [("Q: 2+2=", "4"), ("The sky is", " blue"), ("Once upon", " a time"), ("abc", "d")]


def task_yaml(name: str, data, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def stop_sequence(folder) -> str:
    """A character the tiny model's greedy continuations of PROMPTS print after their first two characters: a stop
    sequence that fires."""
    from collections import Counter

    lm = mexit.load(folder)
    texts = [lm.generate(p, 12, eos_token_id=None).text[0] for p, _ in PROMPTS]
    return Counter(c for t in texts for c in t[2:] if c.isalnum()).most_common(1)[0][0]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tiny_checkpoint):
    """A folder of three tasks (tiny_mc, tiny_rolling, tiny_gen) and its TaskManager (no built-in tasks)."""
    folder = tmp_path_factory.mktemp("tasks")
    stop = stop_sequence(tiny_checkpoint[0])
    rows = {"mc": [dict(question=q, choices=c, answer=a) for q, c, a in QUESTIONS],
            "rolling": [dict(text=t) for t in TEXTS], "gen": [dict(prompt=p, answer=a) for p, a in PROMPTS]}
    for name, data in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (folder / "tiny_mc.yaml").write_text(task_yaml("tiny_mc", folder / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")))
    (folder / "tiny_rolling.yaml").write_text(task_yaml("tiny_rolling", folder / "rolling.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n")))
    (folder / "tiny_gen.yaml").write_text(task_yaml("tiny_gen", folder / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [{json.dumps(stop)}, \"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    from lm_eval.tasks import TaskManager

    return folder, TaskManager(include_path=str(folder), include_defaults=False), stop


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def evaluate(model, model_args, tasks, names, batch_size=2, **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, device="cpu",
                                   batch_size=batch_size, task_manager=tasks[1], log_samples=True,
                                   bootstrap_iters=0, **kw)


def responses(out, task: str) -> list:
    """Per document (in order), its requests' filtered responses."""
    return [s["filtered_resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_original_head_scores_equal_lm_evals_hf_model(tiny_checkpoint, tasks):
    folder = tiny_checkpoint[0]
    names = ["tiny_mc", "tiny_rolling"]
    ours = evaluate("mexit", f"pretrained={folder}", tasks, names)
    theirs = evaluate("hf", f"pretrained={folder},dtype=float32", tasks, names)
    for task in names:
        a, b = responses(ours, task), responses(theirs, task)
        flat_a = [x[0] if isinstance(x, (list, tuple)) else x for doc in a for x in doc] if task == "tiny_mc" \
            else [float(doc[0]) if isinstance(doc, list) else float(doc) for doc in a]
        flat_b = [x[0] if isinstance(x, (list, tuple)) else x for doc in b for x in doc] if task == "tiny_mc" \
            else [float(doc[0]) if isinstance(doc, list) else float(doc) for doc in b]
        assert len(flat_a) == len(flat_b) > 0
        for x, y in zip(flat_a, flat_b):
            assert math.isfinite(float(x)) and abs(float(x) - float(y)) < 1e-4, task
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    info = ours["config"]
    assert info["model"] == "mexit"


def harness_model(folder, **model_args):
    from lm_eval.api.registry import get_model

    return get_model("mexit").create_from_arg_obj(dict(pretrained=str(folder), device="cpu", **model_args))


@pytest.mark.parametrize("mode", [dict(exit_layer=2), dict(contrast=[4, 2]), dict(contrast="original:1"),
                                  dict(contrast=[4, 2], draft_exit=1, draft_len=2), dict(mode="exit:2")],
                         ids=["exit", "acd", "acd-original", "speculative-acd", "exit-string"])
def test_each_mode_scores_its_own_distribution(tiny_checkpoint, mode):
    """A continuation mexit's greedy generate chose, scored by lm-eval's loglikelihood path, is the sum of the
    chosen tokens' log-probabilities in the kept logits of generate (ACD: log q), and greedy."""
    folder = tiny_checkpoint[0]
    model = harness_model(folder, **mode)
    lm = mexit.load(folder)
    spec = {k: v for k, v in model.mode_kwargs.items() if k != "speculative"}
    context = [5, 17, 200, 42]
    out = lm.generate([context], 6, eos_token_id=None, keep_logits=True, **spec)
    expected = sum(torch.log_softmax(z[0].double(), -1)[t].item() for z, t in zip(out.logits, out.tokens[0]))
    (score, greedy), = model._loglikelihood_tokens([(("", ""), context, out.tokens[0])])
    assert greedy and abs(score - expected) < 1e-4
    plain = harness_model(folder)._loglikelihood_tokens([(("", ""), context, out.tokens[0])])[0][0]
    assert abs(plain - expected) > 1e-3  # not the original head's


def test_generation_equals_mexit_and_transformers_and_batches(tiny_checkpoint, tasks):
    folder = tiny_checkpoint[0]
    ours = evaluate("mexit", f"pretrained={folder}", tasks, ["tiny_gen"], batch_size=3)
    one = evaluate("mexit", f"pretrained={folder}", tasks, ["tiny_gen"], batch_size=1)
    theirs = evaluate("hf", f"pretrained={folder},dtype=float32", tasks, ["tiny_gen"], batch_size=3)
    texts = [doc[0] if isinstance(doc, list) else doc for doc in responses(ours, "tiny_gen")]
    assert texts == [doc[0] if isinstance(doc, list) else doc for doc in responses(one, "tiny_gen")]
    assert texts == [doc[0] if isinstance(doc, list) else doc for doc in responses(theirs, "tiny_gen")]
    lm = mexit.load(folder)
    stop = tasks[2]
    cut = 0
    for (prompt, _), text in zip(PROMPTS, texts):
        full = lm.generate(prompt, 12).text[0].replace("<|endoftext|>", "")
        assert text == full.split(stop)[0].split("\n\n")[0]  # the stop sequences applied to the free generation
        cut += stop in full
    assert cut and any(texts)


@pytest.mark.parametrize("mode", [dict(early_exit=0.3), dict(dola_layers="low"), dict(contrast="4:2", draft_exit=1),
                                  dict(mode="ee:max-prob:0.3")],
                         ids=["early-exit", "dola", "speculative", "early-exit-string"])
def test_decoding_rules_generate_and_refuse_log_likelihoods_by_name(tiny_checkpoint, tasks, mode):
    folder = tiny_checkpoint[0]
    args = ",".join(f"{k}={v}" for k, v in mode.items())  # a model_args string: "4:2", since "," separates
    out = evaluate("mexit", f"pretrained={folder},{args}", tasks, ["tiny_gen"], batch_size=3)
    lm = mexit.load(folder)
    model = harness_model(folder, **mode)
    for (prompt, _), doc in zip(PROMPTS, responses(out, "tiny_gen")):
        full = lm.generate(prompt, 12, **model.mode_kwargs).text[0].replace("<|endoftext|>", "")
        assert (doc[0] if isinstance(doc, list) else doc) == full.split(tasks[2])[0].split("\n\n")[0]
    if "draft_exit" in mode:
        return
    with pytest.raises(NotImplementedError, match=f"loglikelihood with {next(iter(mode))}"):
        evaluate("mexit", f"pretrained={folder},{args}", tasks, ["tiny_mc"])


def test_bad_model_args_are_named(tiny_checkpoint):
    with pytest.raises(NotImplementedError, match=r"model_args not supported.*\['parallelize'\]"):
        harness_model(tiny_checkpoint[0], parallelize=True)
    with pytest.raises(ValueError, match="contrast takes two layers"):
        harness_model(tiny_checkpoint[0], contrast=[4])
    with pytest.raises(ValueError, match="early_exit and dola_layers each choose the mode"):
        harness_model(tiny_checkpoint[0], early_exit=0.5, exit_layer=2)
    for kw, name, owner in ((dict(measure="margin"), "measure", "early_exit"),
                            (dict(draft_len=3), "draft_len", "draft_exit"),
                            (dict(dola_heads="exit"), "dola_heads", "dola_layers"),
                            (dict(mode="ee:max-prob:0.9", measure="cosine"), "measure", "early_exit")):
        with pytest.raises(ValueError, match=rf"{name}=.* applies with {owner}=\.\.\., which is not given"):
            harness_model(tiny_checkpoint[0], **kw)  # a setting of a mode not chosen is not dropped


def test_mexit_eval_runs_lm_evals_command_line(tiny_checkpoint, tasks, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["eval", "--model_args", f"pretrained={tiny_checkpoint[0]},contrast=[4,2]", "--tasks", "tiny_mc",
                 "--include_path", str(tasks[0]), "--device", "cpu", "--batch_size", "2", "--log_samples",
                 "--output_path", str(out)])
    assert code == 0
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert results and "tiny_mc" in results[0]["results"]
    assert results[0]["config"]["model"] == "mexit"
    assert main(["eval", "--model", "hf", "--tasks", "tiny_mc"]) == 2
    assert "error: mexit eval runs --model mexit" in capsys.readouterr().err


def test_mexit_eval_refuses_bad_model_args_before_indexing_tasks(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A missing or mistyped checkpoint folder, an unknown argument, no checkpoint: one line, before lm-eval's
    task indexing (about 10 s); a hub id is left to the loader."""
    from lm_eval.tasks import manager

    def indexed(self, *args, **kwargs):
        raise AssertionError("lm-eval indexed its tasks before the arguments were checked")

    monkeypatch.setattr(manager.TaskManager, "__init__", indexed)
    near = tiny_checkpoint[0].parent / (tiny_checkpoint[0].name + "x")
    for model_args, line in [(f"pretrained={tmp_path / 'missing'}", f"checkpoint folder {tmp_path / 'missing'} does "
                              "not exist"),
                             (f"pretrained={near}", f"checkpoint folder {near} does not exist"),
                             (f"pretrained={tiny_checkpoint[0]},parallelize=True", "model_args not supported by "
                              "lm-eval's mexit model: ['parallelize']"),
                             (f"pretrained={tiny_checkpoint[0]},batch_size=auto", "batch_size=auto is not supported"),
                             ("device=cpu", "the mexit model needs the checkpoint")]:
        assert main(["eval", "--model_args", model_args, "--tasks", "tiny_mc", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f"error: {line}") and "Traceback" not in err
    with pytest.raises(AssertionError, match="indexed its tasks"):  # a valid folder gets to lm-eval's indexing
        main(["eval", "--model_args", f"pretrained={tiny_checkpoint[0]}", "--tasks", "tiny_mc", "--device", "cpu"])


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's command line without its built-in tasks: it indexes their ~13,000 files (about 10 s) on every run,
    and these runs name only their own (--include_path). test_mexit_eval_runs_lm_evals_command_line runs with them."""
    from lm_eval.tasks import manager

    init = manager.TaskManager.__init__
    monkeypatch.setattr(manager.TaskManager, "__init__",
                        lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "include_defaults": False}))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the default device is cpu without CUDA")
def test_mexit_eval_defaults_and_a_missing_checkpoint_are_one_line(tiny_checkpoint, tasks, tmp_path, capsys,
                                                                    local_tasks_only):
    """No --device: cuda when available, else cpu (lm-eval's own default is cuda:0); no --model_args: one line
    naming pretrained=, not a TypeError; --help names mexit's defaults."""
    common = ["--tasks", "tiny_mc", "--include_path", str(tasks[0]), "--batch_size", "2", "--limit", "2"]
    assert main(["eval", "--model_args", f"pretrained={tiny_checkpoint[0]}", *common,
                 "--output_path", str(tmp_path / "results")]) == 0
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("results_*.json")]
    assert results[0]["config"]["device"] == "cpu"
    capsys.readouterr()
    assert main(["eval", *common]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: the mexit model needs the checkpoint: --model_args "
                                                   "pretrained=") and "TypeError" not in err  # after lm-eval's log
    assert main(["eval", "--model_args", f"pretrained={tmp_path / 'missing'}", *common]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "missing") in last and "cuda" not in last
    # a device in model_args is the device (lm-eval also passes its own: taken once), unless --device says otherwise
    assert main(["eval", "--model_args", f"pretrained={tiny_checkpoint[0]},device=cpu", *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--model_args", f"pretrained={tiny_checkpoint[0]},device=cpu", "--device", "cuda",
                 *common]) == 2
    assert "error: device is given twice: 'cpu' in model_args and 'cuda' by --device" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "mexit (the only model" in shown and "default: cuda when available, else cpu" in shown
