#!/usr/bin/env bash
# The GPU checks of the speed work, in one go (about 10 minutes on one H100/H200):
#   1. lab.bench rows: eager / torch.compile / whole step in one CUDA graph (--graph-step) at batch 8
#      and 32, inference eager at batch 64 and 1, peak memory;
#   2. train.py on QaTa, eager against --cuda-graphs, the same steps: the loss curves should agree.
# Usage: bash lab/bench_gpu.sh OUT_DIR QATA_ROOT
set -euo pipefail
out=${1:?usage: bash lab/bench_gpu.sh OUT_DIR QATA_ROOT}
qata=${2:?usage: bash lab/bench_gpu.sh OUT_DIR QATA_ROOT}
mkdir -p "$out"
python -m lab.op_count --config paper | tee "$out/op_count.txt"
python -m lab.bench --suite "$out/bench" \
    --rows train_b8_eager,train_b8_graphstep,train_b32_eager,train_b32_graphstep,infer_eager,train_b8_compile \
    2>&1 | tee "$out/bench.log"
for mode in eager cuda-graphs; do
    extra=$([ "$mode" = cuda-graphs ] && echo --cuda-graphs || true)
    python train.py --dataset qata --root "$qata" --preset paper --text-model random:12x768 --amp bf16 \
        --epochs 1 --max-steps-per-epoch 60 --limit-eval-batches 2 --no-test-at-end --no-progress \
        --time-limit 0 --out "$out/train-$mode" $extra 2>&1 | tee "$out/train-$mode.log"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {m: [json.loads(l) for l in (out / f"train-{m}" / "metrics.jsonl").read_text().splitlines()]
        for m in ("eager", "cuda-graphs")}
for m, r in rows.items():
    print(m, [(e["epoch"], round(e["train_loss"], 4), e["train_time_s"]) for e in r])
PY
