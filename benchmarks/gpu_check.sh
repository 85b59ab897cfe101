#!/usr/bin/env bash
# The CUDA checks (training, measure, landscape, benchmarks) in one prepared run (a few minutes on one H100/H200):
#   - a short CIFAR-shaped run with bf16 autocast (a fake CIFAR-10 folder of random
#     images in the release's format: reading, augmentation and the model all as for
#     the real data),
#   - measure and a 2-D landscape of its checkpoint on the GPU (grid points per second),
#   - SAM / SGD step time (full ResNet-18, batch 128, fp32 and bf16), HVP / gradient,
#     and the landscape benchmark on CUDA.
# Usage, from the repository root:  bash benchmarks/gpu_check.sh [OUT_DIR]
# DEVICE=cpu QUICK=1 runs the same steps small on a CPU (to check the script itself).
set -euo pipefail
out="${1:-${OUT:-/tmp}/gpu_check}"
device="${DEVICE:-cuda}"
quick="${QUICK:-}"
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

python - "$out/cifar" "${quick:+64}" <<'EOF'
import os, pickle, sys
import numpy as np
root, n = sys.argv[1], int(sys.argv[2] or 2048)
folder = os.path.join(root, "cifar-10-batches-py")
os.makedirs(folder, exist_ok=True)
rng = np.random.default_rng(0)
for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)]}
    with open(os.path.join(folder, name), "wb") as f:
        pickle.dump(batch, f, protocol=2)
print("fake CIFAR-10:", 5 * n, "training images in", folder)
EOF

amp=bf16
[ "$device" = cpu ] && amp=none  # bf16 autocast is a CUDA path here
steps=200; points=21; samples=2048; light=()
if [ -n "$quick" ]; then steps=4; points=3; samples=64; light=(--trace-samples 4 --steps 2); fi
time sharpscope train --data cifar10 --data-dir "$out/cifar" --model resnet18 \
  --batch-size 128 --steps "$steps" --amp "$amp" --device "$device" --out "$out/run" --overwrite
time sharpscope measure "$out/run/checkpoint.pt" --data-dir "$out/cifar" --samples "$samples" \
  --device "$device" --json "$out/measure.json" --overwrite --quiet "${light[@]}"
start=$(date +%s.%N)
sharpscope landscape "$out/run/checkpoint.pt" --dim 2 --points "$points" --samples "$samples" \
  --device "$device" --out "$out/grid.npz" --overwrite --quiet
end=$(date +%s.%N)
python -c "print(f'2-D grid: {$points ** 2} points in {$end - $start:.1f} s (process start included): \
{$points ** 2 / ($end - $start):.1f} points/s on $samples examples')"

python benchmarks/bench_sam_step.py --device "$device" ${quick:+--quick}
python benchmarks/bench_hessian.py --device "$device" ${quick:+--quick --repeat 1}
python benchmarks/bench_landscape.py --device "$device" ${quick:+--quick}
