"""Stage 2: compositing with sequential collaborative training (IMPRINT Sec. 3.2, 3.4).

UNet input: noisy target latent + masked-background latent + coarse mask (9 channels, widened
from the pretrained 4-channel SD 1.5 UNet with zero-initialised extra channels); the object's
tokens (DINOv2 frozen, adapter trained) through cross-attention. Embedding dropout 0.1, batch
256, 15 epochs: phase 1 (10 epochs) adapter at the large rate and UNet at the small one,
phase 2 (5 epochs) swapped. The 10/5 split is our choice (the paper's n1, n2 were lost).

Run:
  imprint-jax train --config stage2 --workdir /gcs/BUCKET/imprint/stage2 \
      --set init.checkpoint=/gcs/BUCKET/imprint/imported \
      --set init.encoder_from=/gcs/BUCKET/imprint/stage1
  imprint-jax train --config stage2:tiny --workdir /tmp/stage2_tiny \
      --set init.encoder_from=/tmp/stage1_tiny
"""

import ml_collections

from imprint_jax.configs import common

LARGE_LR, SMALL_LR = 2e-5, 2e-6


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = common.base_config()
  c.stage = 2

  c.model = ml_collections.ConfigDict()
  c.model.dinov2 = {"preset": "g", "registers": 4}
  c.model.adapter = {"depth": 5, "num_heads": 1, "mlp_ratio": 4.0}
  c.model.unet = {"preset": "sd15", "in_channels": 9}
  c.model.vae = {"preset": "sd"}

  c.data = ml_collections.ConfigDict()
  # Mixed by the paper's pair counts (Table 1).
  c.data.sources = (("pairs/images", 116820.0), ("pairs/vipseg", 51743.0),
                    ("pairs/youtube_vos", 42868.0), ("pairs/ppr10k", 6020.0))
  c.data.val_split = "val"
  c.data.encoder_size = 224
  c.data.generator_size = 512
  c.data.window = 7             # view datasets only (see configs/stage1.py)
  c.data.draws_per_group = 6
  c.data.mask_level_probs = (0.25, 0.25, 0.25, 0.25)
  c.data.augment_video_objects = True
  # Colour LUTs of the object perturbation: "" = random smooth synthetic tables; a folder =
  # its 3-D .cube files (the paper uses SSH's photo-filter LUTs; docs/paper_fidelity.md).
  c.data.lut_dir = ""
  # Precomputed DINOv2 tokens (`imprint-jax encode-objects` output); "" = run DINOv2 per step.
  c.data.object_tokens = ""
  # Precomputed VAE posteriors of targets and masked backgrounds (`imprint-jax encode-latents`
  # output); "" = run the VAE encoder per step.
  c.data.latents = ""
  c.data.num_workers = 8
  c.data.prefetch = 2
  c.data.on_corrupt_record = "stop"  # or "skip": a record failing its checksum is replaced

  c.train.epochs = 15
  c.train.embed_dropout = 0.1
  # Phase boundary after 10 epochs (`steps`, when set, gives boundaries in steps instead).
  # `train` refuses a run that ends before a phase starts (e.g. a shortened train.num_steps)
  # unless allow_cut is True.
  c.phases = ml_collections.ConfigDict({"epochs": (10,), "steps": (),
                                        "allow_cut": False})
  c.components = ml_collections.ConfigDict({
      "dinov2": None,  # frozen: the stage-1 encoder backbone
      "adapter": {"phase_lrs": (LARGE_LR, SMALL_LR), "warmup_steps": 500},
      "unet_decoder": {"phase_lrs": (SMALL_LR, LARGE_LR), "warmup_steps": 500},
      "unet_rest": {"phase_lrs": (SMALL_LR, LARGE_LR), "warmup_steps": 500},
  })

  if arg == "tiny":
    common.tiny_overrides(c)
    c.model = common.tiny_model()
    c.model.unet["in_channels"] = 9
    c.data.sources = (("synthetic:images", 2.0), ("synthetic:youtube_vos", 1.0),
                      ("synthetic:vipseg", 1.0), ("synthetic:ppr10k", 1.0))
    c.data.encoder_size = 56
    c.data.generator_size = 64
    c.data.num_workers = 0
    c.phases.epochs = ()
    c.phases.steps = (20,)     # tiny: phase boundary at step 20 of 40
    for name, lrs in (("adapter", (1e-3, 1e-4)), ("unet_decoder", (1e-4, 1e-3)),
                      ("unet_rest", (1e-4, 1e-3))):
      c.components[name] = {"phase_lrs": lrs, "warmup_steps": 2}
  elif arg:
    raise ValueError(f"configs/stage2.py: unknown variant {arg!r} (try 'tiny')")
  return c
