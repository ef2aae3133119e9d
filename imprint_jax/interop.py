"""Whole-model import from and export to PyTorch folders (`imprint-jax import` / `export`)."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from imprint_jax import checkpoint as ckpt_lib
from imprint_jax import convert
from imprint_jax.convert.common import AtomicDir
from imprint_jax.errors import UserError
from imprint_jax.models.adapter import AdapterConfig, ContentAdapter
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.models import layers


def assemble(dinov2, adapter, unet, vae) -> Imprint:
  """An `Imprint` made of already-built networks (no parameters copied)."""
  cfg = ImprintConfig(dinov2=dinov2.cfg, adapter=adapter.cfg, unet=unet.cfg, vae=vae.cfg)
  model = nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0)))
  model.dinov2, model.adapter, model.unet, model.vae = dinov2, adapter, unet, vae
  return model


def import_pretrained(*, dinov2: str, out: str, sd: str | None = None, unet: str | None = None,
                      vae: str | None = None, adapter_depth: int = 5, adapter_heads: int = 1,
                      seed: int = 0) -> Path:
  """SD (UNet + VAE) and DINOv2 PyTorch folders + a fresh adapter -> one orbax checkpoint."""
  if sd is None and (unet is None or vae is None):
    raise UserError("give --sd PIPELINE_DIR, or both --unet DIR and --vae DIR")
  if sd is not None and not (Path(sd) / "model_index.json").is_file():
    raise UserError(f"--sd {sd}: not a diffusers pipeline folder (no model_index.json)")
  if Path(out).exists():
    raise UserError(f"--out {out}: already exists; choose a new folder")
  unet_m = convert.load_unet(unet or sd)
  vae_m = convert.load_vae(vae or sd)
  dino_m = convert.load_dinov2(dinov2)
  adapter_cfg = AdapterConfig(in_dim=dino_m.cfg.hidden_size,
                              out_dim=unet_m.cfg.cross_attention_dim, depth=adapter_depth,
                              num_heads=adapter_heads)
  adapter_m = ContentAdapter(adapter_cfg, rngs=layers.init_rngs(seed))
  model = assemble(dino_m, adapter_m, unet_m, vae_m)
  return ckpt_lib.save_model(out, model, {"stage": 0, "step": 0,
                                          "sources": {"sd": sd, "unet": unet, "vae": vae,
                                                      "dinov2": dinov2}})


def export_pretrained(ckpt: str, out: str) -> Path:
  """A checkpoint -> unet/, vae/ (diffusers), image_encoder/ (transformers), adapter/."""
  model, meta = ckpt_lib.load_model(ckpt)
  out = Path(out)
  with AtomicDir(out) as tmp:
    convert.save_unet(model.unet, tmp / "unet")
    convert.save_vae(model.vae, tmp / "vae")
    convert.save_dinov2(model.dinov2, tmp / "image_encoder")
    convert.save_adapter(model.adapter, tmp / "adapter")
    info = {"format": "imprint-jax export", "stage": meta.get("stage"),
            "step": meta.get("step"), "unet_in_channels": model.cfg.unet.in_channels,
            "unet_input_order": ["noisy_latent", "masked_background_latent", "mask"]
            if model.cfg.stage == 2 else ["noisy_latent"],
            "vae_scaling_factor": model.cfg.vae.scaling_factor}
    (tmp / "imprint.json").write_text(json.dumps(info, indent=2) + "\n")
  return out
