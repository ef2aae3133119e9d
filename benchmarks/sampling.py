"""Compositing speed and memory: our compiled sampler against a PyTorch loop over the same nets.

  .venv/bin/python benchmarks/sampling.py                        # CPU scale
  .venv/bin/python benchmarks/sampling.py --scale real --batch 8 # SD 1.5 + ViT-g, GPU/TPU
  .venv/bin/python benchmarks/sampling.py --batches 8,32         # images/s at larger batches

A composite = encode the object (DINOv2 + adapter), VAE-encode the masked and the full
background, 50 DDIM steps with classifier-free guidance (the UNet runs on the doubled batch,
9 input channels: noisy latent, masked-background latent, mask), latent blending of the
background after every step, VAE decode. Measured at batch 1 (seconds per composite) and at
`--batch` (images/s), or at each of `--batches`.

Ours: `imprint_jax.diffusion.generate.composite_latents` + `decode_latent`, jitted as one function (the
sampler is one `fori_loop`), per-image keys as the Compositor uses them. PyTorch: diffusers
`UNet2DConditionModel` / `AutoencoderKL`, transformers DINOv2, `ContentAdapterTorch`, the SD
`DDIMScheduler` (scaled_linear, steps_offset 1, set_alpha_to_one false), CFG by hand on the
doubled batch, blending with `scheduler.add_noise`. Both use the same weights: the torch
networks are built at random, saved with `save_pretrained` and loaded into JAX with
`imprint_jax.convert`. float32 on CPU, bf16 compute on accelerators.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

common.single_jax_device()

GUIDANCE = 5.0


def build_models(model_cfg, dtype: str, torch_device, folder: Path):
  """(JAX Imprint, torch nets) with the same random weights, via PyTorch folders."""
  import torch
  from safetensors.torch import save_file

  from diffusers.utils import logging as diffusers_logging
  from transformers.utils import logging as transformers_logging

  from imprint_jax import convert
  from imprint_jax.convert import interop
  diffusers_logging.disable_progress_bar()
  transformers_logging.disable_progress_bar()
  torch.manual_seed(0)
  dino, adapter, unet, vae = common.torch_models(model_cfg, torch.device("cpu"))
  dino.save_pretrained(folder / "dinov2")
  unet.save_pretrained(folder / "unet")
  vae.save_pretrained(folder / "vae")
  (folder / "adapter").mkdir()
  (folder / "adapter" / "config.json").write_text(
      json.dumps(convert.adapter.config_to_json(model_cfg.adapter)))
  save_file({k: v.contiguous() for k, v in adapter.state_dict().items()},
            str(folder / "adapter" / "model.safetensors"))
  model = interop.assemble(convert.load_dinov2(folder / "dinov2", dtype=dtype),
                           convert.load_adapter(folder / "adapter", dtype=dtype),
                           convert.load_unet(folder / "unet", dtype=dtype),
                           convert.load_vae(folder / "vae", dtype=dtype))
  nets = tuple(m.to(torch_device).eval() for m in (dino, adapter, unet, vae))
  return model, nets


class JaxSampler:
  """Our jitted composite for one batch size."""

  def __init__(self, model, inputs: dict, steps: int, device):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from imprint_jax.diffusion import generate
    from imprint_jax.parallel import compiler
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(nnx.to_pure_dict(state), device)  # as imprint_jax.compositing
    b = inputs["object"].shape[0]
    self.args = [jax.device_put(inputs[k], device) for k in ("object", "background", "mask")]
    self.keys = jax.device_put(jax.vmap(jax.random.PRNGKey)(jnp.arange(b)), device)

    def run(state, obj, bg, mask, keys):
      m = nnx.merge(graphdef, state)
      z = generate.composite_latents(m, obj, bg, mask, keys, num_steps=steps,
                                     guidance=GUIDANCE)
      return generate.decode_latent(m, z)

    t = time.perf_counter()
    self.compiled = jax.jit(run).lower(self.state, *self.args, self.keys).compile(
        compiler_options=compiler.compiler_options(device.platform))
    self.compile_s = time.perf_counter() - t
    self.planned_bytes = common.xla_planned_bytes(self.compiled)

  def __call__(self):
    import jax
    return jax.block_until_ready(self.compiled(self.state, *self.args, self.keys))


class TorchSampler:
  """The same composite as a PyTorch loop (see the module docstring)."""

  def __init__(self, nets, model_cfg, inputs: dict, steps: int, device, dtype: str):
    import torch
    from diffusers import DDIMScheduler
    self.dino, self.adapter, self.unet, self.vae = nets
    self.device, self.dtype = device, dtype
    self.scaling = model_cfg.vae.scaling_factor
    self.factor = model_cfg.vae.downsample_factor
    self.steps = steps
    self.sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1,
                               prediction_type="epsilon")
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    self.obj, self.bg, self.mask = (nchw(inputs[k]) for k in ("object", "background", "mask"))
    self.gen = torch.Generator(device=device)

  @property
  def modules(self):
    return [self.dino, self.adapter, self.unet, self.vae]

  def composite(self):
    import torch
    import torch.nn.functional as F
    b = self.obj.shape[0]
    self.gen.manual_seed(0)
    with torch.no_grad(), common.autocast(self.device, self.dtype):
      ctx = self.adapter(self.dino(pixel_values=self.obj).last_hidden_state)
      null = self.adapter.null(b, ctx.shape[1]).to(ctx.dtype)
      both_ctx = torch.cat([ctx, null])
      z_bg = self.vae.encode(self.bg * (1 - self.mask)).latent_dist.mean * self.scaling
      z_full = self.vae.encode(self.bg).latent_dist.mean * self.scaling
      m_lat = F.max_pool2d(self.mask, self.factor)
      cond = torch.cat([z_bg, m_lat], dim=1).float()
      cond2 = torch.cat([cond, cond])
      x = torch.randn(z_full.shape, generator=self.gen, device=self.device)
      blend_noise = x  # blending re-noises with the initial noise, as generate.py does
      self.sched.set_timesteps(self.steps, device=self.device)
      ratio = self.sched.config.num_train_timesteps // self.steps
      for t in self.sched.timesteps:
        inp = torch.cat([torch.cat([x, x]), cond2], dim=1)
        out = self.unet(inp, t, encoder_hidden_states=both_ctx).sample.float()
        eps_c, eps_u = out.chunk(2)
        eps = eps_c + (GUIDANCE - 1.0) * (eps_c - eps_u)
        x = self.sched.step(eps, t, x).prev_sample
        t_next = torch.clamp(t - ratio, min=0).reshape(1)
        keep = self.sched.add_noise(z_full.float(), blend_noise, t_next)
        x = m_lat * x + (1 - m_lat) * keep
      img = self.vae.decode(x / self.scaling).sample.float().clamp(-1, 1)
    return img

  def __call__(self):
    img = self.composite()
    common.torch_sync(self.device)
    return img


def inputs_for(batch: int, sc: common.Scale, seed: int) -> dict:
  b = common.random_batch(2, batch, sc.encoder_size, sc.generator_size, seed)
  return {"object": b["object"], "background": b["target"], "mask": b["mask"]}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_flags(p)
  p.set_defaults(warmup=1, repeats=3)
  p.add_argument("--batch", type=int, default=8, help="batch of the images/s measurement")
  p.add_argument("--batches", default=None, help="comma-separated batch sizes to measure"
                 " instead of 1 and --batch, e.g. 8,32")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
  p.add_argument("--profile", action="store_true",
                 help="also split one batch composite's time by network on both sides")
  args = p.parse_args(argv)
  try:
    batches = (sorted({int(b) for b in args.batches.split(",")}) if args.batches
               else sorted({1, args.batch}))
  except ValueError:
    p.error(f"--batches {args.batches!r}: expected comma-separated integers, e.g. 8,32")
  if batches[0] < 1:
    p.error("--batches: sizes must be >= 1")
  env = common.setup(args)
  jax_device, torch_device, dtype = env.jax_device, env.torch_device, env.dtype

  from benchmarks import flops
  from imprint_jax.models import attention
  from imprint_jax.train import setup as setup_lib
  sc = common.scale(args.scale)
  print(f"scale {sc.name}: E={sc.encoder_size}, G={sc.generator_size}, {args.steps} DDIM steps,"
        f" guidance {GUIDANCE} (UNet batch doubled), dtype {dtype}; {args.warmup} warm-up +"
        f" {args.repeats} timed composites per framework, alternating\n")
  c = common.run_config(sc, 2, batch=batches[-1], dtype=dtype, remat="none")
  model_cfg = setup_lib.model_config(c)
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    model, nets = build_models(model_cfg, dtype, torch_device, Path(tmp))
    print(f"built both models (same weights) in {time.perf_counter() - t:.0f} s", flush=True)
  results = []
  with attention.gpu_attention(args.gpu_attention):
    for batch in batches:
      inputs = inputs_for(batch, sc, args.seed)
      ours = JaxSampler(model, inputs, args.steps, jax_device)
      theirs = TorchSampler(nets, model_cfg, inputs, args.steps, torch_device, dtype)
      print(f"batch {batch}: JAX sampler compiled in {ours.compile_s:.0f} s", flush=True)
      times = common.alternate({"jax": ours, "torch": theirs}, warmup=args.warmup,
                               repeats=args.repeats)
      mem = {"jax": common.jax_peak_bytes(jax_device) or ours.planned_bytes}
      mem["torch"] = common.torch_peak_bytes(
          theirs, torch_device, [*theirs.modules, theirs.obj, theirs.bg, theirs.mask])
      f = flops.composite(model_cfg, batch, sc.encoder_size, sc.generator_size, args.steps)
      results.append({"batch": batch, "times": times, "mem": mem, "flops": f})
      del ours
      if args.profile and batch == batches[-1]:
        results[-1]["profile"] = profile(model, theirs, inputs, args.steps, jax_device,
                                         torch_device)
  print(report(results, common.peak_tflops(jax_device.device_kind)))
  for r in results:
    if "profile" in r:
      print("\n" + profile_report(r))
  print(f"\nload average at the end: {common.load_average()}")
  return results


def profile(model, theirs: TorchSampler, inputs: dict, steps: int, jax_device,
            torch_device) -> dict:
  """Per-network times of one composite: JAX from an instrumented copy of the sampler (named
  scopes; same computation), torch from torch.profiler."""
  undo = common.scope_model_parts()
  try:
    ours = JaxSampler(model, inputs, steps, jax_device)
  finally:
    undo()
  ours()
  jx = (common.xla_cpu_breakdown(ours, ours.compiled, calls=1)
        if jax_device.platform == "cpu" else None)
  tr = common.torch_breakdown(
      theirs.composite, {"vae": theirs.vae.encoder, "vae_decode": theirs.vae.decoder,
                         "dinov2": theirs.dino, "adapter": theirs.adapter,
                         "unet": theirs.unet}, lambda: common.torch_sync(torch_device))
  return {"jax": jx, "torch": tr}


def profile_report(r: dict) -> str:
  jx, tr = r["profile"]["jax"], r["profile"]["torch"]
  rows = []
  for part in (*common.PARTS, "loss+optimizer"):
    j = jx["parts"].get((part, "forward")) if jx else None
    t = tr["parts"].get(part)
    name = "sampler glue" if part == "loss+optimizer" else part
    if j is None and t is None:
      continue
    rows.append([name, "" if j is None else f"{j:.0f}", "" if t is None else f"{t:.0f}"])
  rows.append(["total", f"{sum(jx['parts'].values()):.0f}" if jx else "", f"{tr['total']:.0f}"])
  lines = [f"batch {r['batch']} composite profile (JAX: XLA CPU thunk times; torch:"
           f" torch.profiler; 'sampler glue' = CFG, DDIM update, blending, noise)",
           common.table(["network", "JAX ms", "torch ms"], rows)]
  if jx:
    tot = sum(jx["kinds"].values())
    lines.append("  JAX by op kind: " + ", ".join(
        f"{k} {v:.0f} ms ({100 * v / tot:.0f}%)"
        for k, v in sorted(jx["kinds"].items(), key=lambda kv: -kv[1])))
    lines.append("  JAX top thunks per network:")
    for part, items in jx["top_by_part"].items():
      lines += [f"    {part:14s} {ms:6.1f}  {name}  {kind}  {shape}  {op[-50:]}"
                for ms, name, kind, shape, op in items]
  lines.append("  torch top ops by self time (ms, op, calls):")
  lines += [f"    {ms:6.1f}  {name}  x{n}" for ms, name, n in tr["top"][:8]]
  return "\n".join(lines)


def report(results: list[dict], peak: float | None) -> str:
  rows = []
  for r in results:
    b = r["batch"]
    for k, ts in r["times"].items():
      med = common.median(ts)
      tf, mfu = common.fmt_tflops(r["flops"].total, med, peak)
      rows.append([f"batch {b}", k, f"{med / b:.2f}", f"{b / med:.3f}", common.spread(ts), tf, mfu,
                   common.gib(r["mem"].get(k))])
    ratio = common.median(r["times"]["torch"]) / common.median(r["times"]["jax"])
    mem_ratio = (r["mem"]["jax"] / r["mem"]["torch"]
                 if r["mem"].get("jax") and r["mem"].get("torch") else None)
    rows.append([f"batch {b}", "jax/torch", f"{ratio:.2f}x", "", "", "", "",
                 f"{mem_ratio:.2f}x" if mem_ratio else ""])
  lines = [common.table(["composite", "framework", "s/image", "img/s", "ms median (min-max)",
                         "TFLOP/s", "MFU", "peak memory"], rows), ""]
  for r in results:
    f = r["flops"]
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in f.by_part.items())
    lines.append(f"batch {r['batch']}: {f.total / 1e9:.1f} model GFLOP per call ({parts})")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
