#!/bin/bash
# The accuracy study whose tables docs/benchmarks/accuracy.md quotes, exactly as it ran (CPU, offline; each process single-threaded).
# Vision: ~7 s per 100-step arm; text: ~4-5 min per 300-step arm. Runs already in --out are skipped, so an
# interrupted study resumes; `--report_only` redraws tables and pictures from results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-benchmarks/results}
V="python benchmarks/accuracy.py --task vision --out $OUT"
S=0,1,2,3,4,5,6,7,8,9

# vision: post-shot vs VCON (Q = 0.2) vs GMP, 10 seeds, 100 steps
$V --methods prune,binary,lowrank --seeds $S
# when does it pay: Q, β schedule, learning rate, budget
$V --q_sweep 0,0.05,0.1,0.2,0.4,0.7 --methods prune,binary,lowrank --seeds $S
$V --q_sweep 0,0.1,0.2,0.4 --methods prune --seeds $S --schedule cosine
$V --q_sweep 0,0.1,0.2,0.4 --methods prune --seeds $S --schedule cubic
$V --q_sweep 0,0.1,0.2,0.4 --methods prune --seeds $S --lr 3e-4
$V --q_sweep 0,0.1,0.2,0.4 --methods prune,lowrank --seeds 0,1,2,3,4 --steps 400
$V --q_sweep 0,0.1,0.2,0.4 --methods prune --seeds 0,1,2,3,4 --steps 25

# quantization: round to nearest without training (PTQ) vs post-shot vs VCON, int4/int3/int2 × channel/group
# (group 32 on the ViT, whose layers are 64 and 128 wide; 128 on the causal LM). clm: ~1-2 min per 150-step arm.
$V --methods quant --seeds 0,1,2,3,4
$V --methods quant --seeds 0,1,2,3,4 --steps 25
$V --methods quant --seeds 0 --arms ptq --clip_search
$V --methods quant --seeds 0,1,2,3,4 --quant_settings 2:channel,2:group --clip_search
C="python benchmarks/accuracy.py --task clm --out $OUT --methods quant"
$C --seeds 0,1,2
$C --seeds 0 --arms ptq --clip_search

# text: pretrained MiniLM-L6 on Rotten Tomatoes, 3 seeds, 300 steps (~1.2 epochs of 4,000 snippets)
T="python benchmarks/accuracy.py --task text --out $OUT --sparsity 0.9 --steps 300 --dense_steps 300 --lr 2e-4 --eval_every 50"
$T --methods prune,lowrank --seeds 0,1,2
$T --q_sweep 0,0.05,0.1,0.2,0.4 --methods prune --seeds 0,1,2
$T --q_sweep 0,0.2 --methods prune,lowrank --seeds 0,1,2 --schedule cubic
$T --q_sweep 0,0.2 --methods prune,lowrank --seeds 0,1,2 --steps 100
