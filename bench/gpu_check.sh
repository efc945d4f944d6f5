#!/usr/bin/env bash
# Prepared checks for a lent CUDA machine (torch / triton / transformers preinstalled, no registry). Each stage
# fits one 10-minute device call; results land in $OUT (or ./gpu_results). A session's first call:
#   bash bench/gpu_check.sh perf; bash bench/gpu_check.sh quick      # < 9 min together, by their timeouts
#   bash bench/gpu_check.sh perf      # the GPU decode issue's stage (< 5 min by its timeouts): the GEMV's GPU tests (float64
#                                     # reference; every mode's tokens on it, graph == static); a cold-weight sweep
#                                     # of the block linears (GEMV settings, tiled, cuBLAS; 24 weight copies); the
#                                     # per-kernel breakdown inside the captured graph (torch.profiler); end to end
#                                     # at batch 1 and 64 on each block-linear path (cuBLAS, tiled, GEMV) with PDL
#                                     # off and on, and the card's default routes ranked from it (routes.json, to
#                                     # commit into mexit/ops/routes.json); the pytest-benchmark suite's block rows
#                                     # (cold and L2-warm), stored per card in bench/benchmarks/<card>/ and compared
#                                     # with its last stored run (a median 10% slower fails the stage); transformers
#                                     # eager and static cache + torch.compile. Each step appends to summary.md.
#   bash bench/gpu_check.sh quick     # the essentials (< 4 min): kernel + fast-path GPU tests, end-to-end decode at
#                                     # batch 1 and 64 (early exit on both schedules (max-prob and learned, no row
#                                     # exits / every row exits at 12), speculative with full and 4096-token draft
#                                     # heads, DoLa; launches and bytes per step); appends a markdown summary
#   bash bench/gpu_check.sh tests     # GPU tests: kernels compiled for the card, CUDA graphs captured (~3 min)
#   bash bench/gpu_check.sh kernels   # the exit-stage and block scripts at batch 1..64 (their do_bench tables)
#   bash bench/gpu_check.sh decode    # end-to-end decode: graph engine, early exit, baselines (issues 4-6, ~7 min)
#   bash bench/gpu_check.sh extra     # torch.compile'd steps and the eager engine for comparison (~5 min)
#   bash bench/gpu_check.sh load      # the 3.9 GB checkpoint's loads, CPU rows and onto the GPU + first token (~5 min)
# Without a GPU (CI's dry run, DRY=1): `perf` runs every step on the CPU (interpreter, the shipped small model, the
# suite under --benchmark-disable): no Python error is left for the GPU minutes.
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
  # the GPU decode issue's prepared stage (< 5 min by its timeouts): each step appends to summary.md as it ends
  card=$( [ "${DRY:-0}" = 1 ] && echo cpu-dry-run || nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
    | tr -c 'A-Za-z0-9\n' '-')
  log() { tee -a "$OUT/summary.md"; }
  echo; echo "## GPU perf: $(head -2 "$OUT/gpu.txt" | tail -1) ($(date -u +%F), commit $(git rev-parse --short HEAD \
    2>/dev/null))" | log
  # end to end: batch 1 on each block-linear path (one run per path, so a timeout loses one path's rows) with PDL
  # off / on, batch 64 on cuBLAS and the tiled kernel (the GEMV takes <= 8 rows)
  common=(--new-tokens 64 --warmup 1 --repeats 3 --engine graph --no-compile --no-plot --backend triton)
  e2e1=(--batch 1 --pdl both --modes original acd:24,12 exit:12 ee:max-prob:1:6,12,18:predicated spec:12:1
    "${common[@]}")
  e2e64=(--batch 64 --linear cublas tiled --modes original acd:24,12 exit:12 --baselines "${common[@]}")
  base=(--batch 1 64 --modes original --new-tokens 64 --warmup 1 --repeats 3 --engine graph --no-plot)
  paths=(cublas:35 gemv:30 tiled:25)
  dry=()
  # the dry run: batch 1 on the GEMV, batch 3 on cuBLAS and the tiled kernel (each --linear once), 4 tokens
  if [ "${DRY:-0}" = 1 ]; then export TRITON_INTERPRET=1; dry=(--smoke); paths=(gemv:30)
    small=(--model bench/small_model --device cpu --new-tokens 4 --warmup 0 --repeats 1 --no-plot)
    e2e1=(--batch 1 --modes original --backend triton --engine static "${small[@]}")
    e2e64=(--batch 3 --linear cublas tiled --modes exit:4 --backend triton --engine static --baselines "${small[@]}")
    base=(--batch 1 --modes original --no-compile "${small[@]}"); fi
  # a step's time limit: the GPU budget's on a GPU; the dry run checks code paths, not times (a busy 2-core CI
  # machine runs the interpreter several times slower than an idle one)
  limit() { [ "${DRY:-0}" = 1 ] && echo 120 || echo "$1"; }  # the dry run: 2x its slowest step seen
  failed=()  # steps that failed or timed out: the stage fails with them
  check() { [ "$1" = 0 ] || failed+=("$2 (exit $1)"); }
  # 1. the new kernels on this card: the GEMV against float64, every mode's tokens on it (graph == static)
  tests=(tests/test_fused_gemv.py tests/test_fast.py tests/test_fast_early_exit.py -k gemv)
  workers=4
  [ "${DRY:-0}" = 1 ] && tests=(tests/test_fused_gemv.py -k gpt2_medium_tiles) && workers=0  # the interpreter: one case
  timeout "$(limit 35)" python3 -m pytest -q -n "$workers" -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT/gemv_tests.txt" | tail -3
  check "${PIPESTATUS[0]}" "GEMV tests"
  { echo; echo "### GEMV tests"; tail -1 "$OUT/gemv_tests.txt"; } | log
  # 2. cold-weight sweep of the block linears (24 weight copies per candidate): GEMV settings, tiled, cuBLAS
  timeout "$(limit 40)" python3 -m mexit.bench.gemv_sweep --batch 1 "${dry[@]}" --out "$OUT/sweep" 2>&1 | tee "$OUT/sweep.txt" \
    | tail -3
  check "${PIPESTATUS[0]}" "sweep"
  { echo; echo "### Cold-weight sweep (fp16, gpt2-medium matrices)"; grep -v '^ *$' "$OUT/sweep.txt" | tail -60; } | log
  # 3. per-kernel breakdown inside the captured graph, old and new paths
  bd=(--batch 1 64 --linear cublas tiled gemv --new-tokens 5)
  [ "${DRY:-0}" = 1 ] && bd=(--batch 1 --linear gemv --new-tokens 4)
  timeout "$(limit 35)" python3 -m mexit.bench.graph_breakdown "${bd[@]}" --pdl off "${dry[@]}" \
    --out "$OUT/breakdown" > "$OUT/breakdown.txt" 2>&1
  check "$?" "breakdown"
  { echo; echo "### Where the step's time goes (graph engine, original head)"
    cat "$OUT/breakdown/graph_breakdown.md" 2>/dev/null || tail -5 "$OUT/breakdown.txt"; } | log
  # 4. end to end on each block-linear path, PDL off and on; the card's default routes ranked from it
  for p in "${paths[@]}"; do
    timeout "$(limit "${p#*:}")" python3 -m mexit bench "${e2e1[@]}" --linear "${p%%:*}" \
      $( [ "${p%%:*}" = cublas ] && echo "--baselines transformers" || echo "--baselines" ) \
      --out "$OUT/e2e_b1_${p%%:*}" 2>&1 | tee "$OUT/e2e_b1_${p%%:*}.log" | tail -3
    check "${PIPESTATUS[0]}" "end to end, batch 1, ${p%%:*}"
  done
  timeout "$(limit 25)" python3 -m mexit bench "${e2e64[@]}" --out "$OUT/e2e_b64" 2>&1 | tee "$OUT/e2e_b64.log" | tail -3
  check "${PIPESTATUS[0]}" "end to end, batch 64"
  { echo; echo "### End to end (mexit bench, graph engine, fp16, prompt 32, 64 new tokens)"
    for f in "$OUT"/e2e_b*.log; do d=${f%.log}; cat "$d/latency.md" 2>/dev/null || tail -8 "$f"; echo; done
    echo "### Default routes for this card (commit into mexit/ops/routes.json)"
    python3 -m mexit.bench.rank_routes $(ls "$OUT"/e2e_b*/latency.json 2>/dev/null) --out "$OUT/routes.json" 2>&1 \
      | tail -12; } | log
  # 5. the pytest-benchmark suite (cold and L2-warm block, matmuls, GEMV), stored per card and compared
  store="bench/benchmarks/$card"  # inside the tree: pytest-benchmark names its storage relative to the working folder
  [ "${DRY:-0}" = 1 ] || mkdir -p "$store"
  flags=(--benchmark-only --benchmark-json "$OUT/suite.json" "--benchmark-storage=file://$store" --benchmark-autosave
         --benchmark-columns=median,iqr,rounds)
  # compare with the card's last stored run (a card's first run has none: pytest-benchmark refuses the fail check)
  ls "$store"/*/*.json >/dev/null 2>&1 && flags+=(--benchmark-compare --benchmark-compare-fail=median:10%)
  [ "${DRY:-0}" = 1 ] && flags=(--benchmark-disable)
  timeout "$(limit 35)" python3 -m pytest bench -q -p no:xdist -p no:cacheprovider -k "${SELECT:-block}" "${flags[@]}" 2>&1 \
    | tee "$OUT/suite.txt" | tail -25
  status=${PIPESTATUS[0]}
  check "$status" "pytest-benchmark suite"
  {
    echo; echo "### pytest-benchmark suite (-k ${SELECT:-block}), exit $status"
    echo; grep -E "passed|failed|regressed" "$OUT/suite.txt" | tail -3
    [ -f "$OUT/suite.json" ] && python3 -m mexit.bench.benchmark_tables "$OUT/suite.json"
  } | log
  [ -d "$store" ] && mkdir -p "$OUT/benchmarks" && cp -r "$store" "$OUT/benchmarks/"
  # 6. what a user would pick instead, same card and run: transformers eager and static cache + torch.compile
  timeout "$(limit 40)" python3 -m mexit bench "${base[@]}" --baselines transformers --out "$OUT/baselines" 2>&1 \
    | tee "$OUT/baselines.log" | tail -3
  check "${PIPESTATUS[0]}" "baselines"
  { echo; echo "### Baselines (transformers eager, static cache + torch.compile)"
    cat "$OUT/baselines/latency.md" 2>/dev/null || tail -8 "$OUT/baselines.log"
    echo; echo "perf stage: ${#failed[@]} step(s) failed${failed:+: ${failed[*]}}"; } | log
  # the device tool returns at most 8 files: the rest travels in one archive (quick archives it again)
  tar czf /tmp/perf.tgz -C "$OUT" . && find "$OUT" -mindepth 1 ! -name summary.md ! -name routes.json -delete \
    && mv /tmp/perf.tgz "$OUT/"
  [ "${#failed[@]}" = 0 ] ;;
quick)
  # the kernels probed on every card (mexit/ops/catalog.py; the GEMV's tests are perf's), then the fast paths
  timeout 100 python3 -m pytest -q -n 4 $(python3 -m mexit.ops.catalog tests always) tests/test_fast.py \
    tests/test_fast_early_exit.py tests/test_speculative.py tests/test_load_checkpoint.py 2>&1 | tee "$OUT/tests.txt" | tail -6
  # rows that all exit at 12 against exit:12: eager propagation reads 1.12x exit 12's weight bytes (the key/value
  # weights of blocks 12..23), deferred 1.0x while no later token runs deeper; a max-prob check reads a head
  # (+14% at gpt2-medium), learned and cosine checks read nothing sizeable (bench/RESULTS.md, issue 33)
  timeout 130 python3 -m mexit bench --batch 1 64 --prompt-len 32 --new-tokens 64 --warmup 1 --repeats 3 \
    --engine graph --no-compile --baselines --modes exit:12 ee:max-prob:1:12 ee:max-prob:1:12:predicated \
    ee:learned:1:12 ee:learned:1:12:predicated ee:max-prob:0:12:deferred ee:max-prob:0:12:predicated \
    ee:max-prob:1:6,12,18 ee:learned:1:6,12,18:predicated spec:12:1 dola:high --draft-vocab 0 4096 \
    --no-plot --out "$OUT/graph" 2>&1 | tee "$OUT/graph.log" | tail -4
  {
    echo; echo "## GPU quick check: $(head -2 "$OUT/gpu.txt" | tail -1) ($(date -u +%F))"; echo
    echo "### Tests"; tail -1 "$OUT/tests.txt"; echo
    echo "### End to end (mexit bench, graph engine, fp16, prompt 32, 64 new tokens; the card's default routes)"
    cat "$OUT/graph/latency.md" 2>/dev/null || grep -v '^ *$' "$OUT/graph.log" | tail -40
  } | tee -a "$OUT/summary.md"
  # the device tool returns at most 8 files: everything else travels in one archive
  tar czf /tmp/all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 ! -name summary.md ! -name tests.txt ! -name \
    routes.json -delete && mv /tmp/all.tgz "$OUT/" ;;
tests)
  # every kernel's test (mexit/ops/catalog.py), then the generation paths on the kernels
  timeout 500 python3 -m pytest -q -n 4 $(python3 -m mexit.ops.catalog tests) tests/test_triton_generate.py \
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
