#!/bin/bash
# The distillation study whose tables docs/benchmarks/accuracy.md quotes, exactly as it ran (CPU, offline; each process single-threaded).
# Every arm of a task starts from the same dense model, which is also the teacher; its logits on the training set
# are cached once per task (teacher_logits_<task>.safetensors) and read by every distilled arm and seed. Post-shot
# and VCON run again here, with the same code as the distilled arms, so that every gain is paired within this study.
# Vision: ~7 s per 100-step arm; text: ~4-5 min per 300-step arm. Runs already in $OUT are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-benchmarks/results/distill}

# vision: 10 seeds, 100 steps, Q = 0.2; KD with alpha 0.9, T = 2, then alpha 0.5 (the distilled arms only)
V="python benchmarks/accuracy.py --task vision --out $OUT --methods prune,binary,lowrank --no_gmp --kd"
$V --seeds 0,1,2,3,4,5,6,7,8,9 --kd_alpha 0.9 --kd_temperature 2
$V --seeds 0,1,2,3,4,5,6,7,8,9 --kd_alpha 0.5 --kd_temperature 2 --kd_only

# text: pretrained MiniLM-L6 on Rotten Tomatoes, 3 seeds, 300 steps, Q = 0.2; KD with alpha 0.9, T = 2 (prune only:
# each arm takes ~4-5 min single-threaded, so the other methods are left to the vision task)
python benchmarks/accuracy.py --task text --out $OUT --methods prune --no_gmp --kd --seeds 0,1,2 \
    --sparsity 0.9 --steps 300 --dense_steps 300 --lr 2e-4 --eval_every 50 --kd_alpha 0.9 --kd_temperature 2
