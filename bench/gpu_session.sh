#!/usr/bin/env bash
# Everything a GPU machine should show, in one call (the device machine is lent for minutes, has
# no network, and brings back only what is under $OUT):
#   1. build the package there (the CUDA extension for sm_90),
#   2. the GPU parity suites: the Triton tests run on CUDA tensors when TRITON_INTERPRET is unset
#      (bf16 included), the CUDA backend's `gpu`-marked tests,
#   3. the first timings: fwd+bwd at B=1024, D=512, C=1e5 and 1e6, ours against the reference and
#      the bare GEMMs, bf16 and fp32.
# Peers (pytorch-metric-learning, cut-cross-entropy, Liger) need `make bench-wheels` here first
# and `.whl` carried; without them their rows are skipped.
#
#   OUT=/some/dir bash bench/gpu_session.sh [extra bench/run.py flags]
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"

start=$(date +%s)
$PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(($(date +%s) - start)) s" | tee -a "$OUT/device.txt"

$PY -m pytest -q -ra tests/test_triton_backend.py tests/test_cuda_backend.py tests/test_api.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15

$PY bench/run.py --providers triton cuda torch gemm --losses arcface cosface sphereface \
    --batch 1024 --classes 1e5 1e6 --dim 512 --dtypes bf16 fp32 --modes fwd fwd+bwd \
    --sample-rates 1 0.1 --out "$OUT" "$@" 2>&1 | tail -20
# tables only: the device brings back at most 8 files; draw the PNGs from the CSV afterwards
$PY bench/plot.py "$OUT"/*.csv --no-plots --table-out "$OUT/table.md" 2>&1 | tail -5
ls -la "$OUT"
