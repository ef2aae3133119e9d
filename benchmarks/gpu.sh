#!/usr/bin/env bash
# Every real-scale GPU measurement in one go (docs/performance.md, "GPU scale"):
#
#   bash benchmarks/gpu.sh [LOG_DIR [NAME...]]
#
# In order of importance, so that a short device lease gets the first ones (NAME...: run only
# these, still in this order; names as below):
#   1. stage2_latents: the stage-2 step on cached latents and tokens (--inputs latents: the
#      trainer's step with data.latents and data.object_tokens, adapter + UNet only) at batch
#      8, JAX against PyTorch eager, plus a jax.profiler trace of 3 of our steps and the device
#      ops that took the most time (LOG_DIR/trace/stage2_latents);
#   2. stage2: the full stage-2 step (VAE encoder twice, DINOv2, adapter, UNet) at batch 8,
#      with its trace (LOG_DIR/trace/stage2);
#   3. stage2_latents_compile: 1 against torch.compile (UNet and adapter);
#   4. stage2_latents_b16: 1 at batch 16;
#   5. stage2_tokens: stage 2 on precomputed DINOv2 tokens only (--inputs tokens);
#   6. stage1: stage 1 at batch 8;
#   7. sampler: 50 DDIM steps, guidance 5, at batch 8 and 32 against a PyTorch loop over the
#      same diffusers UNet;
#   8. stage2_xla_attention: stage 2's JAX step alone with XLA attention everywhere (against
#      2's cuDNN attention);
#   9. networks: stage 2's networks one by one (benchmarks/networks.py).
# Each runs in its own process, so each framework's allocator starts empty; about 3.5 minutes
# each on an H200 for a full step, most of it building the JAX state and compiling. Stops at
# the first failure, except for 3 and 4 (torch.compile's toolchain, a batch that may not fit):
# their failure is reported and the script goes on.
#
# The GPU machine's python3 must hold jax with CUDA, flax, optax, orbax and torch; packages it
# lacks (diffusers, ml_collections) can travel as wheels in .whl/, which are installed into
# /tmp/site and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
log_dir=${1:-/tmp/imprint_gpu_bench}
shift $(( $# > 0 ? 1 : 0 ))
wanted=("$@")
mkdir -p "$log_dir"
if compgen -G ".whl/*.whl" > /dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
wanted() {  # NAME: is NAME among the requested items (all when none were named)?
  [[ ${#wanted[@]} -eq 0 ]] && return 0
  local w
  for w in "${wanted[@]}"; do [[ $w == "$1" ]] && return 0; done
  return 1
}
run() {  # NAME SCRIPT ARGS...: one benchmark process, its output also in LOG_DIR/NAME.log
  local name=$1 script=$2; shift 2
  wanted "$name" || return 0
  echo "=== $name: benchmarks/$script --scale real $*"
  python3 "benchmarks/$script" --scale real "$@" 2>&1 | tee "$log_dir/$name.log"
}
may_fail() {  # NAME ...: as run, reporting a failure instead of stopping
  run "$@" || echo "=== $1 failed (exit status $?); going on"
}
run stage2_latents train_step.py --stage 2 --inputs latents --batch 8 --repeats 4 \
  --trace "$log_dir/trace"
run stage2 train_step.py --stage 2 --batch 8 --repeats 4 --trace "$log_dir/trace"
may_fail stage2_latents_compile train_step.py --stage 2 --inputs latents --batch 8 \
  --repeats 4 --warmup 3 --torch-compile
may_fail stage2_latents_b16 train_step.py --stage 2 --inputs latents --batch 16 --repeats 4
run stage2_tokens train_step.py --stage 2 --inputs tokens --batch 8 --repeats 4
run stage1 train_step.py --stage 1 --batch 8 --repeats 4
run sampler sampling.py --batches 8,32 --warmup 1 --repeats 2
run stage2_xla_attention train_step.py --stage 2 --batch 8 --repeats 4 --gpu-attention xla \
  --only jax
run networks networks.py --stage 2 --batch 8 --repeats 4
