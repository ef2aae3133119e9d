"""Settings shared by both stages: mesh, sharding rules, optimizer, checkpoints, logging.

Learning rates: the paper's values were lost from our copy of the text, so every one here is
our choice and a config value. They follow the Stable Diffusion fine-tuning convention
(Paint-by-Example and ObjectStitch fine-tune SD at 1e-5 to 4e-5 with AdamW; we take 2e-5 for
the "large" rate at batch 256) and a 10x smaller "small" rate for the component that only
adapts (sequential collaborative training). DINOv2 ViT-g is fine-tuned at 1e-6, the usual
rate for fine-tuning a billion-parameter ViT without destroying its features.
"""

import ml_collections

# Logical axis -> mesh axes. Big weight dimensions are split over fsdp (ZeRO-3 style: gathered
# per layer inside the step), attention/MLP/conv-output features over tensor.
LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("cross", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("time", None),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"          # compute dtype; parameters stay float32
  c.remat = "dots"              # gradient checkpointing policy per block: none|dots|full
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.logical_axis_rules = LOGICAL_AXIS_RULES

  c.init = ml_collections.ConfigDict()
  # Local paths or gs://; a training workdir means its checkpoint picked by the *_which key:
  # "latest", "best" (lowest validation loss) or a step number.
  c.init.checkpoint = ""        # `imprint-jax import` output; empty = random init
  c.init.checkpoint_which = "latest"
  c.init.encoder_from = ""      # stage 2: stage-1 workdir or checkpoint giving DINOv2+adapter
  c.init.encoder_from_which = "latest"
  # Stage 2 without init.encoder_from trains on a DINOv2 that stage 1 never tuned: refused
  # unless this is set (tests, benchmarks, `plan`: runs where the weights do not matter).
  c.allow_random_encoder = False

  c.train = ml_collections.ConfigDict()
  c.train.global_batch = 256
  c.train.microbatches = 1      # gradient accumulation: activations of global_batch / this
  c.train.epochs = 1
  c.train.num_steps = -1        # -1: epochs x (pairs in the train split // global_batch)
  c.train.prediction_type = "epsilon"
  c.train.embed_dropout = 0.1
  c.train.weight_decay = 1e-2
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0

  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 8
  c.sample_every = 5000
  c.sample_steps = 25
  c.sample_guidance = 5.0
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.lease_ttl_s = 60.0          # the workdir lease expires this long after its last renewal
  # JAX's persistent compilation cache (local or gs://; e.g. in the run's bucket), so a
  # restarted or preempted run loads its compiled steps; empty = JAX_COMPILATION_CACHE_DIR.
  c.jax_cache_dir = ""
  c.profile_steps = ()          # (A, B): a jax.profiler trace of steps A..B in <workdir>/profile
  return c


def tiny_overrides(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to run on a 2-core CPU in minutes (tests and the quickstart)."""
  c.dtype = "float32"
  c.remat = "none"
  c.train.global_batch = 8
  c.train.epochs = 1
  c.train.num_steps = 40
  c.log_every = 5
  c.eval_every = 20
  c.eval_batches = 1
  c.sample_every = 40
  c.sample_steps = 4
  c.checkpoint_every = 20
  c.keep_checkpoints = 2


def tiny_model() -> ml_collections.ConfigDict:
  """The real block structure at toy widths: VAE factor 4, so 64 px images give 16x16 latents."""
  m = ml_collections.ConfigDict()
  m.dinov2 = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_ratio": 2.0,
              "patch_size": 14, "image_size": 56, "num_register_tokens": 4}
  m.adapter = {"in_dim": 32, "width": 32, "depth": 2, "num_heads": 1, "out_dim": 32}
  m.unet = {"in_channels": 4, "out_channels": 4, "sample_size": 16,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "layers_per_block": 1, "attention_head_dim": 4, "cross_attention_dim": 32,
            "norm_num_groups": 8}
  m.vae = {"block_out_channels": (32, 32, 64), "layers_per_block": 1, "norm_num_groups": 8,
           "sample_size": 64}
  return m
