#!/usr/bin/env bash
# Every speed benchmark, one after the other, figures on stdout (MobileNetV2 alpha 1.0 at 224 px).
#
#   KERAS_HOME=../shared/keras_home bash benchmarks/speed.sh                      # CPU, TensorFlow
#   KERAS_HOME=../shared/keras_home KERAS_BACKEND=jax bash benchmarks/speed.sh    # GPU without TensorFlow
#
# IMAGES (default 4096) sets the number of JPEGs. On a GPU, nvidia-smi samples utilisation every
# second into gpu_utilisation.csv, summarised per benchmark; the PyTorch peer runs when torch is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
images=${IMAGES:-4096}
gpu=$(command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo yes || echo no)

run() {
    echo "== $*"
    if [ "$gpu" = yes ]; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 \
            > gpu_utilisation.csv &
        sampler=$!
    fi
    "$@"
    if [ "$gpu" = yes ]; then
        kill "$sampler"
        awk -F', ' '{ u += $1; m = ($2 > m ? $2 : m); n++ } END { if (n) printf "GPU utilisation: mean %.0f%%, peak memory %d MiB (%d samples)\n", u / n, m, n }' gpu_utilisation.csv
    fi
}

run python benchmarks/extraction.py --images "$images" --size 224 --batch 64
run python benchmarks/finetune_step.py --images "$((images / 4))" --size 224 --batch 64 --epochs 3
run python benchmarks/augment_placement.py --images "$((images / 4))" --size 224 --batch 64 --epochs 3
if python -c "import torch" 2>/dev/null; then
    run python benchmarks/torch_peer.py --images "$images" --size 224 --batch 64
    if [ "$gpu" = yes ]; then run python benchmarks/torch_peer.py --images "$images" --size 224 --batch 64 --compile; fi
fi
