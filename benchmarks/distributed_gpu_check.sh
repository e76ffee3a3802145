#!/usr/bin/env bash
# FSDP2, FSDP1 (use_orig_params) and DeepSpeed ZeRO-3 through VConTrainer + `accelerate launch`, ZeRO-3 on the
# units a module's forward reads directly (fused MoE experts, nn.MultiheadAttention), and FSDP1/FSDP2 without the
# Trainer, on one CUDA GPU: the `gpu`-marked tests of tests/training/test_distributed.py. Under 5 minutes.
#
#   bash benchmarks/distributed_gpu_check.sh            # from the repository root, on a machine with a GPU
#
# Needs torch (CUDA), transformers, accelerate and pytest; the ZeRO-3 test is skipped unless `import deepspeed` works.
# Set PYTHON to choose the interpreter (default: python3). Logs go to $OUT when set, else to a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" - <<'PY' 2>&1 | tee "$LOGS/versions.txt"
import importlib
for name in ("torch", "transformers", "accelerate", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "missing:", type(error).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
timeout 290 "$PYTHON" -m pytest -q -m gpu tests/training/test_distributed.py -rA -p no:cacheprovider \
    --junitxml="$LOGS/gpu_check.xml" 2>&1 | tee "$LOGS/gpu_check.log"
exit "${PIPESTATUS[0]}"
