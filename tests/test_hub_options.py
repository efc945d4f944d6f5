"""huggingface_hub's loading arguments (revision, token, cache_dir, local_files_only, subfolder) in `mexit.load`, the
drop-in's `from_pretrained` and `mexit convert`, against a hub cache folder laid out as huggingface_hub lays it out
(`models--ORG--NAME/{blobs,refs,snapshots}`), offline."""

import hashlib
import json
import shutil

import pytest
import torch
from tiny_checkpoints import make_hf_checkpoint

import mexit
from mexit.frontends.cli import main
from mexit.frontends.compat import AutoMultiExitModel

REPO = "acme/tiny-multiexit"


def add_snapshot(cache, source, ref: str | None, subfolder: str = "") -> str:
    """Put `source`'s files into the cache as one commit of REPO (files as blobs, the snapshot as links to them),
    pointing the ref (a branch or tag) at it; returns the commit hash."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files) + subfolder.encode()).hexdigest()
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / subfolder / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A cache with two commits of REPO: main (seed 0) and the tag v1 (seed 1, under the subfolder "ckpt" too)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    for seed in (0, 1):
        make_hf_checkpoint(root / f"src{seed}", seed=seed)
    main_commit = add_snapshot(cache, root / "src0", "main")
    v1 = add_snapshot(cache, root / "src1", "v1")
    sub = add_snapshot(cache, root / "src1", "with-subfolder", subfolder="ckpt")
    return cache, root, main_commit, v1, sub


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.model_info", lambda *a, **k: pytest.fail("the hub was asked"))


def weights_of(folder):
    return mexit.load(folder, device="cpu").model.w.wte


def test_load_resolves_each_revision_from_the_cache(hub_cache):
    cache, root, main_commit, v1, _ = hub_cache
    main_lm = mexit.load(REPO, device="cpu", local_files_only=True, cache_dir=cache)
    assert main_lm.model.folder.name == main_commit
    assert torch.equal(main_lm.model.w.wte, weights_of(root / "src0"))
    for revision in ("v1", v1):  # a tag and the commit it names
        lm = mexit.load(REPO, device="cpu", revision=revision, local_files_only=True, cache_dir=cache)
        assert lm.model.folder.name == v1
        assert torch.equal(lm.model.w.wte, weights_of(root / "src1"))
        assert lm.tokenizer is not None  # the snapshot's tokenizer files


def test_subfolder_in_the_cache_and_in_a_local_folder(hub_cache):
    cache, root, _, _, sub = hub_cache
    lm = mexit.load(REPO, device="cpu", revision="with-subfolder", subfolder="ckpt", local_files_only=True,
                    cache_dir=cache)
    assert lm.model.folder.parent.name == sub and lm.model.folder.name == "ckpt"
    assert torch.equal(lm.model.w.wte, weights_of(root / "src1"))
    local = mexit.load(cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / sub, device="cpu",
                       subfolder="ckpt")
    assert torch.equal(local.model.w.wte, lm.model.w.wte)
    with pytest.raises(FileNotFoundError, match="subfolder 'nowhere' does not exist"):
        mexit.load(root / "src0", device="cpu", subfolder="nowhere")


def test_a_missing_revision_is_one_named_error(hub_cache):
    cache = hub_cache[0]
    with pytest.raises(FileNotFoundError, match=r"at revision 'v9' is not in the hub cache .*local_files_only"):
        mexit.load(REPO, device="cpu", revision="v9", local_files_only=True, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="'acme/other' is not in the hub cache"):
        mexit.load("acme/other", device="cpu", local_files_only=True, cache_dir=cache)


def test_a_revision_of_a_local_folder_is_refused(hub_cache):
    with pytest.raises(ValueError, match="revision='v1'.*local folder, which has no revisions"):
        mexit.load(hub_cache[1] / "src0", device="cpu", revision="v1")
    with pytest.warns(UserWarning, match="token and cache_dir apply to hub ids only"):
        mexit.load(hub_cache[1] / "src0", device="cpu", cache_dir=hub_cache[0])


def test_drop_in_from_pretrained_takes_the_hub_arguments(hub_cache):
    cache, root, _, v1, _ = hub_cache
    model = AutoMultiExitModel.from_pretrained(REPO, revision="v1", local_files_only=True, cache_dir=cache,
                                               token=False, trust_remote_code=True, device="cpu")
    assert model.lm.model.folder.name == v1
    assert torch.equal(model.lm.model.w.wte, weights_of(root / "src1"))


def test_convert_from_a_cached_revision(hub_cache, tmp_path, capsys):
    cache, root, _, _, _ = hub_cache
    out = tmp_path / "converted"
    assert main(["convert", REPO, str(out), "--revision", "v1", "--local-files-only", "--cache-dir", str(cache)]) == 0
    assert torch.equal(weights_of(out), weights_of(root / "src1"))
    assert json.loads((out / "config.json").read_text())["n_layer"] == 4
    shutil.rmtree(out)
    assert main(["convert", REPO, str(out), "--revision", "v9", "--local-files-only", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "revision 'v9'" in err and "Traceback" not in err and not out.exists()
