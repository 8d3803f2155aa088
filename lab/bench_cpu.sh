#!/usr/bin/env bash
# CPU training and inference speed of the tiny and small presets, for two checkouts side by side
# (runs alternate, REPS times each, so both see the same machine load). Writes OUT/<label>-<preset>-<rep>.json.
# Usage: bash lab/bench_cpu.sh OUT BEFORE_CHECKOUT [THREADS] [REPS]   (run from the newer checkout)
set -euo pipefail
usage="usage: bash lab/bench_cpu.sh OUT BEFORE_CHECKOUT [THREADS] [REPS]"
out=${1:?$usage}
before=${2:?$usage}
threads=${3:-2}
reps=${4:-2}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # each checkout runs in its own folder
for rep in $(seq 1 "$reps"); do
    for preset in tiny small; do
        for label in before after; do
            dir=$([ "$label" = before ] && echo "$before" || pwd)
            (cd "$dir" && python -m lab.bench --config "$preset" --batch 8 --warmup 3 --steps 20 \
                --infer-batch 8 --infer-iters 5 --threads "$threads" --json "$out/$label-$preset-$rep.json" \
                > /dev/null)
            python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], sys.argv[4], f\"{d['train_images_per_s']:.1f} train img/s\")" \
                "$out/$label-$preset-$rep.json" "$label" "$preset" "$rep"
        done
    done
done
