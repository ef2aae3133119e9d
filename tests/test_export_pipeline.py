"""The exported diffusers pipeline: same composite as the JAX compositor, runs without JAX,
float16 variants, the model card, and the bit-exact way back (export -> import).

The model is a tiny random stage-2 IMPRINT (E = 56, G = 32, 2 DDIM steps), saved as a
checkpoint and exported once for the module.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax import cli
from imprint_jax import compositing
from imprint_jax.convert import interop
from imprint_jax.convert import pipeline_imprint
from imprint_jax.data import masks as masks_lib
from imprint_jax.models.adapter import AdapterConfig
from imprint_jax.models.dinov2 import Dinov2Config
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.models.unet import UNetConfig
from imprint_jax.models.vae import VAEConfig

E, G, STEPS, GUIDANCE = 56, 32, 2, 5.0
BG_H, BG_W = 90, 120
# Float32, guidance 5, same latents: the largest uint8 difference allowed between the PyTorch
# pipeline's composite and the JAX compositor's. Measured on this model: 1 at 2 DDIM steps
# (0 at 10 and 50 steps; the final latents then differ by at most 2e-5, 5e-5, 8e-5 with
# max |z| 10, 41, 55), 0 for dpmpp_2m at 3 steps.
MAX_PIXEL_DIFF = 2


def _tiny_config() -> ImprintConfig:
  return ImprintConfig(
      dinov2=Dinov2Config(hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2.0,
                          patch_size=14, image_size=56, num_register_tokens=4),
      adapter=AdapterConfig(in_dim=32, width=32, depth=2, num_heads=1, out_dim=32),
      unet=UNetConfig(in_channels=9, out_channels=4, sample_size=G // 2,
                      block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                      attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8),
      vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    sample_size=G))


def _random_model(cfg: ImprintConfig, seed: int) -> Imprint:
  """Random weights filled in numpy (an eager nnx init is slow on a shared CPU); the adapter's
  null context is random too, so guidance matters."""
  abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = str(path[-1].key)
    if name == "scale":
      v = 1.0 + 0.1 * rng.standard_normal(x.shape)
    elif name == "bias":
      v = 0.02 * rng.standard_normal(x.shape)
    else:
      v = rng.standard_normal(x.shape) / np.sqrt(max(1, int(np.prod(x.shape[:-1]))))
    return np.asarray(v, np.float32)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


META = {"stage": 2, "step": 7,
        "config": {"data": {"encoder_size": E, "generator_size": G, "context": 2.0,
                            "mask_level_probs": [0.25, 0.25, 0.25, 0.25]},
                   "train": {"prediction_type": "epsilon", "epochs": 15, "global_batch": 256,
                             "embed_dropout": 0.1}}}


def _object_rgba(rng) -> np.ndarray:
  h, w = 40, 30
  yy, xx = np.mgrid[:h, :w]
  inside = ((xx - 15) / 12) ** 2 + ((yy - 20) / 17) ** 2 < 1
  rgba = np.zeros((h, w, 4), np.uint8)
  rgba[..., :3] = rng.integers(0, 255, (h, w, 3))
  rgba[..., 3] = inside * 255
  return rgba


def _region_mask() -> np.ndarray:
  yy, xx = np.mgrid[:BG_H, :BG_W]
  return ((xx - 55) / 16) ** 2 + ((yy - 45) / 22) ** 2 < 1


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """The tiny torch models gain nothing from threads; on a shared CPU they only contend."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  model = _random_model(_tiny_config(), seed=0)
  ckpt = ckpt_lib.save_model(root / "ckpt", model, META)
  assert cli.main(["export", str(ckpt), "--out", str(root / "export"), "--dtype", "float16",
                   "--dtype", "bfloat16"]) == 0
  rng = np.random.default_rng(0)
  inputs = {"object": Image.fromarray(_object_rgba(rng)),
            "background": Image.fromarray(rng.integers(0, 255, (BG_H, BG_W, 3), np.uint8)),
            "mask": Image.fromarray(_region_mask().astype(np.uint8) * 255)}
  for name, img in inputs.items():
    img.save(root / f"{name}.png")
  return {"root": root, "ckpt": ckpt, "out": root / "export", "model": model, **inputs}


