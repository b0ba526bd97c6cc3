#!/usr/bin/env bash
# One-shot GPU check on one H100, at most ~13.5 minutes (the stage limits' sum; most stages
# finish well under), installing nothing (the GPU host has
# jax 0.11.2, pytest, hypothesis, flax, torch and transformers): the GPU-marked tests, then
# the attention benchmark (TFLOP/s and ratio to cuDNN for prefill, GB/s and fraction of HBM
# for decode), then Scout-shaped layers in bf16 against HF transformers, the quantized
# layers, the engine's host overhead and speculative decoding on the bundled model. Each
# stage has its own time limit, so one that hangs or fails does not lose the others' output.
#
#     bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
status=0

stage() {  # stage SECONDS COMMAND...: run it under a time limit, remember a failure
    local limit=$1
    shift
    echo
    echo "=== $* (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== exit $rc after $((SECONDS - start)) s: $*"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
stage 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/pallas_kernels tests/jaxllm
stage 180 "$PY" scripts/bench_attention.py
stage 140 "$PY" scripts/bench_generate.py --preset scout-4layers --num-layers 2 \
    --dtype bfloat16 --batch 8 --prompt-len 128 --new-tokens 32 --repeats 2
stage 180 "$PY" scripts/bench_quant.py --preset scout --tokens 64
# The engine's host work against the device (on a GPU the real-model table means something).
stage 100 "$PY" scripts/bench_engine_overhead.py --steps 10 --no-server
# Speculative decoding on the bundled model: tokens per step and tok/s with and without drafts.
stage 90 "$PY" scripts/bench_spec.py --requests 16
echo
echo "=== gpu_check: $([ "$status" -eq 0 ] && echo all stages passed || echo a stage failed)"
exit "$status"
