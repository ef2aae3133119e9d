"""The IMPRINT networks as Flax NNX modules, one per file, NHWC: the DINOv2 encoder, the content
adapter, the SD UNet and VAE, and `imprint.Imprint` that holds all four."""