@pytest.fixture(scope="module")
def pipe(exported):
  from diffusers import DiffusionPipeline
  return DiffusionPipeline.from_pretrained(exported["out"], trust_remote_code=True)


def _latents(n: int, seed: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, 4, G // 2, G // 2)).astype(np.float32)


def test_pipeline_equals_jax_compositor(exported, pipe):
  """Same latents -> the same composite; beyond the seam, the background exactly."""
  # One device: one row per call (the default mesh pads a row to the 8 test devices).
  comp = compositing.Compositor(exported["model"], encoder_size=E, generator_size=G,
                                dtype="float32", devices=jax.devices()[:1])
  lat = _latents(2)
  cases = [dict(mask=exported["mask"], mask_level=1), dict(box=(30, 20, 80, 70))]
  for i, case in enumerate(cases):
    kw = ({"mask_image": case["mask"], "mask_level": case["mask_level"]} if "mask" in case
          else {"box": case["box"]})
    out = pipe(object_image=exported["object"], background_image=exported["background"],
               num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               latents=torch.from_numpy(lat[i:i + 1]), output_type="np", **kw).images[0]
    job = comp.prepare(exported["object"], exported["background"], **case)
    ref = comp.run([job], steps=STEPS, guidance=GUIDANCE,
                   latents=lat[i:i + 1].transpose(0, 2, 3, 1))[0][0]
    assert out.shape == ref.shape == (BG_H, BG_W, 3)
    diff = np.abs(out.astype(int) - ref.astype(int))
    print(f"case {i}: max |torch - jax| = {diff.max()}, mean {diff.mean():.4f}")
    assert diff.max() <= MAX_PIXEL_DIFF, diff.max()
    # The region is really generated (not the background), and beyond the seam it is exact.
    bg = np.asarray(exported["background"])
    assert np.abs(out[job.region].astype(int) - bg[job.region]).mean() > 10
    far = pipeline_imprint._distance_within(job.region, int(np.ceil(job.feather))) > job.feather
    np.testing.assert_array_equal(out[far], bg[far])


def test_dpm_solver_scheduler_equals_jax_dpmpp_2m(exported):
  """The other sampler: the folder's DPMSolverMultistepScheduler (export --sampler dpmpp_2m
  writes this config) against the JAX dpmpp_2m sampler, same latents."""
  from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
  scheduler = DPMSolverMultistepScheduler.from_config(
      interop.scheduler_config("dpmpp_2m", "epsilon"))
  pipe = DiffusionPipeline.from_pretrained(exported["out"], trust_remote_code=True,
                                           scheduler=scheduler)
  comp = compositing.Compositor(exported["model"], encoder_size=E, generator_size=G,
                                dtype="float32", devices=jax.devices()[:1])
  lat = _latents(1, seed=9)
  out = pipe(object_image=exported["object"], background_image=exported["background"],
             mask_image=exported["mask"], mask_level=3, num_inference_steps=3,
             guidance_scale=GUIDANCE, latents=torch.from_numpy(lat), output_type="np").images[0]
  job = comp.prepare(exported["object"], exported["background"], mask=exported["mask"],
                     mask_level=3)
  ref = comp.run([job], steps=3, guidance=GUIDANCE, sampler="dpmpp_2m",
                 latents=lat.transpose(0, 2, 3, 1))[0][0]
  diff = np.abs(out.astype(int) - ref.astype(int))
  print(f"dpmpp_2m, level 3: max |torch - jax| = {diff.max()}, mean {diff.mean():.4f}")
  assert diff.max() <= MAX_PIXEL_DIFF, diff.max()
  # The comparison can tell the samplers apart: DDIM from the same latents differs.
  ddim = DiffusionPipeline.from_pretrained(exported["out"], trust_remote_code=True)(
      object_image=exported["object"], background_image=exported["background"],
      mask_image=exported["mask"], mask_level=3, num_inference_steps=3,
      guidance_scale=GUIDANCE, latents=torch.from_numpy(lat), output_type="np").images[0]
  assert np.abs(ddim.astype(int) - ref.astype(int)).max() > 10


def test_batched_lists_and_generator(exported, pipe):
  """A list of inputs is a batch: each row equals the same job run alone with its latents."""
  lat = _latents(2, seed=5)
  common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")
  both = pipe(object_image=[exported["object"]] * 2,
              background_image=[exported["background"], exported["background"]],
              box=[(30, 20, 80, 70), (10, 10, 50, 60)], latents=torch.from_numpy(lat),
              **common).images
  alone = pipe(object_image=exported["object"], background_image=exported["background"],
               box=(10, 10, 50, 60), latents=torch.from_numpy(lat[1:]), **common).images[0]
  assert len(both) == 2
  assert np.abs(both[1].astype(int) - alone.astype(int)).max() <= 1
  seeded = [pipe(object_image=exported["object"], background_image=exported["background"],
                 box=(30, 20, 80, 70), generator=torch.Generator().manual_seed(0),
                 num_inference_steps=STEPS).images[0] for _ in range(2)]
  assert seeded[0].size == (BG_W, BG_H)
  np.testing.assert_array_equal(np.asarray(seeded[0]), np.asarray(seeded[1]))


@pytest.mark.parametrize("level", [2, 3, 4])
def test_mask_levels_match_imprint_jax(level):
  """The pipeline's scipy-free mask coarsening gives imprint_jax.data.masks' masks."""
  mask = _region_mask()
  mask[40:44, 30:80] = True  # a thin bar: concavities for the blur and hull to fill
  for seed in range(3):
    want = masks_lib.coarse_mask(mask, level, np.random.default_rng(seed))
    got = pipeline_imprint.coarse_mask(mask, level, np.random.default_rng(seed))
    assert (want != got).sum() == 0, (level, seed, (want != got).sum())


def test_paste_matches_imprint_jax():
  rng = np.random.default_rng(1)
  bg = rng.integers(0, 255, (BG_H, BG_W, 3), np.uint8)
  crop = rng.integers(0, 255, (G, G, 3), np.uint8)
  region = _region_mask()
  for feather in (0.0, 3.0, 7.5):
    window = (10, -5, 100)
    np.testing.assert_array_equal(pipeline_imprint.paste(bg, crop, window, region, feather),
                                  compositing.paste(bg, crop, window, region, feather))


def test_float16_variant_loads_and_composites(exported):
  from diffusers import DiffusionPipeline
  out = exported["out"]
  assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
  assert (out / "image_encoder" / "model.fp16.safetensors").is_file()
  pipe16 = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, variant="fp16",
                                             dtype=torch.float16)
  assert pipe16.unet.dtype == pipe16.adapter.dtype == torch.float16
  assert pipe16.image_encoder.dtype == torch.float16
  lat = torch.from_numpy(_latents(1))
  kw = dict(object_image=exported["object"], background_image=exported["background"],
            mask_image=exported["mask"], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            latents=lat, output_type="np")
  half = pipe16(**kw).images[0]
  from diffusers import DiffusionPipeline as P
  full = P.from_pretrained(out, trust_remote_code=True)(**kw).images[0]
  diff = np.abs(half.astype(int) - full.astype(int))
  print(f"float16 vs float32: max {diff.max()}, mean {diff.mean():.3f}")
  assert diff.mean() < 2.0 and diff.max() <= 40
  pipe_bf = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, variant="bf16",
                                              dtype=torch.bfloat16)
  assert pipe_bf.unet.dtype == pipe_bf.vae.dtype == torch.bfloat16
  bf = pipe_bf(**kw).images[0]
  diff = np.abs(bf.astype(int) - full.astype(int))
  print(f"bfloat16 vs float32: max {diff.max()}, mean {diff.mean():.3f}")
  assert diff.mean() < 4.0


