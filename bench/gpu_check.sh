#!/usr/bin/env bash
# Prepared checks for a lent CUDA machine (torch / triton / transformers preinstalled, no registry). Each stage
# fits one 10-minute device call; results land in $OUT (or ./gpu_results). A session's first call:
#   bash bench/gpu_check.sh perf && bash bench/gpu_check.sh quick      # < 9 min together, by their timeouts
#   bash bench/gpu_check.sh perf      # the pytest-benchmark suite (bench/bench_*.py: exit stage, block and its
#                                     # matmuls cold and L2-warm, decode attention, state propagation, decode calls
#                                     # per mode) on the device clock, saved per card in bench/benchmarks/<card>/ and
#                                     # compared with that card's last stored run: a median more than 10% slower
#                                     # fails the stage (< 3 min); its tables (benchmark_tables) go to summary.md
#   bash bench/gpu_check.sh quick     # the essentials (< 6 min): kernel + fast-path GPU tests, end-to-end decode at
#                                     # batch 1 and 64 (original, ACD, exit 12, early exit on both schedules
#                                     # (max-prob and learned), speculative with full and 4096-token draft heads,
#                                     # DoLa; launches and bytes per step), transformers eager in the same run;
#                                     # programmatic dependent launch off and on (original, ACD, batch 1); appends a
#                                     # markdown summary to paste into bench/RESULTS.md
#   bash bench/gpu_check.sh tests     # GPU tests: kernels compiled for the card, CUDA graphs captured (~3 min)
#   bash bench/gpu_check.sh kernels   # the exit-stage and block scripts at batch 1..64 (their do_bench tables)
#   bash bench/gpu_check.sh decode    # end-to-end decode: graph engine, early exit, baselines (issues 4-6, ~7 min)
#   bash bench/gpu_check.sh extra     # torch.compile'd steps and the eager engine for comparison (~5 min)
#   bash bench/gpu_check.sh load      # the 3.9 GB checkpoint's loads, CPU rows and onto the GPU + first token (~5 min)
# Without a GPU (CI's dry run, DRY=1): `perf` runs the suite once under --benchmark-disable on the CPU.
set -uo pipefail
stage=${1:-quick}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${DRY:-0}" = 1 ]; then echo "dry run: $(uname -m) CPU" | tee "$OUT/gpu.txt"; else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"; fi
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
# run from the repository root: mexit imports from the tree (mexit.kernels / mexit.bench read kernels/ and bench/ in
# place), and `import kernels` still gets the installed distribution; nothing is installed on the GPU machine
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import mexit.kernels.launch, mexit.bench.latency" || { echo "mexit does not import from the tree"; exit 1; }

