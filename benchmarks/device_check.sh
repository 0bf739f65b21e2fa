#!/usr/bin/env bash
# Issue 7 (fast rollouts): the ONE check to run on a GPU machine (one H100 or H200), in the repository root.
#
#   1. here, on the dev machine (needs PyPI; the wheels are git-ignored, so each session makes them again):
#        bash benchmarks/device_check.sh prepare          # .whl/ is in .gitignore
#      The device image has torch but transformers 5.17 (this project needs >= 5.20: the `cache=` kwarg) and no
#      package of ours; transformers 5.24.0 and a recent regex travel as wheels for Python 3.12 (~13 MB).
#      Optionally, a rehearsal of a plan on the CPU (tiny shapes, ~1 minute, results in device_out/):
#        bash benchmarks/device_check.sh rehearse [PLAN]
#   2. through the device tool, once, with carry [".whl"] and timeout_s 590:
#        bash benchmarks/device_check.sh [PLAN]
#      then give the machine back. Results come back under $OUT: env.txt, gpu_tests.log, bench_*.json, bench.log
#
# Plans (each step has its own time limit, so a hang costs only that step; each benchmark writes its JSON after
# every section). Timings are from the H100 runs of 2026-11-27 (docs/benchmarks.md, runs C and D):
#   default   (~550 s) a regression check of the engine as it runs by default: at 7B the old default (sdpa, compiled)
#             against the new one (shared prompt cache and fused projections too) over the same 512 steps, stock
#             generate, the whole paper-shape rollout and a LoRA GRPO step (<= 300 s); the `gpu` tests but the two
#             1B ones (<= 160 s); greedy == reference at 1B with the defaults (<= 90 s)
#   kernels   (~500 s) run C (which had the since removed varlen kernel where split is now): every decode
#             attention kernel and option compared at 7B (with --attention-options) and at 1B, the whole rollout and
#             GRPO step with the fastest, the `gpu` tests of the static engine
#   defaults  (~300 s) run D: greedy == reference at 1B with the defaults, the whole 1B rollout, greedy == reference
#             at 1B with every kernel
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 regex==2026.11.19
    ls -la .whl
    exit 0
fi

# rehearse: the same steps on the CPU, every benchmark shrunk to the tiny preset and a small shape (later flags win)
SHRINK=()
TINY_CPU=(--preset tiny --device cpu --lr-size 32 --stage-sizes 16,16,32 --max-new-tokens 200 --stock-steps 8)
if [ "${1:-}" = rehearse ]; then
    SHRINK=("${TINY_CPU[@]}")
    shift
fi
PLAN=${1:-default}
case "$PLAN" in
    default | kernels | defaults) ;;
    *) echo "usage: $0 [prepare | [rehearse] [default|kernels|defaults]]" >&2 && exit 2 ;;
esac

OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ${#SHRINK[@]} -eq 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi

{
    date -u
    nvidia-smi
    python3 -c "import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

gpu_tests() {
    local limit=$1
    shift
    timeout "$limit" python3 -m pytest "$@" -q -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/gpu_tests.log"
}
# benchmarks: paper shape (G=5, 512^2 LR prompt, 128/256/512 stages, guidance 3.0)
bench() {
    local limit=$1 name=$2
    shift 2
    echo "== $name: python benchmarks/rollout.py $*" | tee -a "$OUT/bench.log"
    timeout "$limit" python3 benchmarks/rollout.py "$@" "${SHRINK[@]}" --json "$OUT/bench_$name.json" 2>&1 \
        | tee -a "$OUT/bench.log"
}

T=tests/test_fast_rollout.py::test_gpu_
if [ "$PLAN" = default ]; then
    bench 300 7b --preset 7b --stock-steps 32 --compare-attention 512 \
        --compare-kernels sdpa+compile,sdpa+compile+shared+fused --grpo-step
    gpu_tests 160 tests/test_logprobs.py tests/test_fast_rollout.py -m gpu -k "not 1b"
    gpu_tests 90 ${T}defaults_equal_reference_1b -m gpu
elif [ "$PLAN" = kernels ]; then
    KERNELS=sdpa+compile,sdpa+compile+shared,split+compile,sdpa+compile+shared+fused
    bench 370 7b --preset 7b --stock-steps 32 --compare-attention 512 --compile --attention-options \
        --compare-kernels $KERNELS --grpo-step
    gpu_tests 150 ${T}shared_prompt_attention_equals_sdpa ${T}split_attention_equals_sdpa \
        ${T}graphs_equal_eager_tiny ${T}compiled_graphs_equal_reference ${T}memory_released \
        ${T}greedy_equals_reference_preset -m gpu
    bench 60 1b --preset 1b --stock-steps 32 --compare-attention 512 --compile \
        --compare-kernels sdpa+compile,sdpa+compile+shared
else
    gpu_tests 120 ${T}defaults_equal_reference_1b -m gpu
    bench 90 1b --preset 1b --stock-steps 16  # the library's defaults on CUDA
    gpu_tests 80 "${T}greedy_equals_reference_preset[1b]" -m gpu
fi
date -u | tee -a "$OUT/bench.log"
