"""The model card (README.md) written into every `imprint-jax export` folder."""

from __future__ import annotations

import json
from typing import Any

from imprint_jax.models.imprint import Imprint

_LICENSE_NOTE = """\
## Licences

This model is a derivative of its base models and carries their licences:

- **UNet and VAE**: Stable Diffusion 1.x/2.x derivatives, under the
  [CreativeML OpenRAIL-M](https://huggingface.co/spaces/CompVis/stable-diffusion-license)
  licence (SD 2.x: OpenRAIL++-M), including its use-based restrictions, which pass on to
  anyone who uses or redistributes this model.
- **Image encoder**: DINOv2 (Meta), under the Apache License 2.0.
- **Content adapter**: trained with imprint-jax on the data named in the training
  config above; its use is bound by those data sets' terms as well.
"""


def _training_lines(meta: dict[str, Any]) -> list[str]:
  config = meta.get("config") or {}
  train, data = config.get("train") or {}, config.get("data") or {}
  lines = [f"- stage {meta.get('stage')}, step {meta.get('step')}"]
  for key in ("epochs", "global_batch", "embed_dropout", "prediction_type", "seed"):
    if key in train:
      lines.append(f"- train.{key}: {json.dumps(train[key])}")
  if "sources" in data:
    lines.append(f"- data.sources: {json.dumps(data['sources'])}")
  if "mask_level_probs" in data:
    lines.append(f"- data.mask_level_probs: {json.dumps(data['mask_level_probs'])}")
  for key in ("phases", "components"):
    if config.get(key):
      lines.append(f"- {key}: `{json.dumps(config[key], sort_keys=True)}`")
  if meta.get("sources"):
    lines.append(f"- imported from: `{json.dumps(meta['sources'], sort_keys=True)}`")
  return lines


def render(model: Imprint, meta: dict[str, Any], index: dict[str, Any], dtypes: tuple[str, ...],
           sampler: str) -> str:
  """The card's markdown. `index` is the folder's model_index.json."""
  cfg = model.cfg
  variants = {"float16": "fp16", "bfloat16": "bf16"}
  variant_lines = "".join(
      f"\n# {d} weights:\n# pipe = DiffusionPipeline.from_pretrained(\"export/\","
      f" trust_remote_code=True,\n#                                  variant=\"{variants[d]}\","
      f" dtype=torch.{d})" for d in dtypes)
  warning = "" if cfg.stage == 2 else (
      f"\n**This export is not a compositing model** (stage {meta.get('stage')}: the UNet has"
      f" {cfg.unet.in_channels} input channels, compositing needs 9); its components load,"
      " the pipeline refuses to run.\n")
  return f"""---
library_name: diffusers
license: creativeml-openrail-m
tags: [image-compositing, object-compositing, imprint, stable-diffusion, dinov2]
---

# IMPRINT compositing model (exported by imprint-jax)

IMPRINT (Song et al., CVPR 2024, arXiv 2403.10701) composites an object into a background
while keeping its identity. This folder is a diffusers pipeline
(`pipeline_imprint.ImprintCompositingPipeline`) exported from an imprint-jax checkpoint: it
runs with torch, diffusers and transformers alone (no JAX).
{warning}
## Use in PyTorch

```python
import torch
from diffusers import DiffusionPipeline
from PIL import Image

pipe = DiffusionPipeline.from_pretrained("export/", trust_remote_code=True){variant_lines}
out = pipe(object_image=Image.open("object.png"),        # alpha (or object_mask=) segments it
           background_image=Image.open("background.jpg"),
           mask_image=Image.open("mask.png"),           # or box=(x0, y0, x1, y1)
           mask_level=1, num_inference_steps={index["default_num_inference_steps"]},
           guidance_scale={index["default_guidance_scale"]},  # the defaults
           generator=torch.Generator().manual_seed(0))  # or latents=(B, 4, G/8, G/8) NCHW
out.images[0].save("composite.png")                     # the background's full size
```

Lists of images (and boxes) give a batch. Outside the region, beyond a feathered seam, the
output is the background, pixel for pixel.

## Use in JAX (imprint-jax)

```bash
imprint-jax import --export export/ --out ckpt/      # bit-exact float32 weights
imprint-jax composite --ckpt ckpt/ --object object.png --background background.jpg \\
    --mask mask.png --out composite.png
```

## What the pipeline needs (recorded once)

- `model_index.json`: encoder size E = {index["encoder_size"]}, generator size G = {index["generator_size"]},
  context = {index["context"]} (crop side / region box side), default steps
  {index["default_num_inference_steps"]} and guidance {index["default_guidance_scale"]}, UNet input channels
  `{index["unet_input_order"]}`
- `scheduler/`: {sampler} (`{index["scheduler"][1]}`), prediction type in its config
- `vae/config.json`: scaling factor {cfg.vae.scaling_factor}

## Architecture

- image encoder: DINOv2 (hidden {cfg.dinov2.hidden_size}, {cfg.dinov2.num_layers} layers, {cfg.dinov2.num_register_tokens} registers); all its tokens go
  through the content adapter ({cfg.adapter.depth} blocks, width {cfg.adapter.width or cfg.adapter.in_dim}, out {cfg.adapter.out_dim}; a learned
  null context for classifier-free guidance) into the UNet's cross-attention
- UNet: SD UNet2DConditionModel, {cfg.unet.in_channels} input channels, blocks {list(cfg.unet.block_out_channels)}
- VAE: AutoencoderKL, {cfg.vae.latent_channels} latent channels

## Training config (in short; full config in imprint.json)

{chr(10).join(_training_lines(meta))}

{_LICENSE_NOTE}"""
