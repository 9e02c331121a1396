#!/usr/bin/env bash
# The GPU check: everything one short session on a GPU machine should produce, in one call and at
# most 8 minutes on an H100/H200, build included. For a machine without network access whose
# Python already has torch (CUDA build), Triton and nvcc; nothing is installed into that Python.
#
#   bash bench/gpu_check.sh OUTDIR            # run it
#   bash bench/gpu_check.sh --dry-run OUTDIR  # check the steps without a GPU (CI does this)
#
# Steps, each under its own time cap (seconds, overridable through the environment):
#   1. device      nvidia-smi and versions                                     CAP_DEVICE=15
#   2. build       margin_kernels._C in place (setup.py build_ext --inplace)   CAP_BUILD=110
#   3. selftest    python -m margin_kernels.selftest $SELFTEST_ARGS (default --quick: every kind
#                  in fp32 and bf16 plus the large GPU case; Triton compiles ~55 kernels on a
#                  cold cache; SELFTEST_ARGS="" runs the full list)             CAP_SELFTEST=90
#   4. bench       bench/run.py: bf16 ArcFace, B=1024, D=512, C=1e5 and 1e6, all classes and
#                  Partial-FC r=0.1, fwd and fwd+bwd; ours (triton, cuda), the eager reference,
#                  pytorch-metric-learning when importable, the bare GEMMs      CAP_BENCH=150
#   5. compiled    the reference under torch.compile, r=1 only (one compile per case)
#                                                                              CAP_COMPILE=60
#   6. tables      bench/plot.py -> table.md                                   CAP_TABLE=10
#   7. model       bench/model.py (when present): predicted next to measured   CAP_MODEL=20
# The caps add up to 455 s. A step that fails or runs out of time is noted in device.txt and the
# next step runs. Benchmark rows are appended as they are measured, so a capped step keeps what it
# measured. Pure-Python peer wheels in .whl/ (`make bench-wheels` on a machine with network) are
# put on the path first.
#
# Writes at most 8 files into OUTDIR: device.txt, build.log, selftest.log, bench.log,
# <gpu>.csv (bench/run.py's name for the device), table.md, model.csv, model.md.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
OUT=$1
PY=${PYTHON:-python3}
CAP_DEVICE=${CAP_DEVICE:-15} CAP_BUILD=${CAP_BUILD:-110} CAP_SELFTEST=${CAP_SELFTEST:-90}
CAP_BENCH=${CAP_BENCH:-150} CAP_COMPILE=${CAP_COMPILE:-60} CAP_TABLE=${CAP_TABLE:-10}
CAP_MODEL=${CAP_MODEL:-20}
SELFTEST_ARGS=${SELFTEST_ARGS---quick}
BENCH_SHAPE=(--losses arcface --dtypes bf16 --batch 1024 --dim 512 --classes 1e5 1e6)
BENCH_PROVIDERS=(triton cuda torch gemm pml cce liger)  # peers are skipped when not installed
HAS_MODEL=0
[ -f bench/model.py ] && HAS_MODEL=1

export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET

# The model's machine: the GPU's name says H100 or H200; otherwise both are tabled.
machine() {
    local name
    name=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
    case "$name" in
        *H200*) echo h200 ;;
        *H100*) echo h100 ;;
        *) echo both ;;
    esac
}

if [ "$DRY_RUN" = 1 ]; then
    failed=0
    check() {  # check DESCRIPTION COMMAND...: run it quietly, print ok or FAIL
        if "${@:2}" >/dev/null 2>&1; then
            echo "ok    $1"
        else
            echo "FAIL  $1: ${*:2}"
            failed=1
        fi
    }
    check "python ($PY)" command -v "$PY"
    check "timeout" command -v timeout
    check "torch imports" "$PY" -c "import torch"
    check "setup.py --name (build step)" "$PY" setup.py --name
    check "selftest --help" "$PY" -m margin_kernels.selftest --help
    check "bench/run.py --help" "$PY" bench/run.py --help
    check "bench/run.py --list" "$PY" bench/run.py --list
    check "bench/plot.py --help" "$PY" bench/plot.py --help
    if [ "$HAS_MODEL" = 1 ]; then
        check "bench/model.py --help" "$PY" bench/model.py --help
    else
        echo "skip  bench/model.py is absent: step 7 would be skipped"
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "ok    nvidia-smi"
    else
        echo "note  nvidia-smi not found: step 1 would print torch's view of the device only"
    fi
    total=$((CAP_DEVICE + CAP_BUILD + CAP_SELFTEST + CAP_BENCH + CAP_COMPILE + CAP_TABLE + CAP_MODEL))
    echo "caps: device $CAP_DEVICE + build $CAP_BUILD + selftest $CAP_SELFTEST + bench $CAP_BENCH" \
        "+ compiled $CAP_COMPILE + tables $CAP_TABLE + model $CAP_MODEL = $total s (limit 480 s)"
    [ "$total" -le 480 ] || { echo "FAIL  the caps exceed 8 minutes"; failed=1; }
    echo "steps:"
    echo "  $PY setup.py build_ext --inplace"
    echo "  $PY -m margin_kernels.selftest $SELFTEST_ARGS"
    echo "  $PY bench/run.py --providers ${BENCH_PROVIDERS[*]} ${BENCH_SHAPE[*]} --modes fwd fwd+bwd --sample-rates 1 0.1 --out $OUT"
    echo "  $PY bench/run.py --providers torch-compile ${BENCH_SHAPE[*]} --modes fwd+bwd --sample-rates 1 --out $OUT"
    echo "  $PY bench/plot.py $OUT/*.csv --no-plots --table-out $OUT/table.md"
    [ "$HAS_MODEL" = 1 ] && echo "  $PY bench/model.py --machine \$(h100|h200|both) --markdown $OUT/model.md --csv $OUT/model.csv"
    echo "files it would write into $OUT (8 at most):"
    for f in device.txt build.log selftest.log bench.log "<gpu>.csv" table.md model.csv model.md; do
        echo "  $f"
    done
    exit "$failed"
