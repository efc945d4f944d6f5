"""The test run's patch of Triton's interpreter (`kernel_utils.patch_interpreter_once_per_launch`) changes its speed,
not its results: a kernel whose loop calls a @triton.jit helper gives the same bits with and without it, and with
it the language is patched a fixed number of times per launch, however often the helper runs; a patch replaces the
builtins listed once, the same attributes as with `inspect.getmembers` every time."""

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("the interpreter runs only without a GPU", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@triton.jit
def _row_sums(x_ptr, out_ptr, ROWS: tl.constexpr, N: tl.constexpr):
    cols = tl.arange(0, N)
    for r in range(ROWS):  # one tl.sum / tl.max (helpers) per row
        row = tl.load(x_ptr + r * N + cols)
        tl.store(out_ptr + r, tl.sum(row, axis=0) + tl.max(row, axis=0))


def launch(rows: int, monkeypatch) -> tuple[torch.Tensor, int]:
    """(the kernel's output, how many times `triton.language` was patched during the launch)."""
    x = torch.linspace(-3, 5, rows * 16).reshape(rows, 16)
    out = torch.full((rows,), float("nan"))
    real, count = interpreter._patch_builtin, []
    with monkeypatch.context() as m:
        m.setattr(interpreter, "_patch_builtin", lambda *args: count.append(1) or real(*args))
        _row_sums[(1,)](x, out, ROWS=rows, N=16)
    assert tl.core.is_builtin(tl.load)  # the launch's own patch is restored after it
    return out, len(count)


def test_the_patch_is_on_and_computes_the_same_bits(monkeypatch):
    if not hasattr(interpreter, "_patch_lang") or not hasattr(interpreter, "GridExecutor"):
        pytest.skip("this triton's interpreter has other internals: the patch is off (tests run at its own speed)")
    once = interpreter._patch_lang
    assert getattr(once, "once_per_launch", False)
    launch(1, monkeypatch)  # the process's first launch patches more (the helpers' module stays patched after it)
    patched, patches_2 = launch(2, monkeypatch)
    assert launch(16, monkeypatch)[1] == patches_2  # the helpers' patch once per launch, however many calls
    monkeypatch.setattr(interpreter, "_patch_lang", once.original)
    plain, plain_patches = launch(2, monkeypatch)
    assert torch.equal(patched, plain) and plain_patches > patches_2
    x = torch.linspace(-3, 5, 32).reshape(2, 16)
    torch.testing.assert_close(patched, x.sum(1) + x.amax(1))


def test_the_listed_builtins_patch_what_getmembers_finds(monkeypatch):
    """`list_builtins_once`: a launch's patch replaces the same attributes, in the same order, with the builtins
    listed once as with `inspect.getmembers` on every patch, and its restore leaves the language as it was."""
    memo = interpreter._patch_builtin
    if not hasattr(memo, "original"):
        pytest.skip("this triton's interpreter has other internals: the patch is off (tests run at its own speed)")
    patch_lang = getattr(interpreter._patch_lang, "original", interpreter._patch_lang)

    def changes(fn):
        scope = patch_lang(fn)
        try:
            return [(id(obj), name) for obj, name, _ in scope._changes]
        finally:
            scope.restore()

    launch(2, monkeypatch)  # tl.sum's module (it holds triton.language.core) patched within a launch first
    kernels = (_row_sums.fn, tl.sum.fn)  # namespaces holding triton.language, and triton.language.core
    listed = [changes(fn) for fn in kernels]
    monkeypatch.setattr(interpreter, "_patch_builtin", memo.original)
    assert [changes(fn) for fn in kernels] == listed and min(map(len, listed)) > 50
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)
    assert tl.core.is_builtin(tl.core.reduce) and tl.core.is_builtin(tl.reduce)
