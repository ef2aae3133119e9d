"""Training-step speed and memory: our JAX step against the same step in PyTorch.

  .venv/bin/python benchmarks/train_step.py                         # CPU scale, both stages
  .venv/bin/python benchmarks/train_step.py --inputs latents        # stage 2, cached inputs
  .venv/bin/python benchmarks/train_step.py --scale real --batch 8  # SD 1.5 + ViT-g, GPU/TPU

Ours: `imprint_jax.train.setup.build` + `init_state` + `loop.compile_steps` (the AOT-compiled,
donated step the trainer runs) on one device. PyTorch: diffusers `UNet2DConditionModel` +
`AutoencoderKL`, transformers `Dinov2WithRegistersModel` (`Dinov2Model` without registers),
`imprint_jax.torch_adapter.ContentAdapterTorch`, built from the same configs
(`imprint_jax.convert`'s `config_to_diffusers`, `config_to_transformers`), doing the same
work: frozen VAE encode (stage 2: also of the masked target), object tokens with embedding
dropout to the learned null context, SD epsilon loss at uniform timesteps, global-norm
clipping, AdamW with one parameter group per component;
the same trainable parts (stage 1: DINOv2 + adapter + UNet up blocks/conv_norm_out/conv_out;
stage 2: adapter + whole UNet, DINOv2 frozen); float32 on CPU, bf16 compute on accelerators
(JAX: the config's compute dtype; torch: autocast). Both see the same random batch, resident
on the device. Steps alternate (JAX, torch, JAX, ...) after warm-up; medians are reported.

`--inputs` picks what a stage-2 batch holds, as the trainer's data options do:
  pixels   object image, target, mask, masked target (both sides run DINOv2 and twice the VAE
           encoder);
  tokens   precomputed DINOv2 tokens instead of the object image (`data.object_tokens`): no
           DINOv2 in the step;
  latents  precomputed tokens and VAE posteriors (`data.object_tokens` + `data.latents`): the
           batch holds the tokens, the target's and the masked background's posterior moments
           (float16 [mean, logvar], as `imprint_jax.data.latent_store` stores them) and the
           latent-resolution mask; no DINOv2 and no VAE in the step, which is then the adapter
           and the UNet forward + backward, the latent draws, the loss and the update. Torch
           draws its latents from the same moments (z = (mean + exp(logvar / 2) eps) x the
           VAE's scaling factor).
The cached inputs are random (timing only); the JAX side's config points at temporary folders
holding only the manifests, so `setup.build` takes the trainer's cached-input path and
checks them. The frozen DINOv2 and VAE stay in both sides' memory (the trainer's state holds
them too).
`--torch-compile` runs the torch side's UNet and adapter through `torch.compile` (default
mode; its compilation happens in the warm-up steps), the rows then read torch.compile.

Model FLOPs per step come from `benchmarks/flops.py` (the counting rule is in its docstring);
MFU divides the achieved rate by the device's dense bf16 peak (n/a on CPU). Peak memory:
accelerators: the allocators' peaks (JAX `peak_bytes_in_use`, torch `max_memory_allocated`);
CPU: XLA's planned peak for the compiled step (arguments + temporaries + non-aliased
outputs) and torch's MemTracker peak of live tensors over one untimed step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

common.single_jax_device()


class JaxStep:
  """Our compiled training step on one device, with a resident batch."""

  def __init__(self, c, batch_np: dict, device):
    import jax
    from imprint_jax.train import loop, setup as setup_lib
    t = time.perf_counter()
    self.setup = setup_lib.build(c, total_steps=10_000, steps_per_epoch=1_000,
                                 devices=[device])
    self.state = setup_lib.init_state(self.setup)
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t
    self.compiled, _ = loop.compile_steps(self.setup)
    self.compile_s = time.perf_counter() - t - self.init_s
    spec = self.setup.batch_spec(c.train.global_batch)
    self.batch = {k: jax.device_put(batch_np[k], spec[k].sharding) for k in spec}
    self.rng = jax.device_put(jax.random.PRNGKey(c.seed), jax.sharding.NamedSharding(
        self.setup.mesh, jax.sharding.PartitionSpec()))
    self.build_s = time.perf_counter() - t
    self.planned_bytes = common.xla_planned_bytes(self.compiled)
    self.device = device
    self.last_loss = None

  def __call__(self) -> None:
    import jax
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))
    self.last_loss = metrics["loss"]


class TorchStep:
  """The same step in PyTorch (see the module docstring)."""

  def __init__(self, c, model_cfg, batch_np: dict, device, dtype: str,
               compile_: bool = False):
    import torch
    import torch.nn.functional as F

    from imprint_jax.diffusion import schedules
    from imprint_jax.train import optim
    t0 = time.perf_counter()
    torch.manual_seed(c.seed)
    self.device, self.dtype, self.stage = device, dtype, c.stage
    self.dino, self.adapter, self.unet, self.vae = common.torch_models(model_cfg, device)
    self.vae.requires_grad_(False)
    # The modules the loss calls: compiled wrappers sharing the parameters, or the modules.
    self.adapter_fn = torch.compile(self.adapter) if compile_ else self.adapter
    self.unet_fn = torch.compile(self.unet) if compile_ else self.unet
    trained = {k for k, v in optim.schedules_from_config(c.components.to_dict()).items()
               if v is not None}
    groups: dict[str, list] = {"dinov2": [], "adapter": [], "unet_decoder": [],
                               "unet_rest": []}
    groups["dinov2"] = list(self.dino.parameters())
    groups["adapter"] = list(self.adapter.parameters())
    for name, p in self.unet.named_parameters():
      top = name.split(".")[0]
      groups["unet_decoder" if top in optim.UNET_DECODER else "unet_rest"].append(p)
    for name, params in groups.items():
      for p in params:
        p.requires_grad_(name in trained)
    self.dino_trained = "dinov2" in trained
    lrs = {k: v.phase_lrs[0] for k, v in optim.schedules_from_config(
        c.components.to_dict()).items() if v is not None}
    self.params = [p for k in sorted(trained) for p in groups[k]]
    self.opt = torch.optim.AdamW(
        [{"params": groups[k], "lr": lrs[k]} for k in sorted(trained)],
        betas=(c.train.b1, c.train.b2), eps=c.train.eps, weight_decay=c.train.weight_decay,
        fused=True)
    self.grad_clip = c.train.grad_clip
    self.p_drop = c.train.embed_dropout
    self.scaling = model_cfg.vae.scaling_factor
    self.factor = model_cfg.vae.downsample_factor
    abar = schedules.sd_schedule().alphas_cumprod
    self.abar = torch.tensor(abar.tolist(), dtype=torch.float32, device=device)
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    self.batch = {k: nchw(v) if v.ndim == 4 else torch.from_numpy(v).to(device)
                  for k, v in batch_np.items()}
    self.F = F
    self.build_s = time.perf_counter() - t0
    self.last_loss = None

  def loss(self):
    import torch
    F, b = self.F, self.batch
    B = next(iter(b.values())).shape[0]
    with common.autocast(self.device, self.dtype):
      with torch.no_grad():
        if "target_moments" in b:  # cached VAE posteriors (--inputs latents)
          z0 = self.sample(b["target_moments"])
          z_bg = self.sample(b["masked_target_moments"])
          m_lat = b["mask_latent"]
        else:
          z0 = self.vae.encode(b["target"]).latent_dist.sample() * self.scaling
          if self.stage == 2:
            z_bg = self.vae.encode(b["masked_target"]).latent_dist.sample() * self.scaling
            m_lat = F.max_pool2d(b["mask"], self.factor)
      if "object_tokens" in b:  # precomputed (--inputs tokens or latents)
        tokens = b["object_tokens"]
      elif self.dino_trained:
        tokens = self.dino(pixel_values=b["object"]).last_hidden_state
      else:
        with torch.no_grad():
          tokens = self.dino(pixel_values=b["object"]).last_hidden_state
      ctx = self.adapter_fn(tokens)
      drop = torch.rand(B, device=self.device) < self.p_drop
      ctx = torch.where(drop[:, None, None], self.adapter.null(B, ctx.shape[1]).to(ctx.dtype),
                        ctx)
      t = torch.randint(0, self.abar.shape[0], (B,), device=self.device)
      noise = torch.randn_like(z0)
      a = self.abar[t][:, None, None, None]
      x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
      if self.stage == 2:
        x_t = torch.cat([x_t, z_bg.to(x_t.dtype), m_lat.to(x_t.dtype)], dim=1)
      pred = self.unet_fn(x_t, t, ctx).sample
    return F.mse_loss(pred.float(), noise.float())

  def sample(self, moments_NCHW):
    """A scaled latent drawn from cached [mean, logvar] moments (as the JAX step does)."""
    import torch
    mean, logvar = moments_NCHW.float().chunk(2, dim=1)
    return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.scaling

  def step(self):
    import torch
    from torch.profiler import record_function
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss()
    with record_function("backward"):  # marks for --profile; negligible cost otherwise
      loss.backward()
    with record_function("optimizer"):
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
      self.opt.step()
    return loss

  def __call__(self) -> None:
    self.last_loss = self.step().detach()
    common.torch_sync(self.device)


INPUTS = ("pixels", "tokens", "latents")


def cached_inputs(batch_np: dict, inputs: str, model_cfg, sc: common.Scale, seed: int) -> dict:
  """A stage-2 pixel batch (`common.random_batch`) -> the batch the trainer's step gets with
  cached inputs (see the module docstring): random float16 DINOv2 tokens in place of the
  object (tokens, latents), random float16 posterior moments of the target and the masked
  background and the max-pooled mask in place of the images and the mask (latents)."""
  import numpy as np

  from imprint_jax.data import latent_store, token_store
  from imprint_jax.models.dinov2 import num_tokens
  from imprint_jax.models.imprint import vae_factor
  if inputs == "pixels":
    return batch_np
  rng = np.random.default_rng(seed + 1)
  out = dict(batch_np)
  B, d = len(out["object"]), model_cfg.dinov2
  out["object_tokens"] = rng.standard_normal(
      (B, num_tokens(d, sc.encoder_size, sc.encoder_size), d.hidden_size),
      np.float32).astype(token_store.DTYPE)
  del out["object"]
  if inputs == "latents":
    f = vae_factor(model_cfg.vae)
    h, ch = sc.generator_size // f, model_cfg.vae.latent_channels

    def moments():  # [mean, logvar] on channels; logvar in the SD VAE's usual range
      return np.concatenate([rng.standard_normal((B, h, h, ch), np.float32),
                             rng.uniform(-8.0, -2.0, (B, h, h, ch)).astype(np.float32)],
                            axis=-1).astype(latent_store.DTYPE)

    out["target_moments"] = moments()
    out["masked_target_moments"] = moments()
    out["mask_latent"] = np.stack([latent_store.latent_mask(m, f) for m in out["mask"]])
    for k in ("target", "masked_target", "mask"):
      del out[k]
  return out


def cache_folders(c, model_cfg, sc: common.Scale, inputs: str) -> None:
  """Points `c.data.object_tokens` (tokens, latents) and `c.data.latents` (latents) at
  temporary folders holding a store's manifest, removed at exit: enough for `setup.build`,
  which checks the manifests against the run, to compile the trainer's cached-input step."""
  import atexit
  import shutil
  import tempfile

  from imprint_jax.data import latent_store, token_store
  from imprint_jax.models.dinov2 import num_tokens
  from imprint_jax.models.imprint import vae_factor

  def folder(what):
    path = tempfile.mkdtemp(prefix=f"imprint-bench-{what}-")
    atexit.register(shutil.rmtree, path, True)
    return path

  if inputs == "pixels":
    return
  d = model_cfg.dinov2
  c.data.object_tokens = folder("tokens")
  token_store.write_manifest(c.data.object_tokens, encoder_size=sc.encoder_size, variants=1,
                             tokens=num_tokens(d, sc.encoder_size, sc.encoder_size),
                             width=d.hidden_size)
  if inputs == "latents":
    h = sc.generator_size // vae_factor(model_cfg.vae)
    c.data.latents = folder("latents")
    latent_store.write_manifest(
        c.data.latents, generator_size=sc.generator_size,
        latent=(h, h, 2 * model_cfg.vae.latent_channels),
        levels=latent_store.variant_levels(tuple(c.data.mask_level_probs), 1))