fi

mkdir -p "$OUT"
DEVICE_TXT=$OUT/device.txt
: >"$DEVICE_TXT"
# step NAME CAP LOG COMMAND...: run under `timeout`, note the time and the outcome in device.txt
step() {
    local name=$1 cap=$2 log=$3 start rc
    shift 3
    start=$(date +%s)
    timeout --kill-after=5 "$cap" "$@" >>"$log" 2>&1
    rc=$?
    local outcome="ok"
    [ "$rc" -eq 0 ] || outcome="exit $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && outcome="stopped at its cap of $cap s"
    echo "step $name: $outcome after $(($(date +%s) - start)) s" | tee -a "$DEVICE_TXT"
    return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:$site
fi

begin=$(date +%s)
{
    command -v nvidia-smi >/dev/null &&
        timeout "$CAP_DEVICE" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    timeout "$CAP_DEVICE" "$PY" -c "import platform, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device visible'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      'python', platform.python_version(), 'device', gpu)"
} >>"$DEVICE_TXT" 2>&1
# pyproject.toml's SPDX license string needs setuptools >= 77; an older preinstalled setuptools
# rejects it before setup.py runs, so the build then reads the older table form (restored after).
pyproject_orig=
if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
    echo "setuptools < 77: the build reads pyproject.toml's license in the table form" >>"$DEVICE_TXT"
    pyproject_orig=$(mktemp) && cp pyproject.toml "$pyproject_orig"
    sed -i 's/^license = "Apache-2.0"$/license = { text = "Apache-2.0" }/; /^license-files = /d' \
        pyproject.toml
fi
step build "$CAP_BUILD" "$OUT/build.log" "$PY" setup.py build_ext --inplace ||
    tail -20 "$OUT/build.log"
[ -n "$pyproject_orig" ] && mv "$pyproject_orig" pyproject.toml
# shellcheck disable=SC2086  # SELFTEST_ARGS is a list of flags
step selftest "$CAP_SELFTEST" "$OUT/selftest.log" "$PY" -m margin_kernels.selftest $SELFTEST_ARGS
tail -25 "$OUT/selftest.log"
step bench "$CAP_BENCH" "$OUT/bench.log" "$PY" bench/run.py --providers "${BENCH_PROVIDERS[@]}" \
    "${BENCH_SHAPE[@]}" --modes fwd fwd+bwd --sample-rates 1 0.1 --out "$OUT"
step compiled "$CAP_COMPILE" "$OUT/bench.log" "$PY" bench/run.py --providers torch-compile \
    "${BENCH_SHAPE[@]}" --modes fwd+bwd --sample-rates 1 --out "$OUT"
if compgen -G "$OUT/*.csv" >/dev/null; then
    csv=$(ls "$OUT"/*.csv | grep -v '/model.csv$' | head -1)
    step tables "$CAP_TABLE" "$OUT/bench.log" "$PY" bench/plot.py "$csv" --no-plots \
        --table-out "$OUT/table.md"
fi
if [ "$HAS_MODEL" = 1 ]; then
    step model "$CAP_MODEL" "$OUT/bench.log" "$PY" bench/model.py --machine "$(machine)" \
        --markdown "$OUT/model.md" --csv "$OUT/model.csv"
else
    echo "step model: skipped, bench/model.py is absent" | tee -a "$DEVICE_TXT"
fi
echo "total: $(($(date +%s) - begin)) s" | tee -a "$DEVICE_TXT"
ls -la "$OUT"
