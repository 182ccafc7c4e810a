#!/usr/bin/env bash
# Issue 14's checks on a lent GPU, as one run of about 8 minutes (H100/H200 class), with a log and the results'
# JSON files and plots packed into ${OUT:-benchmarks/results}:
#
#   bash benchmarks/gpu_check.sh pack             # here, once: the slices of $BERTKIT_DATA the checks read -> gpu-data/
#   bash benchmarks/gpu_check.sh                  # there, with gpu-data/ carried along: every stage
#   bash benchmarks/gpu_check.sh suite choices    # there: only these stages (a rerun of what failed)
#
# The stages, in order, each bounded by its own timeout so that a hang costs only its share:
#   tests    tests/test_cuda.py (parity with transformers, autocast, packed and padded batches, static compilation
#            on bucketed lengths, fine-tuning in each precision; NCCL with two processes), and at the same time (both only check numbers) benchmarks/loss_curve.py: short base
#            pretraining runs of bertkit as shipped, at batch 64 (kept padded) and 256 (packed), each on top of
#            transformers' curve from the same weights and batches;
#   suite    the speed suite's targets, bertkit against transformers (SDPA) in the same run: base pretraining at 128
#            and 512, BERT-Large phase 1 (sequences/s), SQuAD fine-tuning at 384, inference at batch 32 and 1; MFU
#            against the bf16 GEMM peak measured in the same run;
#   pretrain the suite's pretraining cases alone, with BERT-Large phase 2 (a rerun after a change to the kernels);
#   choices  base (128, 512) and Large pretraining with the blocks compiled for static shapes (batches kept padded,
#            lengths bucketed to 64), the launch-bound profile's remedy, and a profile of the compiled base step;
#   ablation benchmarks/ablation.py: each choice undone against bertkit as shipped.
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = pack ]; then
    src=${BERTKIT_DATA:?set BERTKIT_DATA to the shared data folder}
    mkdir -p gpu-data/corpus gpu-data/glue gpu-data/squad gpu-data/checkpoints/all-MiniLM-L6-v2
    cp "$src/corpus/python-docs-3.11.txt" gpu-data/corpus/
    cp -r "$src/glue/SST-2" gpu-data/glue/
    cp "$src/squad/dev-v1.1.json" gpu-data/squad/
    cp "$src"/checkpoints/all-MiniLM-L6-v2/{config.json,vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} \
        gpu-data/checkpoints/all-MiniLM-L6-v2/  # the tokenizer only: the benchmarks build their own weights
    grep -qx '/gpu-data/' .git/info/exclude 2>/dev/null || echo /gpu-data/ >> "$(git rev-parse --git-path info/exclude)"
    du -sh gpu-data
    exit 0
fi

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-}" BERTKIT_DATA="$PWD/gpu-data"
OUT=${OUT:-benchmarks/results}
RESULTS=$OUT/json
mkdir -p "$RESULTS"
LOG="$OUT/gpu_check.log"
STAGES=${*:-tests suite choices ablation}
step() { echo "=== $(date -u +%T) $*" | tee -a "$LOG"; }
wants() { [[ " $STAGES " == *" $1 "* ]]; }
quiet() { grep --line-buffered -v "Loading weights"; }

step machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

if wants tests; then
    step "tests: tests/test_cuda.py, with benchmarks/loss_curve.py beside it"
    ( for size in "--batch-size 64 --steps 200" "--batch-size 256 --steps 100"; do  # kept padded; packed (2^24 rule)
          # shellcheck disable=SC2086
          timeout 70 python3 benchmarks/loss_curve.py --device cuda --preset base $size --out "$RESULTS/loss" 2>&1 | quiet
      done > "$OUT/loss_curve.log" ) &
    curves=$!
    timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:logging -m "slow or not slow" -n 4 --timeout 100 \
        --tb=short -rfs tests/test_cuda.py 2>&1 | grep -v DEBUG | tail -60 | tee -a "$LOG"
    wait $curves
    tee -a "$LOG" < "$OUT/loss_curve.log"
fi

if wants pretrain; then
    step "pretrain: the targets' pretraining cases and BERT-Large phase 2, bertkit as shipped"
    timeout 100 python3 benchmarks/run.py --device cuda --cases pretrain-base pretrain-base-512 pretrain-large \
        pretrain-large-512 --no-memory --batches 4 --rounds 2 --warmup 1 --out "$RESULTS/pretrain" 2>&1 | quiet | tee -a "$LOG"
fi

if wants suite; then
    step "suite: issue 14's targets"
    timeout 150 python3 benchmarks/run.py --suite gpu-targets --batches 4 --rounds 2 --warmup 1 --out "$RESULTS/suite" \
        2>&1 | quiet | tee -a "$LOG"
fi

if wants choices; then
    step "choices: blocks compiled for static shapes, padded, bucketed to 64"
    timeout 130 python3 benchmarks/run.py --device cuda --cases pretrain-base pretrain-base-512 pretrain-large \
        --no-memory --batches 4 --rounds 2 --warmup 1 --bucket 64 --compile static --out "$RESULTS/static" 2>&1 \
        | quiet | tee -a "$LOG"
    step "choices: where a static-compiled base step spends its time (torch.profiler)"
    timeout 90 python3 benchmarks/run.py --device cuda --cases pretrain-base --no-memory --batches 2 --rounds 1 \
        --warmup 1 --bucket 64 --compile static --profile --out "$RESULTS/profile" 2>&1 | quiet | tee -a "$LOG"
fi

if wants ablation; then
    step "ablation: each choice undone"
    timeout 100 python3 benchmarks/ablation.py --device cuda --cases pretrain-base pretrain-base-512 --batches 4 \
        --rounds 2 --undo padded-encoder packing-rule --out "$RESULTS/ablation" 2>&1 | quiet | tee -a "$LOG"
fi

step done
cp "$RESULTS"/loss/*.png "$OUT"/ 2>/dev/null
tar czf "$OUT/gpu_check_results.tgz" -C "$RESULTS" . && rm -rf "$RESULTS"
