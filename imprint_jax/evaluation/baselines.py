"""Other compositing methods run in-process on exactly our test inputs (`imprint-jax evaluate
--baseline NAME --baseline-weights DIR`).

  paint-by-example   diffusers' `PaintByExamplePipeline` (Yang et al., CVPR 2023; the paper's
                     first baseline), loaded from a local folder (`save_pretrained` layout,
                     e.g. Fantasy-Studio/Paint-by-Example downloaded once by you). PyTorch, on
                     CUDA when available, else the CPU.

Inputs per pair (`testsets.Pair`): the background crop (G x G) as `image`, the generation region
as `mask_image` (white = generate), the object on white (E x E) as `example_image`; DDIM with
the same steps and guidance as our model, noise from a torch generator seeded by
(seed, pair_id). The pipeline's output (at G x G) is scored as it is: Paint-by-Example does its
own blending (the masked image is an input of its UNet), no pixel blend is added.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imprint_jax.errors import UserError, import_extra

BASELINES = ("paint-by-example",)


def _pair_seed(seed: int, pair_id: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(pair_id)]).generate_state(1)[0])


def paint_by_example_generator(weights: str | os.PathLike, *, steps: int = 50,
                               guidance: float = 5.0, seed: int = 0, batch_size: int = 8):
  """A `methods.GenerateFn` running diffusers' PaintByExamplePipeline from `weights`."""
  # Imported here: torch, diffusers and transformers are the optional `torch` extra.
  torch = import_extra("torch", "torch")
  import_extra("diffusers", "torch")
  import_extra("transformers", "torch")
  from diffusers import AutoencoderKL, DDIMScheduler, PaintByExamplePipeline
  from diffusers import UNet2DConditionModel
  from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
  from transformers import CLIPImageProcessor
  if not os.path.isfile(os.path.join(os.fspath(weights), "model_index.json")):
    raise UserError(f"--baseline-weights {weights}: no model_index.json (expected a"
                    " Paint-by-Example pipeline folder written by save_pretrained)")
  # Built from its components, each loaded by its own class: model_index.json names the image
  # encoder's module "paint_by_example" (the hub folder) or "diffusers" (save_pretrained in
  # diffusers 0.42), and 0.42's from_pretrained resolves neither since the pipeline moved to
  # diffusers.pipelines.deprecated.
  root = os.fspath(weights)
  try:
    pipe = PaintByExamplePipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(root, "vae")),
        image_encoder=PaintByExampleImageEncoder.from_pretrained(
            os.path.join(root, "image_encoder")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")),
        # Same sampler as ours (DDIM), from the folder's own scheduler settings.
        scheduler=DDIMScheduler.from_pretrained(os.path.join(root, "scheduler")),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(
            os.path.join(root, "feature_extractor")),
        requires_safety_checker=False)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"--baseline-weights {weights}: cannot load a Paint-by-Example pipeline"
                    f" ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  pipe = pipe.to(device)
  pipe.set_progress_bar_config(disable=True)

  def generate(pairs: Sequence) -> list[np.ndarray]:
    out = []
    for start in range(0, len(pairs), batch_size):
      chunk = pairs[start:start + batch_size]
      g = chunk[0].background.shape[0]
      result = pipe(
          example_image=[Image.fromarray(p.object) for p in chunk],
          image=[Image.fromarray(p.background) for p in chunk],
          mask_image=[Image.fromarray(p.region.astype(np.uint8) * 255) for p in chunk],
          height=g, width=g, num_inference_steps=steps, guidance_scale=guidance,
          generator=[torch.Generator("cpu").manual_seed(_pair_seed(seed, p.pair_id))
                     for p in chunk],
          output_type="np")
      for image in result.images:
        image = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        if image.shape[:2] != (g, g):
          image = np.asarray(Image.fromarray(image).resize((g, g), Image.Resampling.BICUBIC))
        out.append(image)
    return out

  return generate
