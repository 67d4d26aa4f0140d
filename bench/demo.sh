#!/usr/bin/env bash
# The main job, short: what was built, a step microbenchmark on a ResNet-50-shaped
# parameter list (Neptune vs torch's AdamW), and a quick training comparison on the
# embedded digits dataset. Results go to demo_results/ (the committed full runs are
# in bench/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${NEPTUNE_DEMO_OUT:-demo_results}"
mkdir -p "$out"
python -c "import json, neptune_ext; print('neptune_ext build:', json.dumps(neptune_ext.build_info()))"
python bench/bench_step.py --device cpu --sets resnet50 --dtype fp32 \
    --contenders neptune-op,neptune-optimizer,adamw-foreach,adamw-fused --out-dir "$out"
python bench/bench_training.py --quick --out-dir "$out"
echo "demo results in $out/ ; full committed runs: bench/results/"