def measure(stage: int, args, sc: common.Scale, jax_device, torch_device, dtype: str,
            remat: str) -> dict:
  """Builds both steps of one stage, times them alternately, measures memory."""
  import numpy as np

  from benchmarks import flops
  from imprint_jax.train import setup as setup_lib
  c = common.run_config(sc, stage, batch=args.batch, dtype=dtype, remat=remat)
  c.seed = args.seed
  model_cfg = setup_lib.model_config(c)
  inputs = args.inputs if stage == 2 else "pixels"
  batch_np = cached_inputs(common.random_batch(stage, args.batch, sc.encoder_size,
                                               sc.generator_size, args.seed),
                           inputs, model_cfg, sc, args.seed)
  cache_folders(c, model_cfg, sc, inputs)
  undo = common.scope_model_parts() if args.profile else None
  try:
    jax_step = JaxStep(c, batch_np, jax_device)
  finally:
    if undo:
      undo()
  torch_step = TorchStep(c, model_cfg, batch_np, torch_device, dtype, args.torch_compile)
  label = f"stage {stage}" + ("" if inputs == "pixels" else f" ({inputs})")
  print(f"{label}: JAX state initialised in {jax_step.init_s:.0f} s and step compiled in"
        f" {jax_step.compile_s:.0f} s; torch step built in {torch_step.build_s:.0f} s",
        flush=True)
  fns = {"jax": jax_step, "torch": torch_step}
  if args.only:
    fns = {args.only: fns[args.only]}
  times = common.alternate(fns, warmup=args.warmup, repeats=args.repeats)
  losses = {k: float(np.asarray(f.last_loss.cpu() if k == "torch" else f.last_loss))
            for k, f in fns.items()}
  mem = {"jax": common.jax_peak_bytes(jax_device) or jax_step.planned_bytes}
  if "torch" in fns:
    torch_step.opt.zero_grad(set_to_none=True)
    mem["torch"] = common.torch_peak_bytes(
        torch_step.step, torch_device,
        [torch_step.dino, torch_step.adapter, torch_step.unet, torch_step.vae, torch_step.opt,
         *torch_step.batch.values()])
  f = flops.train_step(model_cfg, stage, args.batch, sc.encoder_size, sc.generator_size,
                       object_tokens=inputs != "pixels", latents=inputs == "latents")
  out = {"stage": stage, "label": label, "inputs": inputs,
         "torch_name": "torch.compile" if args.torch_compile else "torch",
         "times": times, "mem": mem, "planned": jax_step.planned_bytes,
         "memory_line": common.xla_memory_line(jax_step.compiled),
         "flops": f, "losses": losses, "jax_inputs": sorted(jax_step.batch),
         "build_s": {"jax": jax_step.build_s, "torch": torch_step.build_s}}
  if args.trace:
    # A jax.profiler trace of a few of our steps (TensorBoard's profile plugin or xprof reads
    # it): on accelerators, which op dominates the step.
    import jax
    trace_dir = Path(args.trace) / (f"stage{stage}" + ("" if inputs == "pixels" else
                                                        f"_{inputs}"))
    with jax.profiler.trace(str(trace_dir)):
      for _ in range(3):
        jax_step()
    print(f"{label}: jax.profiler trace of 3 steps in {trace_dir}", flush=True)
    print(common.trace_top_ops(trace_dir), flush=True)
  if args.profile:
    out["profile"] = {
        "jax": (common.xla_cpu_breakdown(jax_step, jax_step.compiled)
                if jax_device.platform == "cpu" else None),
        "torch": common.torch_breakdown(
            torch_step.step, {"vae": torch_step.vae.encoder, "dinov2": torch_step.dino,
                              "adapter": torch_step.adapter, "unet": torch_step.unet},
            lambda: common.torch_sync(torch_device))}
  return out


