#!/usr/bin/env bash
# Issue 7 (fast rollouts): the ONE check to run on a GPU machine (one H100 or H200), in the repository root.
#
#   1. here, on the dev machine (needs PyPI; the wheels are git-ignored, so each session makes them again):
#        bash benchmarks/device_check.sh prepare          # .whl/ is in .gitignore
#      The device image has torch but transformers 5.17 (this project needs >= 5.20: the `cache=` kwarg) and no
#      package of ours; transformers 5.24.0 and a recent regex travel as wheels for Python 3.12 (~13 MB).
#      and, optionally, a rehearsal of this very script on the CPU (tiny shapes, every step, ~1 minute; the wheels are
#      for Python 3.12 and are not installed then; results in device_out/):
#        bash benchmarks/device_check.sh rehearse
#   2. through the device tool, once, with carry [".whl"] and timeout_s 560:
#        bash benchmarks/device_check.sh
#      then give the machine back. Results come back under $OUT:
#        env.txt, gpu_tests.log, bench_7b.json, bench_1b.json, bench_tiny.json, bench.log
#
# Expected runtime on one H100 (estimates: nothing here has run on a GPU yet) about 7.5 minutes, at most 9: every step
# has its own time limit, so a hang costs only that step; the most important numbers come first, and each benchmark
# writes its JSON after every section, short sections first:
#   tests: the CPU ones and the `gpu` ones (graphs == eager, greedy == reference at tiny and 1B, fp32; memory
#     released; chunked log-probs' peak memory)                                                          ~50 s, <=85 s
#   7B preset, paper shape, one process (one model build): build ~30 s; kernels compared over 512 tokens ~20 s;
#     stock generate + guidance, 32 steps ~15 s; the static engine's whole rollout (5 x ~5.5k tokens with guidance
#     after a ~4.2k-token prompt) ~70 s at 80 steps/s; LoRA: static engine over 256 tokens unmerged / merged and the
#     merge cost ~20 s; the LoRA GRPO step (rollout ~75 s, log-probs + loss + backward ~20 s)            ~250 s, <=330 s
#   1B preset, paper shape: build ~15 s, kernels ~10 s, stock 64 steps ~10 s, rollout ~40 s                ~75 s, <=85 s
#   tiny preset, paper shape: static engine + stock generate                                               ~15 s, <=30 s
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
PLAN=full
case "${1:-}" in
    rehearse) SHRINK=(--preset tiny --device cpu --lr-size 32 --stage-sizes 16,16,32 --max-new-tokens 200 --stock-steps 8) ;;
    rehearse-compile)
        SHRINK=(--preset tiny --device cpu --lr-size 32 --stage-sizes 16,16,32 --max-new-tokens 200 --stock-steps 8)
        PLAN=compile
        ;;
    compile) PLAN=compile ;;
    "") ;;
    *) echo "usage: $0 [prepare|rehearse|compile|rehearse-compile]" >&2 && exit 2 ;;
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

if [ "$PLAN" = compile ]; then
    # The follow-up of a full check (~5 minutes): the 7B rollout with the decode step compiled (compile_step), the
    # uncompiled step over the same 512 tokens in the same process, then the GPU tests of the compiled step.
    bench 190 7b --preset 7b --stock-steps 32 --compare-attention 512 --compare-kernels sdpa,sdpa+compile --compile
    gpu_tests 45 tests/test_fast_rollout.py -m gpu -k "compiled or preset"
else
    # 1. tests: every test of the static engine, the CPU ones and the GPU ones
    gpu_tests 100 tests/test_fast_rollout.py tests/test_logprobs.py -m "gpu or not gpu"
    # 2. benchmarks
    bench 330 7b --preset 7b --stock-steps 32 --compare-attention 512 --compare-kernels sdpa,matmul,sdpa+compile \
        --compile --grpo-step --lora-merge-check 256
    bench 85 1b --preset 1b --stock-steps 64 --compare-attention 512 --compare-kernels sdpa,sdpa+compile --compile
    bench 30 tiny --preset tiny --stock-steps 64
fi
date -u | tee -a "$OUT/bench.log"
