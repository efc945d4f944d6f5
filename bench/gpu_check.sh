#!/usr/bin/env bash
# One call on a lent CUDA machine (torch/triton/transformers preinstalled, no registry): install mexit without
# dependencies, run the GPU tests, then every benchmark the issues ask for. Results land in $OUT (or ./gpu_results).
#   bash bench/gpu_check.sh            # about 6-8 minutes on an H100/H200
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

echo "== tests on the GPU (kernels compiled for the card, CUDA graphs captured)"
timeout 240 python3 -m pytest -q -x tests/test_exit_head.py tests/test_acd_contrast.py tests/test_triton_generate.py \
  tests/test_fast.py tests/test_fast_early_exit.py 2>&1 | tee "$OUT/tests.txt" | tail -5

echo "== fused exit stage vs torch eager / torch.compile (issue 3)"
timeout 150 python3 bench/bench_exit_head.py --batch 1 8 64 --out "$OUT" 2>&1 | tee "$OUT/exit_head.txt" | tail -20

echo "== end-to-end decode, graph engine: original, ACD 24 vs 12, exit 12, early exit at 6/12/18 (issues 4, 5)"
timeout 200 mexit bench --batch 1 64 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph --no-compile \
  --modes original acd:24,12 exit:12 ee:max-prob:0:6 ee:max-prob:0:12 ee:max-prob:0:18 ee:max-prob:0:12:deferred \
  ee:max-prob:1:6,12,18 ee:cosine:0.95:6,12,18 \
  --out "$OUT/graph" 2>&1 | tail -25

echo "== graph engine with torch.compile of the step's layers, batch 1"
timeout 200 mexit bench --batch 1 --prompt-len 32 --new-tokens 128 --repeats 3 --engine graph --compile --baselines \
  --modes original acd:24,12 ee:max-prob:0:12:deferred --out "$OUT/graph_compile" 2>&1 | tail -10

echo "== the same on the eager engine (per-step host syncs), batch 1, for the cost of checks and propagation"
timeout 120 mexit bench --batch 1 --prompt-len 32 --new-tokens 64 --repeats 3 --engine eager --baselines \
  --modes original acd:24,12 ee:max-prob:0:12 --out "$OUT/eager" 2>&1 | tail -12

echo "== transformers with a static cache + torch.compile (may fail on GPT-2: the table then says why), batch 1"
timeout 150 mexit bench --batch 1 --prompt-len 32 --new-tokens 64 --repeats 3 --modes original --out "$OUT/compile" \
  2>&1 | tail -10