def profile_report(r: dict) -> str:
  """Where one step's time goes, per network and direction, on both sides."""
  jx, tr = r["profile"]["jax"], r["profile"]["torch"]
  lines = [f"{r['label']} profile of one step (JAX: XLA CPU thunk times from"
           f" jax.profiler; torch: torch.profiler CPU times)"]
  rows = []
  for part in (*common.PARTS, "loss+optimizer"):
    jf = jx["parts"].get((part, "forward"), 0.0) if jx else None
    jb = jx["parts"].get((part, "backward"), 0.0) if jx else None
    tf = tr["parts"].get(part) if part != "loss+optimizer" else tr["parts"].get("optimizer")
    rows.append([part, "" if jf is None else f"{jf:.0f}", "" if jb is None else f"{jb:.0f}",
                 "" if tf is None else f"{tf:.0f}"])
  if jx:
    jb_total = sum(v for (p, d), v in jx["parts"].items() if d == "backward")
    rows.append(["backward (all)", "", f"{jb_total:.0f}", f"{tr['parts'].get('backward', 0):.0f}"])
    rows.append(["total", f"{sum(jx['parts'].values()):.0f}", "", f"{tr['total']:.0f}"])
  lines.append(common.table(["network", "JAX fwd ms", "JAX bwd ms", "torch ms (fwd; bwd row)"],
                            rows))
  lines.append("  torch's loss+optimizer row is clipping + AdamW only; JAX's also holds the"
               " loss, noise and dropout")
  if jx:
    tot = sum(jx["kinds"].values())
    lines.append("  JAX by op kind: " + ", ".join(
        f"{k} {v:.0f} ms ({100 * v / tot:.0f}%)"
        for k, v in sorted(jx["kinds"].items(), key=lambda kv: -kv[1])))
    lines.append("  JAX top thunks (ms, thunk, kind, shape, op_name):")
    lines += [f"    {ms:6.1f}  {name}  {kind}  {shape}  {op[-60:]}"
              for ms, name, kind, shape, op in jx["top"][:8]]
    lines.append("  JAX top thunks per network:")
    for part, items in jx["top_by_part"].items():
      lines += [f"    {part:14s} {ms:6.1f}  {name}  {kind}  {shape}  {op[-50:]}"
                for ms, name, kind, shape, op in items]
  lines.append("  torch top ops by self time (ms, op, calls):")
  lines += [f"    {ms:6.1f}  {name}  x{n}" for ms, name, n in tr["top"][:8]]
  return "\n".join(lines)


