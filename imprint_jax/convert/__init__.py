"""Weight import and export between PyTorch folders (diffusers / transformers) and nnx modules.

    from imprint_jax import convert
    unet = convert.load_unet("sd/unet")        # diffusers UNet folder (or SD pipeline folder)
    vae = convert.load_vae("sd/vae")           # diffusers VAE folder (or SD pipeline folder)
    dino = convert.load_dinov2("dinov2-giant")  # transformers Dinov2(WithRegisters)Model folder
    convert.save_unet(unet, "out/unet"); convert.save_vae(vae, "out/vae")
    convert.save_dinov2(dino, "out/image_encoder")
    model, meta = convert.load_export("export/")  # a whole `imprint-jax export` folder back


Only safetensors files are read; each converter is one explicit name table (see common.py).
"""

from imprint_jax.convert.adapter import load_adapter, save_adapter
from imprint_jax.convert.dinov2 import load_dinov2, save_dinov2
from imprint_jax.convert.unet import load_unet, save_unet
from imprint_jax.convert.vae import load_vae, save_vae



def load_export(folder):
  """An `imprint-jax export` folder -> (Imprint, checkpoint metadata); see
  `imprint_jax.convert.interop.load_export` (bit-exact float32 weights, runner settings)."""
  from imprint_jax.convert import interop  # interop imports this package's converters
  return interop.load_export(folder)


__all__ = ["load_unet", "save_unet", "load_vae", "save_vae", "load_dinov2", "save_dinov2",
           "load_adapter", "save_adapter", "load_export"]