case "$stage" in
perf)
  card=$( [ "${DRY:-0}" = 1 ] && echo cpu-dry-run || nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
    | tr -c 'A-Za-z0-9\n' '-')
  store="bench/benchmarks/$card"  # inside the tree: pytest-benchmark names its storage relative to the working folder
  [ "${DRY:-0}" = 1 ] || mkdir -p "$store"
  flags=(--benchmark-only --benchmark-json "$OUT/suite.json" "--benchmark-storage=file://$store" --benchmark-autosave
         --benchmark-columns=median,iqr,rounds)
  # compare with the card's last stored run (a card's first run has none: pytest-benchmark refuses the fail check)
  ls "$store"/*/*.json >/dev/null 2>&1 && flags+=(--benchmark-compare --benchmark-compare-fail=median:10%)
  [ "${DRY:-0}" = 1 ] && flags=(--benchmark-disable)
  timeout 170 python3 -m pytest bench -q -p no:xdist -p no:cacheprovider ${SELECT:+-k "$SELECT"} "${flags[@]}" 2>&1 \
    | tee "$OUT/suite.txt" | tail -25
  status=${PIPESTATUS[0]}
  {
    echo; echo "## GPU perf: $(head -2 "$OUT/gpu.txt" | tail -1) ($(date -u +%F)), pytest-benchmark suite, exit $status"
    echo; grep -E "passed|failed|regressed" "$OUT/suite.txt" | tail -3
    [ -f "$OUT/suite.json" ] && python3 -m mexit.bench.benchmark_tables "$OUT/suite.json"
  } | tee -a "$OUT/summary.md"
  [ -d "$store" ] && mkdir -p "$OUT/benchmarks" && cp -r "$store" "$OUT/benchmarks/"
  exit "$status" ;;
quick)
  timeout 120 python3 -m pytest -q -n 4 tests/test_fused_linear.py tests/test_decode_attention.py \
    tests/test_exit_head.py tests/test_exit_decide.py tests/test_propagate_kv.py tests/test_acd_contrast.py \
    tests/test_step_epilogue.py tests/test_control_repetition.py tests/test_check_states.py tests/test_fast.py \
    tests/test_fast_early_exit.py tests/test_speculative.py tests/test_load_checkpoint.py 2>&1 | tee "$OUT/tests.txt" | tail -6
  timeout 180 python3 -m mexit bench --batch 1 64 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph \
    --no-compile --baselines transformers --modes original acd:24,12 exit:12 ee:max-prob:0:12 \
    ee:max-prob:0:12:predicated ee:max-prob:1:6,12,18 ee:max-prob:1:6,12,18:predicated ee:learned:1:6,12,18 \
    ee:learned:1:6,12,18:predicated spec:12:1 dola:high --draft-vocab 0 4096 \
    --no-plot --out "$OUT/graph" 2>&1 | tee "$OUT/graph.log" | tail -4
  timeout 60 python3 -m mexit bench --batch 1 --prompt-len 32 --new-tokens 64 --warmup 1 --repeats 3 --engine graph \
    --backend triton --pdl both --baselines --modes original acd:24,12 --no-plot --out "$OUT/pdl" 2>&1 \
    | tee "$OUT/pdl.log" | tail -4
  {
    echo; echo "## GPU quick check: $(head -2 "$OUT/gpu.txt" | tail -1) ($(date -u +%F))"; echo
    echo "### Tests"; tail -1 "$OUT/tests.txt"; echo
    echo "### End to end (mexit bench, graph engine, fp16, prompt 32, 128 new tokens)"
    cat "$OUT/graph/latency.md" 2>/dev/null || grep -v '^ *$' "$OUT/graph.log" | tail -40
    echo; echo "### Programmatic dependent launch off / on (graph engine, fp16, batch 1, prompt 32, 64 new tokens)"
    cat "$OUT/pdl/latency.md" 2>/dev/null || grep -v '^ *$' "$OUT/pdl.log" | tail -20
  } | tee -a "$OUT/summary.md"
  # the device tool returns at most 8 files: everything else travels in one archive
  tar czf /tmp/all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 ! -name summary.md ! -name tests.txt -delete \
    && mv /tmp/all.tgz "$OUT/" ;;
tests)
  timeout 500 python3 -m pytest -q -n 4 tests/test_exit_head.py tests/test_acd_contrast.py tests/test_fused_linear.py \
    tests/test_decode_attention.py tests/test_exit_decide.py tests/test_propagate_kv.py tests/test_control_repetition.py \
    tests/test_check_states.py tests/test_triton_generate.py \
    tests/test_fast.py tests/test_fast_early_exit.py tests/test_speculative.py tests/test_launches.py \
    tests/test_generate.py tests/test_early_exit.py tests/test_repetition_penalty.py tests/test_dola.py 2>&1 | tee "$OUT/tests.txt" | tail -8 ;;
kernels)
  timeout 240 python3 -m mexit.bench.bench_exit_head --batch 1 8 64 --out "$OUT" 2>&1 | tee "$OUT/exit_head.txt" | tail -20
  timeout 240 python3 -m mexit.bench.bench_fused_linear --batch 1 8 16 64 --out "$OUT" 2>&1 | tee "$OUT/fused_linear.txt" \
    | tail -40
  timeout 60 python3 -m mexit.bench.bench_fused_linear --batch 1 --context 1000 --out "$OUT/long_context" 2>&1 \
    | tee "$OUT/fused_linear_long.txt" | tail -12 ;;
decode)
  timeout 330 python3 -m mexit bench --batch 1 64 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph --no-compile \
    --modes original acd:24,12 exit:12 ee:max-prob:0:6 ee:max-prob:0:12 ee:max-prob:0:18 ee:max-prob:0:12:deferred \
    ee:max-prob:1:6,12,18 ee:max-prob:0:12:predicated ee:max-prob:1:6,12,18:predicated --out "$OUT/graph" 2>&1 \
    | tail -30
  timeout 120 python3 -m mexit bench --batch 1 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph --no-compile \
    --backend torch --baselines --modes original acd:24,12 --out "$OUT/graph_torch_layers" 2>&1 | tail -6
  timeout 120 python3 -m mexit bench --batch 32 64 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph \
    --no-compile --fused-max-rows 16 --baselines --modes original acd:24,12 --out "$OUT/graph_fused16" 2>&1 | tail -6
  timeout 200 python3 -m mexit bench --batch 1 --prompt-len 32 --new-tokens 64 --repeats 3 --modes original \
    --out "$OUT/hf_compile" 2>&1 | tail -8 ;;
extra)
  timeout 300 python3 -m mexit bench --batch 1 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph --compile \
    --backend torch --baselines \
    --modes original acd:24,12 ee:max-prob:0:12:deferred --out "$OUT/graph_compile" 2>&1 | tail -10
  timeout 200 python3 -m mexit bench --batch 1 --prompt-len 32 --new-tokens 64 --repeats 3 --engine eager --baselines \
    --modes original acd:24,12 ee:max-prob:0:12 --out "$OUT/eager" 2>&1 | tail -10 ;;
load)
  timeout 540 python3 -m mexit.bench.load_checkpoint --work /tmp/mexit_load --device cuda --repeats 3 \
    --out "$OUT/load" 2>&1 | tail -16 ;;
*) echo "unknown stage $stage: perf | quick | tests | kernels | decode | extra | load"; exit 2 ;;
esac
