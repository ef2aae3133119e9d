#!/usr/bin/env bash
# Every real-scale GPU measurement in one go (docs/performance.md, "GPU scale"):
#
#   bash benchmarks/gpu.sh [LOG_DIR]
#
# In order of importance, so that a short device lease gets the first ones:
#   1. stage 2 at batch 8, JAX against PyTorch, plus a jax.profiler trace of 3 of our steps
#      and the device ops that took the most time (LOG_DIR/trace);
#   2. stage 2's UNet step on precomputed DINOv2 tokens (--object-tokens), both frameworks;
#   3. stage 1 at batch 8;
#   4. the sampler (50 DDIM steps, guidance 5) at batch 8 and 32 against a PyTorch loop over
#      the same diffusers UNet;
#   5. stage 2's JAX step alone with XLA attention everywhere (against 1's cuDNN attention);
#   6. stage 2's networks one by one (benchmarks/networks.py).
# Each runs in its own process, so each framework's allocator starts empty; about 3.5 minutes
# each on an H200, most of it building the JAX state and compiling. Stops at the first failure.
#
# The GPU machine's python3 must hold jax with CUDA, flax, optax, orbax and torch; packages it
# lacks (diffusers, ml_collections) can travel as wheels in .whl/, which are installed into
# /tmp/site and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-/tmp/imprint_gpu_bench}
mkdir -p "$log_dir"
if compgen -G ".whl/*.whl" > /dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() {  # NAME ARGS...: one benchmark process, its output also in LOG_DIR/NAME.log
  local name=$1; shift
  echo "=== $name: benchmarks/train_step.py --scale real $*"
  python3 benchmarks/train_step.py --scale real "$@" 2>&1 | tee "$log_dir/$name.log"
}
bench stage2 --stage 2 --batch 8 --repeats 4 --trace "$log_dir/trace"
bench stage2_tokens --stage 2 --batch 8 --repeats 4 --object-tokens
bench stage1 --stage 1 --batch 8 --repeats 4
echo "=== sampler: benchmarks/sampling.py --scale real --batches 8,32"
python3 benchmarks/sampling.py --scale real --batches 8,32 --warmup 1 --repeats 2 2>&1 \
  | tee "$log_dir/sampling.log"
bench stage2_xla_attention --stage 2 --batch 8 --repeats 4 --gpu-attention xla --only jax
echo "=== networks: benchmarks/networks.py --scale real --stage 2"
python3 benchmarks/networks.py --scale real --stage 2 --batch 8 --repeats 4 2>&1 \
  | tee "$log_dir/networks.log"
