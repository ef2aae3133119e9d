"""Each network of a training step on its own, our JAX code against PyTorch, in one run.

  .venv/bin/python benchmarks/networks.py              # CPU scale, stage 2's networks
  .venv/bin/python benchmarks/networks.py --stage 1    # DINOv2 trained too, 4-channel UNet

`benchmarks/train_step.py` times whole steps; this splits a step's work by network, so a gap
between the frameworks shows where it is. At the benchmark scale's shapes and batch, on the
same random inputs: the UNet forward + backward (gradients of all its parameters, the loss a
mean square of its output), the VAE encoder forward (frozen; a stage-2 step runs it twice),
DINOv2 forward (stage 1: + backward) and the adapter forward + backward. Ours: the networks of
`imprint_jax.models` through the documented fast path (`imprint_jax.models.pure`), jitted
with the step's compiler options, parameters as jit arguments;
theirs: diffusers / transformers / `imprint_jax.torch_adapter` built from the same configs
(`common.torch_models`), bf16 autocast on accelerators. Calls alternate (JAX, torch, ...) after
warm-up; medians are reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

common.single_jax_device()


def jax_networks(mc, inputs: dict, stage: int, device) -> dict:
  """name -> a no-argument callable running our network's work once (blocking)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from imprint_jax.models.imprint import Imprint
  from imprint_jax.models.pure import pure
  from imprint_jax.parallel import compiler
  put = lambda x: jax.device_put(x, device)
  model = Imprint(mc, rngs=nnx.Rngs(0))
  # Each network through the public fast path (`pure`), its own parameters only, so that
  # gradients are taken of nothing else.
  fns, params = {}, {}
  for name, method in (("unet", None), ("vae", "encode"), ("dinov2", None), ("adapter", None)):
    fns[name], p = pure(getattr(model, name), method)
    params[name] = put(p)
  x = {k: put(v) for k, v in inputs.items()}
  options = compiler.compiler_options(device.platform)

  def compile_(fn, name):
    with compiler.compiling_for(device.platform):
      compiled = jax.jit(fn).lower(params[name]).compile(options)
    return lambda: jax.block_until_ready(compiled(params[name]))

  def mean_square(t):
    return jnp.mean(jnp.square(t.astype(jnp.float32)))

  unet_loss = lambda p: mean_square(fns["unet"](p, x["latent"], x["t"], x["ctx"]))
  dinov2_loss = lambda p: mean_square(fns["dinov2"](p, x["object"]))
  adapter_loss = lambda p: mean_square(fns["adapter"](p, x["tokens"]))

  out = {"unet fwd+bwd": compile_(jax.grad(unet_loss), "unet"),
         "vae encode": compile_(lambda p: fns["vae"](p, x["target"])[0], "vae")}
  out["dinov2 " + ("fwd+bwd" if stage == 1 else "fwd")] = (
      compile_(jax.grad(dinov2_loss), "dinov2") if stage == 1
      else compile_(lambda p: fns["dinov2"](p, x["object"]), "dinov2"))
  out["adapter fwd+bwd"] = compile_(jax.grad(adapter_loss), "adapter")
  return out


def torch_networks(mc, inputs: dict, stage: int, device, dtype: str) -> dict:
  """The same work in PyTorch, same names as `jax_networks`."""
  import torch

  dino, adapter, unet, vae = common.torch_models(mc, device)
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(device)
  x = {k: nchw(v) if v.ndim == 4 else torch.from_numpy(v).to(device) for k, v in inputs.items()}
  sync = lambda: common.torch_sync(device)

  def grad_of(module, loss):
    def run():
      module.zero_grad(set_to_none=True)
      with common.autocast(device, dtype):
        value = loss()
      value.backward()
      sync()
    return run

  def no_grad(fn):
    def run():
      with torch.no_grad(), common.autocast(device, dtype):
        fn()
      sync()
    return run

  out = {"unet fwd+bwd": grad_of(unet, lambda: unet(x["latent"], x["t"], x["ctx"])
                                 .sample.float().square().mean()),
         "vae encode": no_grad(lambda: vae.encode(x["target"]).latent_dist.mean)}
  dino_out = lambda: dino(pixel_values=x["object"]).last_hidden_state
  out["dinov2 " + ("fwd+bwd" if stage == 1 else "fwd")] = (
      grad_of(dino, lambda: dino_out().float().square().mean()) if stage == 1
      else no_grad(dino_out))
  out["adapter fwd+bwd"] = grad_of(adapter, lambda: adapter(x["tokens"]).float().square().mean())
  return out


def random_inputs(mc, sc: common.Scale, batch: int, seed: int) -> dict:
  """NHWC float32 numpy inputs of each network at the scale's sizes."""
  import numpy as np

  from imprint_jax.models import dinov2, imprint
  rng = np.random.default_rng(seed)
  latent = sc.generator_size // imprint.vae_factor(mc.vae)
  tokens = dinov2.num_tokens(mc.dinov2, sc.encoder_size, sc.encoder_size)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  return {"latent": normal(batch, latent, latent, mc.unet.in_channels),
          "t": rng.integers(0, 1000, batch).astype(np.int32),
          "ctx": normal(batch, tokens, mc.unet.cross_attention_dim),
          "target": rng.uniform(-1, 1, (batch, sc.generator_size, sc.generator_size, 3))
                    .astype(np.float32),
          "object": normal(batch, sc.encoder_size, sc.encoder_size, 3),
          "tokens": normal(batch, tokens, mc.dinov2.hidden_size)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_flags(p)
  p.add_argument("--batch", type=int, default=None, help="batch (per device); default 8")
  p.add_argument("--stage", type=int, choices=(1, 2), default=2,
                 help="whose networks: 2 (default; 9-channel UNet, DINOv2 frozen) or 1")
  p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
  args = p.parse_args(argv)
  env = common.setup(args)
  from imprint_jax.models import attention
  from imprint_jax.train import setup as setup_lib
  sc = common.scale(args.scale)
  batch = args.batch or sc.batch
  c = common.run_config(sc, args.stage, batch=batch, dtype=env.dtype, remat="none")
  mc = setup_lib.model_config(c)
  inputs = random_inputs(mc, sc, batch, args.seed)
  print(f"scale {sc.name}, stage {args.stage}'s networks: batch {batch}, E={sc.encoder_size},"
        f" G={sc.generator_size}, dtype {env.dtype}; {args.warmup} warm-up + {args.repeats}"
        f" timed calls per network and framework, alternating\n", flush=True)
  with attention.gpu_attention(args.gpu_attention):
    ours = jax_networks(mc, inputs, args.stage, env.jax_device)
  theirs = torch_networks(mc, inputs, args.stage, env.torch_device, env.dtype)
  rows, times = [], {}
  for name in ours:
    t = common.alternate({"jax": ours[name], "torch": theirs[name]}, warmup=args.warmup,
                         repeats=args.repeats)
    times[name] = t
    ratio = common.median(t["torch"]) / common.median(t["jax"])
    rows.append([name, common.spread(t["jax"]), common.spread(t["torch"]), f"{ratio:.2f}x"])
  print(common.table(["network", "jax ms median (min-max)", "torch ms median (min-max)",
                      "jax/torch"], rows))
  print(f"\nload average at the end: {common.load_average()}")
  return times


if __name__ == "__main__":
  main()