def report(results: list[dict], batch: int, peak: float | None) -> str:
  rows = []
  for r in results:
    for k in r["times"]:
      med = common.median(r["times"][k])
      tf, mfu = common.fmt_tflops(r["flops"].total, med, peak)
      name = r["torch_name"] if k == "torch" else k
      rows.append([r["label"], name, f"{batch / med:.2f}", common.spread(r["times"][k]),
                   tf, mfu, common.gib(r["mem"].get(k)), f"{r['build_s'][k]:.0f}"])
    if len(r["times"]) == 2:
      ratio = (common.median(r["times"]["torch"]) / common.median(r["times"]["jax"]))
      mem_ratio = (r["mem"]["jax"] / r["mem"]["torch"]
                   if r["mem"].get("jax") and r["mem"].get("torch") else None)
      rows.append([r["label"], f"jax/{r['torch_name']}", f"{ratio:.2f}x", "", "", "",
                   f"{mem_ratio:.2f}x" if mem_ratio else "", ""])
  t = common.table(["step", "framework", "img/s", "ms median (min-max)", "TFLOP/s", "MFU",
                    "peak memory", "build s"], rows)
  lines = [t, ""]
  for r in results:
    f = r["flops"]
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in f.by_part.items())
    lines.append(f"{r['label']}: {f.total / 1e9:.1f} model GFLOP per step ({parts});"
                 f" losses after the last timed step: " +
                 ", ".join(f"{k} {v:.4f}" for k, v in r["losses"].items()))
    lines.append(f"  our step's XLA memory plan: {r['memory_line']}")
  return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_flags(p)
  p.add_argument("--batch", type=int, default=None, help="batch (per device); default 8")
  p.add_argument("--stage", type=int, choices=(1, 2), action="append",
                 help="stage(s) to run (default: both)")
  p.add_argument("--remat", default="none",
                 help="our remat policy (none|dots|full; default none: torch does not"
                      " checkpoint either)")
  p.add_argument("--only", choices=("jax", "torch"), default=None,
                 help="time one framework only (profiling)")
  p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
  p.add_argument("--inputs", choices=INPUTS, default="pixels",
                 help="what a stage-2 batch holds: pixels (default), tokens (precomputed"
                      " DINOv2 tokens: no DINOv2 in the step) or latents (precomputed tokens"
                      " and VAE posteriors: no DINOv2 and no VAE encoder, the trainer's step"
                      " with data.object_tokens and data.latents); random values, both sides")
  p.add_argument("--torch-compile", action="store_true",
                 help="torch side: UNet and adapter through torch.compile (default: eager)")
  p.add_argument("--profile", action="store_true",
                 help="also split one step's time by network, direction and op kind (CPU)")
  p.add_argument("--trace", metavar="DIR", default=None,
                 help="also write a jax.profiler trace of 3 of our steps per stage to DIR")
  return p


