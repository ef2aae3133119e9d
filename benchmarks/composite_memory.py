"""Per-device memory of compositing at the paper's scale, planned ahead of time on this host.

  .venv/bin/python benchmarks/composite_memory.py                      # batch 1 and 8, 1 device
  .venv/bin/python benchmarks/composite_memory.py --devices 8 --batches 8 --shard always

Compiles the Compositor's batch function (`imprint_jax.compositing.sampler_memory`: the
50-step DDIM sampler with classifier-free guidance, the UNet on the doubled batch, plus the VAE
decode) for the stage-2 config's model (SD 1.5 UNet at 512 px, DINOv2 ViT-g/14 at 224 px, the
adapter, the SD VAE) from abstract inputs: nothing is allocated. For each batch and parameter
dtype it prints the parameters' bytes per device (exact, from their dtype and placement) and
XLA's `memory_analysis()`: arguments, outputs, temporaries, and their sum, the peak the compiled
function asks for. On CPU (virtual devices, `--devices N`) this is the CPU compiler's schedule
and the model's CPU forms of attention, as `imprint-jax plan` (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2 ** 30


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=1, help="virtual CPU devices (default 1)")
  p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--param-dtypes", default="float32,bfloat16")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16, as on"
                 " GPU/TPU)")
  p.add_argument("--shard", default="never", choices=("never", "always"))
  p.add_argument("--config", default="stage2", help="packaged config (stage2; stage2:tiny)")
  args = p.parse_args(argv)
  if "jax" not in sys.modules:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    # LLVM's optimisations off: they do not change XLA's buffer assignment (the same figures
    # on the tiny config) and the real model compiles several times faster without them.
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                               f"{args.devices} --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from imprint_jax import compositing
  from imprint_jax.train import run_config, setup

  c = run_config.load(args.config)
  cfg = setup.model_config(c)
  devices = jax.devices()[:args.devices]
  print(f"config {args.config}: E={c.data.encoder_size}, G={c.data.generator_size}, compute"
        f" {args.dtype}, {len(devices)} {devices[0].platform} device(s), params"
        f" {'split (fsdp)' if args.shard == 'always' else 'on every device'}", flush=True)
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    for pd in args.param_dtypes.split(","):
      t = time.perf_counter()
      m = compositing.sampler_memory(cfg, batch, param_dtype=pd, dtype=args.dtype,
                                     shard_params=args.shard, devices=devices,
                                     encoder_size=c.data.encoder_size,
                                     generator_size=c.data.generator_size)
      m.update(batch=batch, param_dtype=pd, compile_s=time.perf_counter() - t)
      rows.append(m)
      print(f"batch {batch:3d} ({m['rows']} rows)  params {pd:8s}  params/device"
            f" {m['params'] / GIB:6.2f} GiB  arguments {m['arguments'] / GIB:6.2f}  outputs"
            f" {m['outputs'] / GIB:6.2f}  temporaries {m['temporaries'] / GIB:6.2f}  peak"
            f" {m['peak'] / GIB:6.2f} GiB  (compiled in {m['compile_s']:.0f} s)", flush=True)
  return rows


if __name__ == "__main__":
  main()
