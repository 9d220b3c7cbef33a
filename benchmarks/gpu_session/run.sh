#!/usr/bin/env bash
# On the GPU machine (the device tool), from the repository root, after wheels.sh here:
#   run(command="bash benchmarks/gpu_session/run.sh", carry=[".whl"], timeout_s=540)
# Issue 12's GPU measurements in one go, most important first, each under its own time limit so
# that a slow one leaves the rest their turn; every table lands in $OUT (and on stdout):
#   1. speed.py on the GPU: every case, ours on each path against learn2learn, same batches,
#      alternating (the goal: Conv4 MAML at least 3x learn2learn);            speed_cuda.md
#   2. speed.py --tensor-memory: peak GPU memory of one meta-iteration each;  memory_cuda.md
#   3. gpu_check.py: training through the Trainer in fp32, bf16-mixed and 16-mixed; gpu_check.md
#   4. speed.py --our-layers-on-device: ours with our batch norm and max-pooling enabled on the GPU
#      (by default they run on the CPU only, where they were measured), beside the default;
#      conv4-64-bn and mini (LAYER_CASES)                                       layers_cuda.md
# SMOKE=1 runs the same steps on the CPU with tiny settings and the installed packages (no .whl/):
# it checks the script, not the GPU (tests/test_gpu_check.py). CASES="..." names speed.py's cases.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "${SMOKE:-0}" = 1 ]; then
    device=cpu; cases=${CASES:-"sinusoid conv4-32"}; timing="--iterations 1 --rounds 1 --warmup 0"; check="--smoke"
    layer_cases=${LAYER_CASES:-"conv4-64-bn"}; layer_paths="--paths vmap"
else
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    device=cuda; cases=${CASES:-"sinusoid sinusoid-fo conv4-32 conv4-64-bn kanji-config mini mini-fo"}
    timing="--iterations 8 --rounds 3 --warmup 2"; check="--steps 150"
    layer_cases=${LAYER_CASES:-"conv4-64-bn mini"}; layer_paths=""
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
"$PYTHON" - <<'PY' || { echo "missing packages: run benchmarks/gpu_session/wheels.sh on the development machine and carry .whl" >&2; exit 1; }
import torch, lightning, learn2learn, jsonargparse, fewshot_lightning
print(f"torch {torch.__version__}, lightning {lightning.__version__}, learn2learn {learn2learn.__version__}, "
      f"CUDA {torch.cuda.is_available() and torch.cuda.get_device_name()}")
PY
status=0
quiet() { grep -v -i -e "gym" -e "migration" -e "USDT:" -e "CPUAllocator.cpp" -e "DeviceProperties.cpp"; }
cd benchmarks
timeout 250 "$PYTHON" speed.py --device "$device" --no-memory $timing --cases $cases 2>&1 \
    | quiet | tee "$OUT/speed_cuda.md" || status=1
timeout 60 "$PYTHON" speed.py --device "$device" --tensor-memory --cases $cases 2>&1 \
    | quiet | tee "$OUT/memory_cuda.md" || status=1
timeout 130 "$PYTHON" gpu_check.py $check 2>&1 | quiet | tee "$OUT/gpu_check.md" || status=1
timeout 90 "$PYTHON" speed.py --device "$device" --no-memory --no-auto --our-layers-on-device $timing $layer_paths \
    --cases $layer_cases 2>&1 | quiet | tee "$OUT/layers_cuda.md" || status=1
exit $status