def main(argv=None) -> list[dict]:
  p = parser()
  args = p.parse_args(argv)
  if args.inputs != "pixels":  # cached inputs exist for stage 2 only
    if 1 in (args.stage or []):
      p.error(f"--inputs {args.inputs} is a stage-2 option (stage 1 trains DINOv2 on pixels)")
    args.stage = [2]
  env = common.setup(args)
  jax_device, torch_device, dtype = env.jax_device, env.torch_device, env.dtype
  from imprint_jax.models import attention
  sc = common.scale(args.scale)
  args.batch = args.batch or sc.batch
  remat = args.remat
  print(f"scale {sc.name}: batch {args.batch}, E={sc.encoder_size}, G={sc.generator_size},"
        f" dtype {dtype}, our remat {remat}, stage-2 inputs {args.inputs}, torch"
        f" {'torch.compile' if args.torch_compile else 'eager'}; {args.warmup} warm-up +"
        f" {args.repeats} timed steps per framework, alternating\n")
  with attention.gpu_attention(args.gpu_attention):
    results = [measure(s, args, sc, jax_device, torch_device, dtype, remat)
               for s in (args.stage or [1, 2])]
  peak = common.peak_tflops(jax_device.device_kind)
  print(report(results, args.batch, peak))
  for r in results:
    if "profile" in r:
      print("\n" + profile_report(r))
  print(f"\nload average at the end: {common.load_average()}")
  return results


if __name__ == "__main__":
  main()