def test_runs_where_jax_cannot_be_imported(exported, tmp_path):
  """The README snippet in a process where `import jax` / `import imprint_jax` fail."""
  blocker = tmp_path / "blocker"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(textwrap.dedent("""\
      import sys
      class _Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("jax", "jaxlib", "flax", "imprint_jax"):
            raise ImportError(f"{name} is blocked in this test")
          return None
      sys.meta_path.insert(0, _Block())
      """))
  script = tmp_path / "run.py"
  script.write_text(textwrap.dedent(f"""\
      import sys
      import torch
      from diffusers import DiffusionPipeline
      from PIL import Image
      for name in ("jax", "imprint_jax"):
        try:
          __import__(name)
        except ImportError:
          pass
        else:
          raise SystemExit(name + " imported")
      pipe = DiffusionPipeline.from_pretrained("export", trust_remote_code=True)
      out = pipe(object_image=Image.open("object.png"),
                 background_image=Image.open("background.png"),
                 mask_image=Image.open("mask.png"), mask_level=1, num_inference_steps={STEPS},
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
      out.images[0].save("out.png")
      bad = [m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "imprint_jax")]
      print("loaded:", bad, type(pipe).__name__, out.images[0].size)
      """))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(PYTHONPATH=str(blocker), HF_MODULES_CACHE=str(tmp_path / "modules"),
             HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
  res = subprocess.run([sys.executable, str(script)], cwd=exported["root"], env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"loaded: [] ImprintCompositingPipeline ({BG_W}, {BG_H})" in res.stdout, res.stdout
  assert Image.open(exported["root"] / "out.png").size == (BG_W, BG_H)


def test_export_records_settings_once_and_card(exported):
  out = exported["out"]
  index = json.loads((out / "model_index.json").read_text())
  assert index["_class_name"] == ["pipeline_imprint", "ImprintCompositingPipeline"]
  assert index["adapter"] == ["torch_adapter", "ContentAdapterTorch"]
  settings = interop.read_export_settings(out)
  assert settings == {"encoder_size": E, "generator_size": G, "context": 2.0,
                      "prediction_type": "epsilon", "sampler": "ddim",
                      "default_num_inference_steps": 50, "default_guidance_scale": 5.0,
                      "unet_input_order": "noisy_latent,masked_background_latent,mask",
                      "vae_scaling_factor": 0.18215}
  info = json.loads((out / "imprint.json").read_text())
  assert "encoder_size" not in info["training_config"]["data"]
  assert "prediction_type" not in info["training_config"]["train"]
  # The shipped code is the package's source, byte for byte (one implementation each).
  pkg = Path(interop.__file__).parent
  assert (out / "pipeline_imprint.py").read_bytes() == (pkg / "pipeline_imprint.py").read_bytes()
  assert ((out / "adapter" / "torch_adapter.py").read_bytes()
          == (pkg.parent / "torch_adapter.py").read_bytes())
  card = (out / "README.md").read_text()
  for needle in ("CreativeML OpenRAIL-M", "Apache License 2.0", "trust_remote_code=True",
                 'variant="fp16"', 'variant="bf16"', "imprint-jax import --export",
                 "train.global_batch: 256",
                 f"G = {G}"):
    assert needle in card, needle


def test_import_export_round_trip_bit_exact(exported, tmp_path, monkeypatch):
  """JAX -> export -> JAX: every parameter (adapter included) bit for bit, and the settings.
  Relative paths, typed from a working directory that is not the repository."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "export").symlink_to(exported["out"])
  ckpt2 = tmp_path / "back"
  assert cli.main(["import", "--export", "export", "--out", "back"]) == 0
  back, meta = ckpt_lib.load_model(ckpt2)
  flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  a, b = flat(exported["model"]), flat(back)
  assert a.keys() == b.keys()
  for k in a:
    x, y = np.asarray(a[k].get_value()), np.asarray(b[k].get_value())
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k
  assert back.cfg == exported["model"].cfg
  assert compositing.settings_from_meta(meta) == compositing.settings_from_meta(META)
  assert meta["step"] == 7 and meta["config"]["train"]["epochs"] == 15
  assert meta["pipeline"] == {"sampler": "ddim", "default_num_inference_steps": 50,
                              "default_guidance_scale": 5.0}
  from imprint_jax import convert
  again, _ = convert.load_export(exported["out"])
  assert all(np.asarray(v.get_value()).tobytes() == np.asarray(a[k].get_value()).tobytes()
             for k, v in flat(again).items())
  # And out again: the same files.
  assert cli.main(["export", "back", "--out", "again"]) == 0
  for name in ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json",
               "pipeline_imprint.py"):
    assert (exported["out"] / name).read_text() == (tmp_path / "again" / name).read_text(), name
  for sub, stem in (("unet", "diffusion_pytorch_model"), ("adapter", "diffusion_pytorch_model"),
                    ("image_encoder", "model"), ("vae", "diffusion_pytorch_model")):
    first = load_file(exported["out"] / sub / f"{stem}.safetensors")
    again = load_file(tmp_path / "again" / sub / f"{stem}.safetensors")
    assert first.keys() == again.keys()
    assert all(first[k].tobytes() == again[k].tobytes() for k in first), sub


def test_import_export_errors(exported, tmp_path, capsys):
  assert cli.main(["import", "--export", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "c")]) == 2
  assert "no such folder" in capsys.readouterr().err
  assert cli.main(["import", "--export", str(exported["out"]), "--dinov2", "x", "--out",
                   str(tmp_path / "c")]) == 2
  assert "without --sd/--unet/--vae/--dinov2" in capsys.readouterr().err
  assert not (tmp_path / "c").exists()


def test_jax_latents_shape_is_checked(exported):
  from imprint_jax.errors import UserError
  comp = compositing.Compositor(exported["model"], encoder_size=E, generator_size=G,
                                dtype="float32", devices=jax.devices()[:1])
  job = comp.prepare(exported["object"], exported["background"], box=(30, 20, 80, 70))
  assert comp.latent_shape() == (G // 2, G // 2, 4)  # this tiny VAE halves
  nchw = _latents(1)
  with pytest.raises(UserError, match=r"latents of shape \(1, 4, 16, 16\): expected"
                     r" \(1, 16, 16, 4\) \(one NHWC row per sample\)"):
    comp.run([job], steps=STEPS, guidance=GUIDANCE, latents=nchw)


def test_pipeline_bad_input_is_one_clear_error(exported, pipe):
  obj, bg = exported["object"], exported["background"]
  cases = [
      (dict(mask_image=exported["mask"], box=(0, 0, 9, 9)), "exactly one of mask_image"),
      (dict(box=(50, 20, 30, 70)), r"box \(50,20,30,70\): need 0 <= x0 < x1 <= 120"),
      (dict(box=(30, 20, 80, 70), mask_level=2), "mask_level 2 needs a mask"),
      (dict(mask_image=Image.new("L", (10, 10), 255)), "differs from the background's 120x90"),
      (dict(box=(30, 20, 80, 70), latents=torch.zeros(1, 4, 8, 8)),
       r"latents of shape \(1, 4, 8, 8\): expected \(1, 4, 16, 16\)"),
      (dict(box=[(30, 20, 80, 70)] * 3, background_image=[bg, bg]), "2 items for a batch of 3"),
  ]
  for kw, message in cases:
    kw = {"object_image": obj, "background_image": bg, "num_inference_steps": 1, **kw}
    with pytest.raises(ValueError, match=message):
      pipe(**kw)
