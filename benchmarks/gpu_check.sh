#!/usr/bin/env bash
# Device check of the Triton kernels (evonorm/triton_kernels.py) for a session with a GPU: CUDA tests (including the
# eager fallback, the operation count, CUDA-graph capture and the native launches of evonorm/triton_native.py), the
# layer benchmark on the issue-9 shapes (float32, and bfloat16 input; Python and native launches), the host time per
# layer call (direct and native launches against kernel[grid]), a kernel-by-kernel profile of two shapes, and the
# ResNet-50 training-step benchmark (float32, bfloat16 autocast; Python and native launches) with host profiles.
# Logs and JSON go to benchmarks/results; when $OUT is set (the device machine's result folder, which returns only a
# few files), to a scratch folder packed into $OUT/gpu_check.tar.gz after every step instead. Each step has
# its own time limit (STEP_TIMEOUT seconds, default 180; the CUDA tests TESTS_LIMIT, default 300), so that one slow step still leaves the others their time;
# the exit status is nonzero if any step failed or timed out. Named steps run alone; "compiled" (the ResNet-50 step
# under torch.compile, about 5 minutes of compiling) runs only when named.
#
#     bash benchmarks/gpu_check.sh                   # from the repository root or anywhere in it
#     bash benchmarks/gpu_check.sh compiled          # only the compiled-model step
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
[ -n "${OUT:-}" ] && out="$(mktemp -d)/gpu_check"
limit="${STEP_TIMEOUT:-180}"
mkdir -p "$out"
failed=0
step_rc=0
named=" $* "
on_request=" compiled "

step() {  # [STEP_LIMIT=s] step NAME COMMAND...: run if selected, with the time limit, log to $out/NAME.log
    local name="$1"
    shift
    if [ "$named" != "  " ]; then [[ "$named" == *" $name "* ]] || return 0
    elif [[ "$on_request" == *" $name "* ]]; then return 0; fi
    echo "== $name: $*" | tee "$out/$name.log"
    timeout "${STEP_LIMIT:-$limit}" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.log"
    step_rc=$rc
    [ "$rc" -eq 0 ] || failed=1
    if [ -n "${OUT:-}" ]; then  # whole or not at all: a call cut off mid-pack keeps the previous pack
        tar czf "$OUT/gpu_check.tmp" -C "$(dirname "$out")" gpu_check && mv "$OUT/gpu_check.tmp" "$OUT/gpu_check.tar.gz"
    fi
}

step env python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
# the CUDA cases only (the CPU and Triton-interpreter cases run in CI); each kernel test runs with whole row sets
# and in tiles
STEP_LIMIT=${TESTS_LIMIT:-300} step tests python -m pytest tests/test_triton_kernels.py tests/test_op_count.py tests/test_fast_layers.py \
    tests/test_layers.py -q -p no:cacheprovider -rs -k "cuda and not interp and not native"
# native launches (evonorm/triton_native.py) in a step of their own: a wrong launch would end its process; where
# they fail, the benchmarks below leave them out
step_rc=0
step tests-native python -m pytest tests/test_triton_native.py tests/test_triton_kernels.py -q -p no:cacheprovider -rs \
    -k "cuda and native"
native_impls=",fast-native" native_rows=""
[ "$step_rc" -eq 0 ] || { native_impls="" native_rows="--no-native"; }
step layers python benchmarks/layers.py --device cuda --shapes gpu --layers bn_relu,b0,s0 --budget 4 $native_rows \
    --json "$out/layers-cuda.json"
step layers-bf16 python benchmarks/layers.py --device cuda --shapes gpu --layers bn_relu,b0,s0 --budget 4 $native_rows \
    --dtype bfloat16 --json "$out/layers-cuda-bf16.json"
# host time per layer call on tiny tensors: direct and native launches against Triton's kernel[grid], BN-ReLU
step host python benchmarks/host_overhead.py --device cuda --calls 1000 $native_rows
step profile python benchmarks/layers.py --device cuda --shapes 32x256x56x56,32x2048x7x7 --layers bn_relu,b0,s0 \
    --budget 1 --profile $native_rows --json "$out/layers-cuda-profile.json"
# issue 9's ResNet-50 step: batch 64 x 224 px, float32 and bfloat16 autocast, each with a host profile of one step
# (where the host's time goes; it grew under autocast for the EvoNorms only)
step models python benchmarks/models.py --device cuda --batch 64 --layers bn_relu,b0,s0 --impls "fast$native_impls" \
    --steps 10 --host-profile --json "$out/models-preact_resnet50-cuda.json"
step models-bf16 python benchmarks/models.py --device cuda --batch 64 --layers bn_relu,b0,s0 \
    --impls "fast$native_impls" --steps 10 --autocast bfloat16 --host-profile \
    --json "$out/models-preact_resnet50-cuda-bf16.json"
# the same step compiled (what compile=true does in the pipeline), fp32; compile_s: the first step, with compiling
STEP_LIMIT=560 step compiled python benchmarks/models.py --device cuda --batch 64 --layers bn_relu,b0,s0 --impls fast \
    --steps 10 --compile --json "$out/models-preact_resnet50-cuda-compiled.json"
exit "$failed"
