"""Ahead-of-time GPU gate without a GPU: compile every Triton kernel specialization the runtime launches for
sm_90a (H100/H200) and sm_80 (A100) with Triton's own compiler and ptxas, and fail on a compile error, a register
spill or shared memory above the target's limit. With programmatic dependent launch (`pdl=True`) the same kernels
compile for sm_90a only, and their PTX must hold `griddepcontrol.wait` and `griddepcontrol.launch_dependents`, and,
in the kernels that read weights (fused linear, exit-head tiles, state propagation), global loads issued before the
wait.

    python -m mexit.bench.aot_compile              # full sweep: every mode and schedule, batch buckets 1..64, fp16+bf16
    python -m mexit.bench.aot_compile --ci         # representative set (the CI test): about a minute

How: the runtime generates at the gpt2-medium-multiexit widths (d=1024, vocabulary 50257, 16 heads; fewer layers,
which changes no specialization), and at widths that are not powers of two (GPT-2 XL's d=1600 with 25 heads; d=96
with vocabulary 1001), with every Triton launch recorded instead of run (`JITFunction.run` patched, no
GPU needed). Each distinct (kernel, argument types, constexprs, warps, stages) is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; the log of Triton's own `ptxas -v` run
reports registers and spills, the compiled metadata its shared memory. Must run WITHOUT TRITON_INTERPRET (the
interpreter replaces the kernels). Divisibility by 16 (pointer addresses, integers) is recorded and compiled in as
Triton's launcher specializes it, so vector widths match the GPU's; the one difference left is that the launcher
also specializes an integer equal to 1 as a constant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mexit.ops import GEMV_MAX_ROWS
from mexit.ops.catalog import prefetching, programs

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory a block may use (opt-in maximum)
TARGETS = {"sm_90a": 90, "sm_80": 80}


@dataclass(frozen=True)
class Launch:
    kernel: str
    module: str
    signature: tuple  # ((name, type), ...) of runtime arguments
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    launch_pdl: bool = False
    aligned: tuple = ()  # runtime arguments divisible by 16 (pointers by address): Triton's "D" specialization


def arg_type(value) -> str | tuple:
    """Triton's signature type of a runtime argument (a tuple of them for a tuple argument)."""
    if isinstance(value, tuple):
        return tuple(arg_type(v) for v in value)
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
                      torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def divisible_by_16(value) -> bool:
    """What Triton's launcher specializes as divisible by 16: a tensor's address, an integer (not a bool)."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def flat_types(signature: tuple) -> list[str]:
    """Every argument type of a recorded signature, tuple arguments flattened."""
    return [x for _, t in signature for x in (t if isinstance(t, tuple) else (t,))]


def record(fn_under_test) -> set[Launch]:
    """Run fn_under_test() with every Triton launch recorded (not executed); returns the distinct launches."""
    import triton.runtime.jit as jit

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_compile records compiled launches: run it without TRITON_INTERPRET=1")
    seen: set[Launch] = set()
    original = jit.JITFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")
                   if k in kwargs}
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        constexpr_names = {names[i] for i in self.constexprs}
        signature = tuple((n, arg_type(bound[n])) for n in names if n not in constexpr_names)
        constexprs = tuple((n, bound[n]) for n in names if n in constexpr_names)
        aligned = tuple(n for n in names if n not in constexpr_names and divisible_by_16(bound[n]))
        seen.add(Launch(self.fn.__name__, self.fn.__module__, signature, constexprs,
                        options.get("num_warps", 4), options.get("num_stages", 3), options.get("launch_pdl", False),
                        aligned))

    import torch.nn.functional as F

    empty, empty_like, linear = torch.empty, torch.empty_like, F.linear
    jit.JITFunction.run = recording
    torch.empty = lambda *a, **k: torch.zeros(*a, **k)  # kernels do not run: their outputs must still be valid
    torch.empty_like = lambda *a, **k: torch.zeros_like(*a, **k)
    # values do not decide a launch's specialization (shapes, dtypes and alignment do): the prompts' half-precision
    # matmuls, minutes on a CPU, return zeros of their shape
    F.linear = lambda x, w, b=None: torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    try:
        fn_under_test()
    finally:
        jit.JITFunction.run = original
        torch.empty, torch.empty_like, F.linear = empty, empty_like, linear
    return seen


GPT2_MEDIUM = (1024, 16, 50257)  # (width, heads, vocabulary)
# widths that are not powers of two: GPT-2 XL's, and a small one with a vocabulary not a multiple of 16
ODD_WIDTHS = [(1600, 25, 50257), (96, 6, 1001)]


def runtime_launches(dtypes, batches, modes, n_layer: int = 2, pdl: bool = False,
                     width: tuple[int, int, int] = GPT2_MEDIUM, gemv: bool = False) -> set[Launch]:
    """Distinct launches of the runtime at `width` (d, heads, vocabulary; default gpt2-medium's) for every dtype,
    batch and mode asked for (pdl: with programmatic dependent launch; gemv: the loop-free linear up to 8 rows)."""
    import mexit
    from mexit.decoding.early_exit import ExitPolicy
    from mexit.model.config import ModelConfig
    from mexit.model.predictors import ExitPredictors
    from mexit.ops import Backend

    d, heads, vocab = width
    config = ModelConfig(n_layer=n_layer, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=1024,
                         exit_layers=tuple(range(1, n_layer + 1)), eos_token_id=vocab - 1)
    kinds = {
        "original": {}, "exit": dict(exit_layer=1), "acd": dict(contrast=(n_layer, 1)),
        "acd-original": dict(contrast=("original", 1)),
        "ee-segments": dict(early_exit=ExitPolicy(0.5, exits=(1,))),
        "ee-deferred": dict(early_exit=ExitPolicy(0.5, exits=(1,), propagation="deferred")),
        "ee-predicated": dict(early_exit=ExitPolicy(0.5, exits=(1,), schedule="predicated")),
        "ee-cosine": dict(early_exit=ExitPolicy(0.5, measure="cosine", exits=(1,))),
        "ee-learned": dict(early_exit=ExitPolicy(0.5, measure="learned", exits=(1,), schedule="predicated")),
        "sample": dict(do_sample=True, top_k=50, seed=0),
        "controls": dict(repetition_penalty=1.2, no_repeat_ngram_size=3),
    }
    launches: set[Launch] = set()
    for dtype in dtypes:
        model = mexit.random_model(config, dtype=dtype)
        model.predictors = ExitPredictors((1,), torch.zeros(1, d), torch.zeros(1), 1e-5)  # the fused probe
        # the kernels' launches are recorded, not run: no GPU or interpreter needed
        backend = Backend("triton", pdl=pdl, gemv_max_rows=GEMV_MAX_ROWS if gemv else 0)
        lm = mexit.MultiExitLM(model, backend=backend, engine="static")
        for batch in batches:
            prompts = [[(7 * r + 3) % vocab for r in range(b, b + 5)] for b in range(batch)]
            for mode in modes:
                kw = kinds[mode]
                launches |= record(lambda kw=kw: lm.generate(prompts, 3, eos_token_id=None, **kw))
        # long caches at batch 1 take the split decode attention (partial softmaxes + merge)
        if not pdl and not gemv:
            launches |= record(lambda: lm.generate([[1] * 600], 2, eos_token_id=None))
    return launches


def round_epilogue_launches(batches, draft_lens, new: int = 3, prompt: int = 5) -> set[Launch]:
    """The speculative round epilogue's launches at the shapes a speculative generate gives it (`Speculative.slots`
    and `columns`), recorded from direct calls: recorded kernels do not run, so a recorded speculative generate
    would never end a round."""
    from mexit.kernels.round_epilogue import round_epilogue
    from mexit.kernels.step_epilogue_ref import StepIO, stop_ids

    launches: set[Launch] = set()
    for b in batches:
        for k in draft_lens:
            columns, slots = new + k + 1, prompt + (new - 1) * (k + 1) + 1
            long = lambda *shape: torch.zeros(*shape, dtype=torch.long)  # noqa: E731
            flags = lambda *shape: torch.zeros(*shape, dtype=torch.bool)  # noqa: E731
            io = StepIO(tokens=long(b), positions=long(b), finished=flags(b), eos=stop_ids(0), out=long(b, columns),
                        step=long(1), slot=long(1), arrivals=torch.zeros(1, dtype=torch.int32),
                        wte=torch.zeros(1, 1), wpe=torch.zeros(1, 1), h0=torch.zeros(b, 1))
            launches |= record(lambda: round_epilogue(long(b), long(b), long(b, k), long(b), long(1), long(b),
                                                      flags(b, columns), io, flags(b, slots), new))
    return launches


PREFETCHING = prefetching()  # weight loads before the wait


WEIGHT_LOAD = re.compile(r"\bld\.global\.L1::evict_first\S*")  # the GEMV's weight loads (evict-first)


def pdl_findings(launch: Launch, ptx: str) -> dict:
    """A PDL launch's PTX: it releases its dependents before it waits (they may then launch and prefetch while it
    runs), and the weight kernels issue global loads before the wait (their prefetch); an error when not."""
    wait = ptx.find("griddepcontrol.wait")
    trigger = ptx.find("griddepcontrol.launch_dependents")
    loads_before = len(re.findall(r"\bld\.global", ptx[:wait])) if wait >= 0 else 0
    found = dict(loads_before_wait=loads_before, launches_dependents=trigger >= 0,
                 triggers_before_wait=0 <= trigger < wait)
    skippable = dict(launch.constexprs).get("HAS_SKIP", False)
    if wait < 0 or trigger < 0:
        found["error"] = "PDL variant without griddepcontrol.wait / launch_dependents in its PTX"
    elif not found["triggers_before_wait"]:
        found["error"] = "PDL variant waits before it lets its dependents launch"
    elif launch.kernel in PREFETCHING and not skippable and not loads_before:
        found["error"] = "PDL variant issues no weight load before griddepcontrol.wait"
    return found


def gemv_findings(launch: Launch, ptx: str, ttir: str) -> dict:
    """The loop-free GEMV: no loop in its TTIR (the layernorm statistics from one load), no tensor-core, ldmatrix
    or asynchronous-copy instruction, 16-byte weight loads (where the row's bytes divide into them), and with PDL
    every weight load before the wait (a load the compiler sank past it is an error)."""
    weight_loads = WEIGHT_LOAD.findall(ptx)
    wait = ptx.find("griddepcontrol.wait")
    constexprs = dict(launch.constexprs)
    found = dict(weight_loads=len(weight_loads), weight_loads_16B=sum(".v4.b32" in x for x in weight_loads),
                 weight_loads_after_wait=len(WEIGHT_LOAD.findall(ptx[wait:])) if wait >= 0 else 0)
    esize = 4 if "*fp32" in flat_types(launch.signature)[:2] else 2
    per_thread = constexprs["BLOCK_N"] * constexprs["BLOCK_K"] * esize // (32 * launch.num_warps)
    vectorized = "K" in launch.aligned and "w_ptr" in launch.aligned and per_thread >= 16  # room for 16 bytes
    if "scf.for" in ttir:
        found["error"] = "GEMV has a loop (scf.for) in its TTIR"
    elif any(op in ptx for op in ("mma.sync", "wgmma", "ldmatrix", "cp.async")):
        found["error"] = "GEMV uses tensor-core / ldmatrix / cp.async instructions"
    elif not weight_loads:
        found["error"] = "GEMV issues no evict-first weight load"
    elif vectorized and found["weight_loads_16B"] != len(weight_loads):
        found["error"] = f"GEMV weight loads not all 16-byte: {sorted(set(weight_loads))}"
    elif launch.launch_pdl and not constexprs.get("HAS_SKIP") and found["weight_loads_after_wait"]:
        found["error"] = f"{found['weight_loads_after_wait']} weight load(s) after griddepcontrol.wait"
    return found


MAX_PROGRAMS_PER_SM = {90: 32, 80: 32}
MAX_WARPS_PER_SM = {90: 64, 80: 64}


def programs_per_sm(arch: int, warps: int, registers: int | None, shared: int) -> int | None:
    """Resident programs (CTAs) per SM: the least of the block limit, the warp limit, the register file (64K
    registers, allocated per warp in units of 256) and shared memory (CUDA occupancy calculator's rules)."""
    if not registers:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    limits = [MAX_PROGRAMS_PER_SM[arch], MAX_WARPS_PER_SM[arch] // warps, 65536 // (per_warp * warps)]
    if shared:
        limits.append(SMEM_LIMIT[arch] // shared)
    return min(limits)


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (triton 3.9 ships a newer one for sm_90+ PTX; 3.6 one ptxas)."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(arch)
    except TypeError:  # older triton: get_ptxas() without the architecture
        tool = compiler.get_ptxas()
    return tool.path if hasattr(tool, "path") else str(tool)


@contextlib.contextmanager
def ptxas_log(out: io.StringIO):
    """Inside: Triton compiles afresh (a cached kernel would skip ptxas) and prints the log of its own `ptxas -v`
    run into `out`, so registers and spills are those of the cubin Triton builds, with its ptxas options."""
    from triton import knobs

    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        yield


def compile_launch(launch: Launch, target: str, workdir: Path) -> dict:
    """Compile one launch for `target`; registers / spills from Triton's ptxas log (`ptxas_log`), shared memory
    from the metadata."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    arch = TARGETS[target]
    constexprs = dict(launch.constexprs)
    signature = {**dict(launch.signature), **{k: "constexpr" for k in constexprs}}
    signature = {name: signature[name] for name in fn.arg_names}
    row = dict(kernel=launch.kernel, target=target, num_warps=launch.num_warps, num_stages=launch.num_stages,
               constexprs={k: v for k, v in constexprs.items()},
               dtypes=sorted({t for t in flat_types(launch.signature) if t.startswith("*f") or t.startswith("*b")}))
    try:
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch.aligned})
        log = io.StringIO()
        with ptxas_log(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages,
                                                   launch_pdl=launch.launch_pdl))
    except Exception as err:  # a compile error is the finding: report it, do not hide it
        return dict(row, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400])
    ptx = compiled.asm["ptx"]
    text, returncode, reader = log.getvalue(), 0, "triton"
    if "registers" not in text:  # a triton that does not print its ptxas log: ptxas -v on the PTX, without its options
        reader = "own ptxas -v"
        path = workdir / f"{launch.kernel}_{abs(hash(launch)) % 10**8}_{arch}.ptx"
        path.write_text(ptx)
        gpu = "sm_90a" if arch == 90 else "sm_80"
        info = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", str(path), "-o", os.devnull],
                              capture_output=True, text=True)
        text, returncode = info.stdout + info.stderr, info.returncode
    row["ptxas_log"] = reader  # whose ptxas run gave the registers and spills
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spill_st = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    spill_ld = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
    shared = compiled.metadata.shared if hasattr(compiled.metadata, "shared") else compiled.metadata["shared"]
    out = dict(row, registers=max(regs, default=None), spill_bytes=sum(spill_st) + sum(spill_ld), shared=shared,
               griddepcontrol="griddepcontrol" in ptx, pdl=launch.launch_pdl)
    if launch.launch_pdl:
        out.update(pdl_findings(launch, ptx))
    if launch.kernel == "_fused_gemv":
        gemv = gemv_findings(launch, ptx, compiled.asm["ttir"])
        out.update({k: v for k, v in gemv.items() if k != "error" or "error" not in out})
    out["programs_per_sm"] = programs_per_sm(arch, launch.num_warps, out["registers"], shared)
    if "error" in out:
        return out
    if returncode != 0:
        out["error"] = f"ptxas: {text.strip().splitlines()[-1] if text.strip() else returncode}"
    elif out["spill_bytes"]:
        out["error"] = f"register spills: {out['spill_bytes']} bytes"
    elif shared > SMEM_LIMIT[arch]:
        out["error"] = f"shared memory {shared} B above the {target} limit {SMEM_LIMIT[arch]} B"
    return out


SMS = {90: 132, 80: 108}  # H100 SXM / H200, A100
GPT2_MEDIUM_MATRICES = {  # name: (K, N, epilogue constexprs)
    "c_attn": (1024, 3072, dict(HAS_LN=True, GELU=False, HAS_RES=False)),
    "attn c_proj": (1024, 1024, dict(HAS_LN=False, GELU=False, HAS_RES=True)),
    "c_fc": (1024, 4096, dict(HAS_LN=True, GELU=True, HAS_RES=False)),
    "mlp c_proj": (4096, 1024, dict(HAS_LN=False, GELU=False, HAS_RES=True)),
}
MIN_PROGRAMS, MAX_GEMV_REGISTERS, MIN_GEMV_PROGRAMS_PER_SM = 2 * 132, 96, 4
# bytes a card must have requested at once to stream at its bandwidth (Little's law at ~1 us loaded latency): an
# H100 / H200 (3.35-4.8 TB/s) about 4 MB, an A100 (2 TB/s) about 2 MB
MIN_IN_FLIGHT = {90: 4 << 20, 80: 2 << 20}


def plan(rows: list[dict]) -> list[dict]:
    """The batch-1 weight kernels at gpt2-medium shapes (fp16), from the launch settings and the compiled
    registers: grid, weight bytes per program, resident programs per SM, bytes requested at once per SM and in
    total (every resident program's whole slice: a GEMV program issues its loads together), and the dependent
    global round trips before the first product. A GEMV fails with fewer than 2 x 132 programs, less than
    min(MIN_IN_FLIGHT (4 MB on sm_90a, 2 MB on sm_80), the matrix) in flight, more than 96 registers or fewer than
    4 programs per SM. The tiled kernel's
    row is for comparison (in flight: one K step per program, its K loop is not pipelined: see
    ../shared/notes/gpu-decode.md B2; round trips: its K steps and, with a layernorm, the statistics' steps)."""
    from mexit.kernels.fused_gemv import gemv_config
    from mexit.kernels.fused_linear import tile_config

    out = []
    for name, (K, N, epilogue) in GPT2_MEDIUM_MATRICES.items():
        for target, arch in TARGETS.items():
            weight = K * N * 2
            cfg = gemv_config(1, N, K)
            match = [r for r in rows if r["kernel"] == "_fused_gemv" and r["target"] == target and not r["pdl"]
                     and r["dtypes"] == ["*fp16"] and r["constexprs"].get("ROWS") == 1
                     and r["constexprs"].get("BLOCK_N") == cfg["BLOCK_N"] and r["constexprs"].get("BLOCK_K") == K
                     and not r["constexprs"].get("HAS_SKIP")
                     and all(r["constexprs"].get(k) == v for k, v in epilogue.items())]
            per_sm = min((r["programs_per_sm"] or 0 for r in match), default=0)
            registers = max((r["registers"] or 0 for r in match), default=None)
            programs = -(-N // cfg["BLOCK_N"])
            per_program = cfg["BLOCK_N"] * K * 2
            resident = min(programs, per_sm * SMS[arch])
            row = dict(matrix=name, kernel="gemv", target=target, programs=programs, per_program=per_program,
                       registers=registers, programs_per_sm=per_sm,
                       in_flight_per_sm=min(per_sm, -(-programs // SMS[arch])) * per_program,
                       in_flight=resident * per_program, weight=weight, round_trips=2 + epilogue["HAS_RES"])
            problems = [] if match else ["not compiled"]
            if programs < MIN_PROGRAMS:
                problems.append(f"{programs} programs < {MIN_PROGRAMS}")
            if row["in_flight"] < min(MIN_IN_FLIGHT[arch], weight):
                problems.append(f"{row['in_flight']} B in flight < {min(MIN_IN_FLIGHT[arch], weight)}")
            if registers and registers > MAX_GEMV_REGISTERS:
                problems.append(f"{registers} registers > {MAX_GEMV_REGISTERS}")
            if per_sm < MIN_GEMV_PROGRAMS_PER_SM:
                problems.append(f"{per_sm} programs per SM < {MIN_GEMV_PROGRAMS_PER_SM}")
            if problems:
                row["error"] = "; ".join(problems)
            out.append(row)
            tiles = tile_config(1, N)
            programs = -(-N // tiles["BLOCK_N"])
            step = tiles["BLOCK_K"] * tiles["BLOCK_N"] * 2
            match = [r for r in rows if r["kernel"] == "_fused_linear" and r["target"] == target and not r["pdl"]
                     and r["dtypes"] == ["*fp16"] and r["constexprs"].get("BLOCK_M") == tiles["BLOCK_M"]
                     and r["constexprs"].get("BLOCK_N") == tiles["BLOCK_N"] and not r["constexprs"].get("HAS_SKIP")
                     and all(r["constexprs"].get(k) == v for k, v in epilogue.items())]
            per_sm = min((r["programs_per_sm"] or 0 for r in match), default=0)
            resident = min(programs, per_sm * SMS[arch])
            out.append(dict(matrix=name, kernel="tiled", target=target, programs=programs,
                            per_program=K * tiles["BLOCK_N"] * 2,
                            registers=max((r["registers"] or 0 for r in match), default=None), programs_per_sm=per_sm,
                            in_flight_per_sm=min(per_sm, -(-programs // SMS[arch])) * step,
                            in_flight=resident * step, weight=weight,
                            round_trips=K // tiles["BLOCK_K"] + (2 * K // tiles["BLOCK_K"] if epilogue["HAS_LN"]
                                                                 else 0) + 1 + epilogue["HAS_RES"]))
    return out


def plan_table(rows: list[dict]) -> str:
    lines = ["| matrix | kernel | target | programs | KB per program | registers | programs per SM | "
             "KB in flight per SM | MB in flight | MB weights | dependent round trips | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['kernel']} | {r['target']} | {r['programs']} | "
                     f"{r['per_program'] / 1024:g} | {r['registers'] or '-'} | {r['programs_per_sm']} | "
                     f"{r['in_flight_per_sm'] / 1024:g} | {r['in_flight'] / 2**20:.2f} | {r['weight'] / 2**20:.1f} | "
                     f"{r['round_trips']} | {r.get('error', 'ok' if r['kernel'] == 'gemv' else '-')} |")
    return "\n".join(lines)


def run(ci: bool) -> list[dict]:
    if ci:  # representative: every kernel and schedule once, the batch buckets' tile regimes, fp16 (bf16: one)
        launches = runtime_launches(["fp16"], [1, 64], ["original", "acd", "ee-segments", "ee-predicated",
                                                        "ee-learned"])
        launches |= runtime_launches(["fp16"], [1], ["sample", "controls"])
        launches |= runtime_launches(["bf16"], [16], ["acd"])
        launches |= runtime_launches(["fp16"], [1], ["original", "acd", "ee-segments", "ee-predicated", "sample"],
                                     pdl=True)
        for width in ODD_WIDTHS:
            launches |= runtime_launches(["fp16"], [1], ["original", "acd", "ee-segments", "ee-predicated",
                                                         "ee-learned", "controls"], width=width)
        launches |= runtime_launches(["fp16"], [1], ["original", "ee-predicated"], gemv=True)  # the plan's
        launches |= runtime_launches(["fp16"], [1], ["original", "ee-predicated"], gemv=True, pdl=True)
        launches |= round_epilogue_launches([1, 64, 256], [1, 4])
    else:
        modes = ["original", "exit", "acd", "acd-original", "ee-segments", "ee-deferred", "ee-predicated",
                 "ee-cosine", "ee-learned", "sample", "controls"]
        launches = runtime_launches(["fp16", "bf16"], [1, 2, 4, 8, 16, 32, 64], modes)
        launches |= runtime_launches(["fp16", "bf16"], [1, 16, 64], modes, pdl=True)
        for width in ODD_WIDTHS:
            launches |= runtime_launches(["fp16"], [1, 16, 64], modes, width=width)
        launches |= runtime_launches(["fp16", "bf16"], [1, 2, 4, 8], modes, gemv=True)
        launches |= runtime_launches(["fp16", "bf16"], [1, 8], modes, gemv=True, pdl=True)
        for width in ODD_WIDTHS:
            launches |= runtime_launches(["fp16"], [1, 8], modes, gemv=True, width=width)
        launches |= round_epilogue_launches([1, 2, 4, 8, 16, 32, 64, 128, 256], [1, 2, 4, 8, 15])
    missing = programs() - {launch.kernel for launch in launches}
    if missing:  # a kernel of the catalog that no recorded mode launches would go uncompiled
        raise RuntimeError(f"no recorded launch of {sorted(missing)}: add a mode that runs them to runtime_launches")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for launch in sorted(launches, key=lambda x: (x.kernel, str(x))):
            for target in TARGETS:
                if launch.launch_pdl and TARGETS[target] < 90:
                    continue  # PDL is Hopper and newer: the runtime never enables it below
                rows.append(compile_launch(launch, target, Path(tmp)))
    return rows


def summary(rows: list[dict]) -> str:
    """Markdown: per kernel and target, the specializations compiled and the worst registers / spills / smem."""
    import triton

    lines = [f"triton {triton.__version__}; {len(rows)} compilations "
             f"({len({(r['kernel'], json.dumps(r['constexprs'], sort_keys=True), str(r['dtypes'])) for r in rows})} "
             "specializations x 2 targets)", "",
             "| kernel | target | specializations | max registers | spill bytes | max shared memory (B) | errors |",
             "|---|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in rows}):
        for target in TARGETS:
            group = [r for r in rows if r["kernel"] == kernel and r["target"] == target]
            ok = [r for r in group if "registers" in r]
            registers = max((r["registers"] or 0) for r in ok) if ok else "-"
            shared = max(r["shared"] for r in ok) if ok else "-"
            lines.append(f"| {kernel} | {target} | {len(group)} | {registers} | {sum(r['spill_bytes'] for r in ok)} | "
                         f"{shared} | {sum('error' in r for r in group)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ci", action="store_true", help="the representative set (about a minute)")
    p.add_argument("--json", help="write every compilation's row to this file")
    args = p.parse_args(argv)
    rows = run(args.ci)
    planned = plan(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(compilations=rows, plan=planned), indent=1))
    print(summary(rows))
    print("\nBatch-1 weight kernels at gpt2-medium shapes, fp16 (the plan check):\n")
    print(plan_table(planned))
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"FAILED {r['kernel']} {r['target']} {r['constexprs']} {r['dtypes']}: {r['error']}", file=sys.stderr)
    for r in planned:
        if "error" in r:
            print(f"FAILED plan {r['matrix']} {r['kernel']} {r['target']}: {r['error']}", file=sys.stderr)
    return 1 if errors or any("error" in r for r in planned) else 0


if __name__ == "__main__":
    sys.exit(main())
