#!/usr/bin/env bash
# Issue 7 (fast rollouts): the ONE check to run on a GPU machine (one H100 or H200), in the repository root.
#
#   1. here, on the dev machine (needs PyPI; the wheels are git-ignored, so each session makes them again):
#        bash benchmarks/device_check.sh prepare          # .whl/ is in .gitignore
#      The device image has torch but transformers 5.17 (this project needs >= 5.20: the `cache=` kwarg) and no
#      package of ours; transformers 5.24.0 and a recent regex travel as wheels for Python 3.12 (~13 MB).
#      Optionally, a rehearsal of the same plan on the CPU (tiny shapes, ~1 minute, results in device_out/):
#        bash benchmarks/device_check.sh rehearse         # or rehearse-baseline
#   2. through the device tool, once, with carry [".whl"] and timeout_s 500 (default plan; baseline: 470):
#        bash benchmarks/device_check.sh                  # or: ... baseline
#      then give the machine back. Results come back under $OUT: env.txt, gpu_tests.log, bench_*.json, bench.log
#
# Plans (each step has its own time limit, so a hang costs only that step; each benchmark writes its JSON after
# every section). Timings are from the H100 runs of 2026-11-27 (docs/benchmarks.md):
#   default   what has not run on a GPU yet. The `gpu` tests of the static engine that are new or failed last time
#             (<= 160 s: share_prompt_cache's attention against SDPA at the 7B shape, the "varlen" kernel against
#             SDPA, then graphs == eager, compiled == reference, memory released and greedy == reference at tiny and
#             1B, each with every kernel and with the shared prompt cache), then at 7B and at 1B: (7B only) the
#             attention kernels that take row lengths on the device (--attention-options), the compiled decode
#             over the same 512 tokens with sdpa, sdpa + share_prompt_cache, varlen and (7B only) sdpa with
#             fuse_projections, with and without the shared cache, stock generate, and the whole paper-shape
#             rollout with the fastest of those variants (<= 230 s, <= 80 s). Last plan's numbers:
#             docs/benchmarks.md.
#   defaults  (~300 s) the engine as it runs by default on CUDA (compiled, fused projections, shared prompt cache):
#             greedy == reference at 1B in fp32, the whole 1B paper-shape rollout, then greedy == reference at 1B with
#             each kernel
#   baseline  the benchmarks of the table in docs/benchmarks.md: 7B (kernels compared, stock, the whole rollout
#             ~106 s, LoRA merge check, LoRA GRPO step ~151 s; ~330 s in all), 1B (~70 s), tiny (~20 s).
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
PLAN=default
case "${1:-}" in
    "") ;;
    baseline) PLAN=baseline ;;
    defaults) PLAN=defaults ;;
    rehearse) SHRINK=("${TINY_CPU[@]}") ;;
    rehearse-baseline) SHRINK=("${TINY_CPU[@]}") PLAN=baseline ;;
    rehearse-defaults) SHRINK=("${TINY_CPU[@]}") PLAN=defaults ;;
    *) echo "usage: $0 [prepare|baseline|defaults|rehearse|rehearse-baseline|rehearse-defaults]" >&2 && exit 2 ;;
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

if [ "$PLAN" = default ]; then
    # 7B first: the goal's numbers. Four compiled variants over the same 512 steps, stock generate, then the whole
    # paper-shape rollout and a LoRA GRPO step with the fastest variant (so the step is measured with what would
    # become the default).
    KERNELS=sdpa+compile,sdpa+compile+shared,varlen+compile,sdpa+compile+shared+fused
    bench 370 7b --preset 7b --stock-steps 32 --compare-attention 512 --compile --attention-options \
        --compare-kernels $KERNELS --grpo-step
    T=tests/test_fast_rollout.py::test_gpu_
    gpu_tests 150 ${T}shared_prompt_attention_equals_sdpa ${T}varlen_attention_equals_sdpa \
        ${T}graphs_equal_eager_tiny ${T}compiled_graphs_equal_reference ${T}memory_released \
        ${T}greedy_equals_reference_preset -m gpu  # the new ones first
    bench 60 1b --preset 1b --stock-steps 32 --compare-attention 512 --compile \
        --compare-kernels sdpa+compile,sdpa+compile+shared
elif [ "$PLAN" = defaults ]; then
    T=tests/test_fast_rollout.py::test_gpu_
    gpu_tests 120 ${T}defaults_equal_reference_1b -m gpu
    bench 90 1b --preset 1b --stock-steps 16  # the library's defaults on CUDA
    gpu_tests 80 "${T}greedy_equals_reference_preset[1b]" -m gpu
else
    bench 340 7b --preset 7b --stock-steps 32 --compare-attention 512 --grpo-step --lora-merge-check 256
    bench 85 1b --preset 1b --stock-steps 64 --compare-attention 512
    bench 30 tiny --preset tiny --stock-steps 64
fi
date -u | tee -a "$OUT/bench.log"
