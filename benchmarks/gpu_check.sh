#!/usr/bin/env bash
# Issue 14's checks on a lent GPU, as one run of about 8 minutes (H100/H200 class), with a log and the results'
# JSON files packed into ${OUT:-benchmarks/results}:
#
#   bash benchmarks/gpu_check.sh pack    # here, once: the slices of $BERTKIT_DATA the checks read -> gpu-data/ (13 MB)
#   bash benchmarks/gpu_check.sh         # there, with gpu-data/ carried along
#
# In order, each step bounded by its own timeout so that a hang costs only its share:
#   1. tests/test_cuda.py: parity with transformers, autocast, every kernel choice (varlen attention, packing,
#      fused element-wise kernels, static and CUDA-graph compilation on bucketed lengths), NCCL with two processes;
#   2. the speed suite's targets, bertkit against transformers (SDPA) in the same run: base pretraining at 128 and
#      512, BERT-Large phase 1 (sequences/s), SQuAD fine-tuning at 384, inference at batch 32 and 1; MFU against the
#      bf16 GEMM peak measured in the same run;
#   3. the same pretraining cases with the kernels that the shipped "auto" does not take on small batches (always
#      packed, varlen attention), with fused element-wise kernels, and padded + bucketed + static compilation;
#   4. benchmarks/ablation.py: each choice undone (or turned on) against bertkit as shipped.
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

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" BERTKIT_DATA="$PWD/gpu-data"
OUT=${OUT:-benchmarks/results}
RESULTS=$(mktemp -d)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
step() { echo "=== $(date -u +%T) $*" | tee -a "$LOG"; }

step machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

step "1. tests/test_cuda.py"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tail -30 | tee -a "$LOG"

step "2. speed suite, issue 14's targets"
timeout 200 python3 benchmarks/run.py --suite gpu-targets --batches 4 --rounds 2 --warmup 1 --out "$RESULTS/suite" \
    2>&1 | grep -v "Loading weights" | tee -a "$LOG"

step "3. pretraining with the other kernel choices"
for choice in "--kernels packing=always attention=varlen" "--kernels packing=always attention=varlen fused=true" \
              "--kernels packing=never --bucket 64 --compile static"; do
    step "   $choice"
    # shellcheck disable=SC2086
    timeout 100 python3 benchmarks/run.py --cases pretrain-base pretrain-base-512 --no-memory --batches 4 --rounds 2 \
        --warmup 1 $choice --out "$RESULTS/choices" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
done

step "4. ablation: each choice undone or turned on"
timeout 120 python3 benchmarks/ablation.py --device cuda --cases pretrain-base inference-b32 --batches 4 --rounds 2 \
    --undo padded-encoder packing-rule varlen-attention fused-elementwise --out "$RESULTS/ablation" \
    2>&1 | grep -v "Loading weights" | tee -a "$LOG"

step done
tar czf "$OUT/gpu_check_results.tgz" -C "$RESULTS" .
