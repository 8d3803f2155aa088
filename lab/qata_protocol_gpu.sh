#!/usr/bin/env bash
# The QaTa-COV19 protocol (lab/qata_protocol.py) in its GPU form, in one go (about 10 minutes on
# one H100/H200): the paper preset at 224² in bf16, the recipe against the image-only model, seed 0,
# 4 minutes each, both runs side by side on the one GPU so that they share it alike.
# The QaTa subset (SGSeg layout: train + valid) travels inside the repository as an ignored folder.
# Usage: bash lab/qata_protocol_gpu.sh OUT_DIR QATA_ROOT
set -euo pipefail
out=${1:?usage: bash lab/qata_protocol_gpu.sh OUT_DIR QATA_ROOT}
qata=${2:?usage: bash lab/qata_protocol_gpu.sh OUT_DIR QATA_ROOT}
python -m lab.qata_protocol --root "$qata" --minutes 4 --seeds 0 --variants best no-text \
    --threads 4 --parallel 2 --equal-steps 250 500 1000 --out "$out/protocol" \
    --train-flags "--preset paper --text-model minilm --freeze-text --mcm-attention sigmoid --amp bf16 --device cuda --workers 4 --max-steps-per-epoch 100" \
    2>&1 | tee "$out/protocol.log"
