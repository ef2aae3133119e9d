"""Whole-model import from and export to PyTorch folders (`imprint-jax import` / `export`).

An export is a complete diffusers pipeline folder (see `export_pretrained`); `load_export`
reads one back, bit for bit. What a runner needs is recorded once and read by both sides:

  model_index.json          encoder_size (E), generator_size (G), context, default steps and
                            guidance, the UNet's input channel order (pipeline config)
  scheduler/                the sampler (DDIMScheduler = 'ddim', DPMSolverMultistepScheduler
                            = 'dpmpp_2m') and the prediction type
  vae/config.json           scaling_factor
  imprint.json              provenance: stage, step and the rest of the training config
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax import convert
from imprint_jax.convert import model_card
from imprint_jax.convert.common import DIFFUSERS_VERSION
from imprint_jax.convert import common
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


# ----------------------------------------------------------------------------------- export

PIPELINE_FILE = "pipeline_imprint"
PIPELINE_CLASS = "ImprintCompositingPipeline"
ADAPTER_FILE = "torch_adapter"
ADAPTER_CLASS = "ContentAdapterTorch"
UNET_INPUT_ORDER = "noisy_latent,masked_background_latent,mask"
# dtype name -> diffusers variant name
VARIANTS = {"float16": "fp16", "bfloat16": "bf16"}
SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 5.0
# Keys of the training config that the pipeline folder records elsewhere (model_index.json,
# scheduler/): imprint.json leaves them out so that each lives in one place.
_RUNNER_KEYS = {"data": ("encoder_size", "generator_size", "context"),
                "train": ("prediction_type",)}


def scheduler_config(sampler: str, prediction_type: str) -> dict[str, Any]:
  """diffusers scheduler_config.json matching `imprint_jax.diffusion.samplers` (SD 1.x/2.x settings)."""
  if sampler not in SCHEDULERS:
    raise UserError(f"sampler {sampler!r}: expected one of {', '.join(SCHEDULERS)}")
  cfg = {"_class_name": SCHEDULERS[sampler], "_diffusers_version": DIFFUSERS_VERSION,
         "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "prediction_type": prediction_type,
         "steps_offset": 1}
  if sampler == "ddim":
    cfg.update(clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
  else:
    cfg.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
               lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
               thresholding=False)
  return cfg


def _write_variant(folder: Path, stem: str, dtype: str) -> None:
  """`<stem>.<variant>.safetensors` beside the float32 file, cast from it."""
  target = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
  tensors = common.read_safetensors([folder / f"{stem}.safetensors"])
  common.write_safetensors(folder / f"{stem}.{VARIANTS[dtype]}.safetensors",
                           {k: v.astype(target) for k, v in tensors.items()})


def _split_training_config(config: dict[str, Any]) -> dict[str, Any]:
  rest = copy.deepcopy(config)
  for section, keys in _RUNNER_KEYS.items():
    for k in keys:
      (rest.get(section) or {}).pop(k, None)
  return rest


def _shipped_file(module: str) -> Path:
  """The source of a module that an export carries (found without importing it: it needs torch)."""
  return Path(importlib.util.find_spec(f"imprint_jax.{module}").origin)


def export_pretrained(ckpt: str, out: str, *, dtypes: tuple[str, ...] = (),
                      sampler: str | None = None) -> Path:
  """A checkpoint -> a diffusers pipeline folder (float32 weights, plus `dtypes` variants).

  Writes unet/ and vae/ (diffusers), image_encoder/ (transformers DINOv2), adapter/ (the
  content adapter with its PyTorch code), scheduler/, model_index.json, pipeline_imprint.py
  (the `ImprintCompositingPipeline`, PyTorch only), imprint.json and a model card README.md.
  Stage-2 checkpoints give a runnable compositing pipeline; the others carry the same
  components (their pipeline refuses to run: the UNet lacks the 9 input channels). `sampler`
  (default: the one an imported export recorded, else 'ddim') picks scheduler/.
  """
  for d in dtypes:
    if d not in VARIANTS:
      raise UserError(f"--dtype {d}: expected float16 or bfloat16 (float32 is always written)")
  if sampler is not None and sampler not in SCHEDULERS:
    raise UserError(f"--sampler {sampler}: expected one of {', '.join(SCHEDULERS)}")
  model, meta = ckpt_lib.load_model(ckpt)
  settings = ckpt_lib.settings_from_meta(meta)
  pipeline = meta.get("pipeline") or {}  # an imported export's defaults
  sampler = sampler or pipeline.get("sampler", "ddim")
  out = Path(out)
  registers = model.cfg.dinov2.num_register_tokens > 0
  with AtomicDir(out) as tmp:
    convert.save_unet(model.unet, tmp / "unet")
    convert.save_vae(model.vae, tmp / "vae")
    convert.save_dinov2(model.dinov2, tmp / "image_encoder")
    convert.save_adapter(model.adapter, tmp / "adapter")
    shutil.copyfile(_shipped_file(ADAPTER_FILE), tmp / "adapter" / f"{ADAPTER_FILE}.py")
    shutil.copyfile(_shipped_file(f"convert.{PIPELINE_FILE}"), tmp / f"{PIPELINE_FILE}.py")
    for d in dtypes:
      for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                        ("adapter", "diffusion_pytorch_model"), ("image_encoder", "model")):
        _write_variant(tmp / sub, stem, d)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        scheduler_config(sampler, settings["prediction_type"]), indent=2) + "\n")
    index = {
        "_class_name": [PIPELINE_FILE, PIPELINE_CLASS],
        "_diffusers_version": DIFFUSERS_VERSION,
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", SCHEDULERS[sampler]],
        "image_encoder": ["transformers",
                          "Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "adapter": [ADAPTER_FILE, ADAPTER_CLASS],
        "encoder_size": settings["encoder_size"],
        "generator_size": settings["generator_size"],
        "context": settings["context"],
        "default_num_inference_steps": int(pipeline.get("default_num_inference_steps",
                                                        DEFAULT_STEPS)),
        "default_guidance_scale": float(pipeline.get("default_guidance_scale",
                                                     DEFAULT_GUIDANCE)),
        "unet_input_order": UNET_INPUT_ORDER,
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {"format": "imprint-jax export", "format_version": 2,
            "stage": meta.get("stage", model.cfg.stage),
            "step": meta.get("step"), "sources": meta.get("sources"),
            "training_config": _split_training_config(meta.get("config") or {})}
    (tmp / "imprint.json").write_text(json.dumps(info, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card.render(model, meta, index, dtypes, sampler))
  return out


# ----------------------------------------------------------------------------------- import

def read_export_settings(folder: str | Path) -> dict[str, Any]:
  """The runner settings of an exported folder: encoder_size, generator_size, context,
  prediction_type, sampler, default steps/guidance, unet_input_order, vae_scaling_factor."""
  folder = Path(folder)
  index = common.read_json(folder / "model_index.json", "an exported pipeline folder")
  sched = common.read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler")
  vae = common.read_json(folder / "vae" / "config.json", "the VAE")
  by_class = {v: k for k, v in SCHEDULERS.items()}
  if sched.get("_class_name") not in by_class:
    raise UserError(f"{folder / 'scheduler'}: scheduler {sched.get('_class_name')!r}; imprint-jax"
                    f" samples with {', '.join(SCHEDULERS.values())}")
  try:
    return {"encoder_size": int(index["encoder_size"]),
            "generator_size": int(index["generator_size"]),
            "context": float(index["context"]),
            "prediction_type": str(sched.get("prediction_type", "epsilon")),
            "sampler": by_class[sched["_class_name"]],
            "default_num_inference_steps": int(index["default_num_inference_steps"]),
            "default_guidance_scale": float(index["default_guidance_scale"]),
            "unet_input_order": str(index["unet_input_order"]),
            "vae_scaling_factor": float(vae.get("scaling_factor", 0.18215))}
  except KeyError as e:
    raise UserError(f"{folder / 'model_index.json'}: lacks {e.args[0]!r}; not an imprint-jax"
                    " export") from None


def load_export(folder: str | Path) -> tuple[Imprint, dict[str, Any]]:
  """An exported folder -> (Imprint with float32 parameters, checkpoint metadata).

  Reads the float32 files (never a lower-precision variant), so JAX -> export -> JAX is bit
  exact. The metadata holds the stage, step and training config, with the runner settings
  put back where training writes them (config.data / config.train), so `Compositor.
  from_checkpoint` of the imported checkpoint uses the same E, G, context and prediction type;
  the folder's sampler and default steps/guidance are kept under 'pipeline' (a later export
  writes them again).
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"--export {folder}: no such folder")
  if not (folder / "model_index.json").is_file() or not (folder / "imprint.json").is_file():
    raise UserError(f"--export {folder}: not an imprint-jax export (needs model_index.json and"
                    " imprint.json)")
  settings = read_export_settings(folder)
  info = common.read_json(folder / "imprint.json", "an imprint-jax export")
  unet_m = convert.load_unet(folder / "unet")
  vae_m = convert.load_vae(folder / "vae")
  dino_m = convert.load_dinov2(folder / "image_encoder")
  adapter_m = convert.load_adapter(folder / "adapter")
  model = assemble(dino_m, adapter_m, unet_m, vae_m)
  config = copy.deepcopy(info.get("training_config") or {})
  config.setdefault("data", {}).update({k: settings[k] for k in _RUNNER_KEYS["data"]})
  config.setdefault("train", {})["prediction_type"] = settings["prediction_type"]
  meta = {"stage": info.get("stage", model.cfg.stage), "step": info.get("step"),
          "sources": {"export": str(folder)}, "config": config,
          "pipeline": {k: settings[k] for k in ("sampler", "default_num_inference_steps",
                                                "default_guidance_scale")}}
  return model, meta


def import_export(folder: str, out: str) -> Path:
  """`imprint-jax import --export DIR --out CKPT`: an exported folder -> a checkpoint."""
  if Path(out).exists():
    raise UserError(f"--out {out}: already exists; choose a new folder")
  model, meta = load_export(folder)
  return ckpt_lib.save_model(out, model, meta)
