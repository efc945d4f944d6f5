"""Helpers for kernel tests: where kernels run, and poisoned output allocation."""

import contextlib
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run under TRITON_INTERPRET=1


@contextlib.contextmanager
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made inside the block is filled with NaN (floats) or -7 (ints), so an
    output element a kernel forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
        m.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def patch_interpreter_once_per_launch() -> None:
    """Speed up Triton's interpreter without changing what it computes: it re-patches `triton.language` on every
    call of a @triton.jit helper inside a kernel (`tl.sum`, `tl.max`, ...: `inspect.getmembers` over the module,
    about a millisecond a call, often more than the kernel's own work), although within one launch the first
    patch stays in place until the launch ends. Here a helper's patch runs once per launch and per module
    namespace; the launch's own patch and its restore are untouched (`tests/test_interpreter_patch.py`). Nothing
    happens off the interpreter or where these internals are missing (it then runs at its own speed)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, launch = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or launch is None or getattr(patch_lang, "once_per_launch", False):
        return
    nothing = getattr(interpreter, "_LangPatchScope", lambda: None)  # an empty scope: its restore does nothing
    patched: set[int] = set()  # the namespaces (a function's globals) patched in the running launch
    run_launch = launch.__call__

    def launch_call(self, *args, **kwargs):
        patched.clear()
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            patched.clear()

    def once(fn):
        namespace = id(fn.__globals__)
        if namespace in patched:  # a helper whose namespace this launch already patched: nothing to restore
            return nothing()
        scope = patch_lang(fn)
        patched.add(namespace)
        return scope

    once.once_per_launch, once.original = True, patch_lang
    interpreter._patch_lang = once
    launch.__call__ = launch_call
    list_builtins_once(interpreter)


def list_builtins_once(interpreter) -> None:
    """A patch of `triton.language` lists each module's members with `inspect.getmembers` (most of its time) to
    find the builtins it replaces. Those are fixed: list them once per module, then replace those still in place (a
    builtin a patch already replaced is no builtin then: getmembers would skip it too)."""
    import inspect

    patch_builtin, patch_attr = getattr(interpreter, "_patch_builtin", None), getattr(interpreter, "_patch_attr", None)
    is_builtin = getattr(getattr(getattr(interpreter, "tl", None), "core", None), "is_builtin", None)
    if patch_builtin is None or patch_attr is None or is_builtin is None:
        return

    def builtins(pkg) -> list:
        return [(name, m) for name, m in inspect.getmembers(pkg) if is_builtin(m)]

    # listed now, before any launch patches them (a patch through one module also writes into another: triton's
    # `_patch_reduce_scan` sets reduce / associative_scan on both triton.language and triton.language.core)
    tl = interpreter.tl
    packages = [tl, tl.core, tl.tensor, tl.math, getattr(tl.core, "tensor_descriptor_base", None)]
    listed = {id(pkg): builtins(pkg) for pkg in packages if pkg is not None}  # id -> [(name, builtin)]

    def once(pkg, builder, scope):
        if id(pkg) not in listed:  # a package the list above does not know (another triton): listed on first use
            listed[id(pkg)] = builtins(pkg)
        for name, member in listed[id(pkg)]:
            if getattr(pkg, name, None) is member:
                patch_attr(pkg, name, member, builder, scope)

    once.original = patch_builtin
    interpreter._patch_builtin = once
