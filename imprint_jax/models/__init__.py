"""The IMPRINT networks as Flax NNX modules, one per file, NHWC: the DINOv2 encoder, the content
adapter, the SD UNet (its layers in `unet_blocks`) and VAE, and `imprint.Imprint` that holds all
four; built from the shared layers (`layers`) and attention (`attention`)."""
