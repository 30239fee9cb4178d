#!/usr/bin/env bash
# The checks a CUDA machine is for, in one call (under 10 minutes on an H200):
#   bash bench/gpu_checks.sh OUTDIR [pytest arguments for the suite]
# 1. the whole suite on the CUDA machine (in the background, on the CPU cores through pytest-xdist where it is
#    installed; its GPU use is small)                                         -> OUTDIR/suite.log
# 2. bench/gpu_scale.py: memory and speed at SD 1.5, SDXL and Flux-dev sizes -> OUTDIR/gpu_scale.json, .log
# 3. the CUDA tests (-m cuda), with their printed numbers (bf16 parity)      -> OUTDIR/cuda_tests.log
# 4. whether xformers' kernel runs beside this torch, and matches SDPA         -> OUTDIR/xformers.log
# Each step has its own time limit, so one that hangs leaves the others' results.
set -u
out=${1:?give the folder for the results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# pytest-xdist's workers where it is installed, else one process (the project's "-n 2" dropped)
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${SUITE_WORKERS:-10}" || echo "-o addopts=")
timeout "${SUITE_SECONDS:-420}" python3 -m pytest -q -p no:cacheprovider $workers "${@:2}" >"$out/suite.log" 2>&1 &
suite=$!

timeout "${GPU_SCALE_SECONDS:-330}" python3 bench/gpu_scale.py --out "$out/gpu_scale.json" 2>&1 \
    | grep -v "should be kept in float32" | tee "$out/gpu_scale.log"

timeout 150 python3 -m pytest -q -s -o addopts= -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log" \
    | tail -12

timeout 30 python3 - <<'PY' 2>&1 | tee "$out/xformers.log" | tail -4
import torch
import torch.nn.functional as F

from distill_core import attention

print("attention backend on cuda:", attention.backend_for(torch.device("cuda")))
try:
    import xformers
    import xformers.ops as xops

    print("xformers", xformers.__version__)
    q, k, v = (torch.randn(2, 4096, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = xops.memory_efficient_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    print("xformers vs sdpa max |diff|:", (out.float() - ref.float()).abs().max().item())
except Exception as e:  # the point of the check: say why it does not run
    print("xformers does not run here:", type(e).__name__, (str(e).splitlines() or [""])[0])
PY

wait $suite
echo "suite exit $?"
tail -25 "$out/suite.log"
