"""`imprint-jax evaluate` end to end on tiny synthetic test sets, tiny random metric networks and
a tiny random stage-2 checkpoint; the protocol's crops and the copy-and-paste baseline.

Test sets: `data_prep.synthetic` images and DreamBooth layouts prepared at E = 32, G = 64.
The model is configs/common.py's tiny IMPRINT with a 9-channel UNet at E = 56, G = 32 (its
checkpoint metadata says so; the compositor resizes the records' crops), 2 DDIM steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from imprint_jax.configs.common import tiny_model
from imprint_jax.data_prep import pairs as prep_pairs
from imprint_jax.data_prep import prepare, synthetic
from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.cli import evaluate as evaluate_cli
from imprint_jax.cli.flags import evaluate as evaluate_flags
from imprint_jax.evaluation import methods as em
from imprint_jax.evaluation import runner
from imprint_jax.evaluation import testsets as ts
from imprint_jax.evaluation import metrics
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import Imprint, ImprintConfig
from test_metrics import save_tiny_inception

E, G = 32, 64
MB = 4  # metric-network batch: one compiled shape per network for the whole file
PREP = prepare.PrepareConfig(encoder_size=E, generator_size=G, min_size=8, min_area=0.005,
                             groups_per_shard=4, num_shards=1, seed=0)
SYN = synthetic.SyntheticConfig(groups=3, frames=1, frame_size=96, objects=2, seed=1)


@pytest.fixture(scope="module")
def testsets(tmp_path_factory):
  """Pixabay as the paper takes it (one object per image, --instances largest; 4 images of 2
  objects each), the same images with every instance, and DreamBooth."""
  raw = synthetic.generate(tmp_path_factory.mktemp("raw"), SYN, layouts=("dreambooth",))
  raw.update(synthetic.generate(tmp_path_factory.mktemp("raw"),
                                dataclasses.replace(SYN, groups=4), layouts=("images",)))
  out = {"raw_images": raw["images"]}
  for name, source, cfg in (
      ("pixabay", "images", dataclasses.replace(PREP, instances="largest")),
      ("pixabay_all", "images", PREP), ("dreambooth", "dreambooth", PREP)):
    folder = tmp_path_factory.mktemp(name)
    prepare.prepare(source, raw[source], folder, cfg, split="test", progress=False)
    out[name] = folder
  return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Tiny random CLIP (28 px), DINO ViT (32 px) and FID Inception (widths / 16) on disk."""
  root = tmp_path_factory.mktemp("weights")
  torch.manual_seed(0)
  transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      image_size=28, patch_size=14, projection_dim=16)).save_pretrained(root / "clip")
  transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      image_size=32, patch_size=16)).save_pretrained(root / "dino")
  save_tiny_inception(root / "inception.safetensors")
  return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  m = tiny_model().to_dict()
  m["unet"]["in_channels"] = 9
  m["unet"]["sample_size"] = 16
  m["vae"]["sample_size"] = 32
  cfg = ImprintConfig.from_dict(m)
  # Random weights filled in numpy: an eager nnx init dispatches thousands of tiny ops.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Imprint(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def fill(path, x):
    name = str(path[-1].key)
    if name == "scale":
      return np.float32(1.0) + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    if name == "bias":
      return 0.02 * rng.standard_normal(x.shape).astype(np.float32)
    fan_in = max(1, int(np.prod(x.shape[:-1])))
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      fill, nnx.to_pure_dict(state)))
  path = tmp_path_factory.mktemp("ckpt") / "stage2"
  meta = {"stage": 2, "step": 0, "config": {"data": {"encoder_size": 56, "generator_size": 32}}}
  return ckpt_lib.save_model(path, nnx.merge(graphdef, state), meta)


def _args(**kw) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  evaluate_flags.add_arguments(parser)
  argv = []
  for k, v in kw.items():
    flag = "--" + k.replace("_", "-")
    argv += [flag] if v is True else [flag, str(v)]
  return parser.parse_args(argv)


def test_pixabay_end_to_end_with_the_model(testsets, weights, ckpt, tmp_path):
  # One CPU device: the sampler compiles twice as fast as sharded over the 8 virtual ones.
  generate = em.model_generator(ckpt, steps=2, batch_size=2, devices=jax.devices()[:1])
  suite = metrics.load_suite(clip=weights / "clip", dino=weights / "dino",
                             inception=weights / "inception.safetensors", batch_size=MB)
  out = tmp_path / "report"
  report = runner.evaluate(testsets["pixabay"], "pixabay", out, {"imprint": generate}, suite,
                       limit=4, batch_size=2, progress=False)
  assert report == json.loads((out / "metrics.json").read_text())
  assert report["pairs"] == 4 and list(report["methods"]) == ["imprint", em.COPY_PASTE]
  for name, r in report["methods"].items():
    for key in ("clip", "dino"):
      assert -100.0 <= r[key] <= 100.0, (name, key, r)
    assert np.isfinite(r["fid"]) and r["fid"] >= 0.0
    assert r["dreamsim"] is None
  assert report["skipped"]["dreamsim"].startswith(metrics.DREAMSIM_SKIPPED)
  table = (out / "metrics.md").read_text()
  assert "| method | FID ↓ | CLIP-score ↑ | DINO-score ↑ | DreamSim ↓ |" in table
  assert "| imprint |" in table and "| copy-paste |" in table
  images = sorted((out / "images" / "imprint").glob("*.png"))
  assert len(images) == 4 and np.asarray(Image.open(images[0])).shape == (G, G, 3)
  scores = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
  assert len(scores) == 8
  mean = np.mean([s["clip"] for s in scores if s["method"] == "imprint"])
  assert abs(mean - report["methods"]["imprint"]["clip"]) < 1e-9
  # A pair's composite depends on its seed and pair id, not on the pairs batched with it.
  pairs = next(ts.iter_batches(testsets["pixabay"], "pixabay", limit=4, batch_size=4))
  for k, image in zip((1, 2), generate([pairs[1], pairs[2]])):
    np.testing.assert_array_equal(image, np.asarray(Image.open(images[k])))
  (last,) = generate([pairs[3]])  # a short batch (padded to the compiled size)
  np.testing.assert_array_equal(last, np.asarray(Image.open(images[3])))


def test_cli_scores_a_folder_and_reports_skipped_metrics(testsets, weights, tmp_path, capsys):
  first = runner.evaluate(testsets["pixabay"], "pixabay", tmp_path / "a", {},
                      metrics.load_suite(batch_size=MB), limit=3, progress=False)
  assert first["methods"][em.COPY_PASTE]["clip"] is None  # every metric skipped, still a table
  out = tmp_path / "report"
  rc = evaluate_cli.run(_args(images=tmp_path / "a" / "images" / em.COPY_PASTE, name="pasted",
                     testset="pixabay", root=testsets["pixabay"], out=out, limit=3,
                     dino=weights / "dino", metric_batch=MB, write_inputs=True))
  assert rc == 0
  captured = capsys.readouterr()
  assert "CLIP weights not found (no --clip given)" in captured.err
  assert "| pasted |" in captured.out and "wrote" in captured.out
  report = json.loads((out / "metrics.json").read_text())
  assert list(report["methods"]) == ["pasted", em.COPY_PASTE]
  assert report["methods"]["pasted"]["dino"] == pytest.approx(
      report["methods"][em.COPY_PASTE]["dino"], abs=1e-9)
  assert report["methods"]["pasted"]["clip"] is None and "clip" in report["skipped"]
  assert len(list((out / "inputs").glob("*_object.png"))) == 3
  assert len(list((out / "inputs").glob("*[0-9]_mask.png"))) == 3


def test_images_folder_of_the_real_targets_has_zero_fid(testsets, weights, tmp_path):
  """--images scoring: a folder holding the real targets themselves must give FID 0 against
  the real targets, and per-pair files are matched by pair id (zero padding or not)."""
  from imprint_jax.data.pipeline import decode_record
  source, features, n = ts.open_pairs(testsets["pixabay"], "pixabay", limit=5)
  folder = tmp_path / "real"
  folder.mkdir()
  for i in range(n):
    rec = decode_record(source[i], features)
    name = f"{rec['pair_id']:05d}.png" if i % 2 else f"{rec['pair_id']}.png"
    Image.fromarray(rec["target"]).save(folder / name)
  suite = metrics.load_suite(inception=weights / "inception.safetensors", clip=weights / "clip",
                             batch_size=MB)
  report = runner.evaluate(testsets["pixabay"], "pixabay", tmp_path / "out",
                       {"real": em.folder_generator(folder)}, suite, limit=5, batch_size=2,
                       progress=False)
  assert abs(report["methods"]["real"]["fid"]) < 1e-6
  assert report["methods"][em.COPY_PASTE]["fid"] > 1e-3
  assert report["methods"]["real"]["dino"] is None and "dino" in report["skipped"]


def test_dreambooth_images_only_matches_the_baseline_it_was_made_from(testsets, weights,
                                                                       tmp_path):
  """Scoring the copy-paste outputs as an external method reproduces the baseline's scores;
  DreamBooth has no FID."""
  suite = metrics.load_suite(clip=weights / "clip", dino=weights / "dino",
                             inception=weights / "inception.safetensors", batch_size=MB)
  first = runner.evaluate(testsets["dreambooth"], "dreambooth", tmp_path / "a",
                      {}, suite, batch_size=3, progress=False)
  folder = tmp_path / "a" / "images" / em.COPY_PASTE
  assert first["pairs"] >= 4 and len(list(folder.glob("*.png"))) == first["pairs"]
  second = runner.evaluate(testsets["dreambooth"], "dreambooth", tmp_path / "b",
                       {"pasted": em.folder_generator(folder)}, suite, batch_size=2,
                       progress=False)
  a, b = second["methods"]["pasted"], second["methods"][em.COPY_PASTE]
  for key in ("clip", "dino"):
    assert a[key] == pytest.approx(b[key], abs=1e-9) == first["methods"][em.COPY_PASTE][key]
  assert a["fid"] is None and "no real composites" in second["skipped"]["fid"]


def test_protocol_crops_and_copy_paste():
  image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
  crop = em.identity_crop(image, (8, 1, 12, 3))  # 4 x 2 box at the right edge
  assert crop.shape == (4, 4, 3)
  np.testing.assert_array_equal(crop[1:3], image[1:3, 8:12])  # the box, centred vertically
  np.testing.assert_array_equal(crop[0], image[0, 8:12])      # real context above it
  keep = np.zeros((10, 12), bool)
  keep[1:3, 8:12] = True
  masked = em.identity_crop(image, (8, 1, 12, 3), keep)
  assert (masked[0] == 255).all() and (masked[3] == 255).all()
  corner = em.identity_crop(image, (0, 0, 2, 6))  # square leaves the image on the left
  assert corner.shape == (6, 6, 3) and (corner[:, :2] == 255).all()

  g = 40
  obj = np.full((20, 20, 3), 255, np.uint8)
  obj_mask = np.zeros((20, 20, 1), np.uint8)
  obj[5:15, 2:18], obj_mask[5:15, 2:18] = (200, 10, 10), 255  # a 16 x 10 object
  background = np.full((g, g, 3), 30, np.uint8)
  background[10:20, 10:30] = 90  # "the original object" under the region
  region = np.zeros((g, g), bool)
  region[10:30, 10:30] = True
  pair = ts.Pair(0, obj, obj_mask, background, region, (10, 10, 30, 30), background)
  pasted = em.copy_paste(pair, erase=False)
  changed = np.any(pasted != background, axis=-1)
  ys, xs = np.nonzero(changed)
  assert (xs.min(), xs.max() + 1) == (10, 30)              # aspect-fit: full box width
  assert ys.min() >= 10 and ys.max() < 30 and ys.max() + 1 - ys.min() == 12  # 20 * 10/16 -> 12
  assert (pasted[changed] == (200, 10, 10)).all()
  erased = em.copy_paste(pair, erase=True)
  assert not (erased[region] == 90).all(axis=-1).any()      # the original object is gone
  np.testing.assert_array_equal(erased[~region], background[~region])


def test_bad_input_gives_one_line(testsets, weights, tmp_path):
  with pytest.raises(UserError, match="give --ckpt"):
    evaluate_cli.run(_args(testset="pixabay", root=testsets["pixabay"], out=tmp_path / "x"))
  with pytest.raises(UserError, match="use --testset dreambooth"):
    evaluate_cli.run(_args(images=tmp_path, testset="pixabay", root=testsets["dreambooth"],
                  out=tmp_path / "x"))
  with pytest.raises(UserError, match="no such folder"):
    evaluate_cli.run(_args(images=tmp_path, testset="pixabay", root=tmp_path / "nope",
                  out=tmp_path / "x"))
  folder = tmp_path / "partial"
  folder.mkdir()
  Image.fromarray(np.zeros((G, G, 3), np.uint8)).save(folder / "00000.png")
  with pytest.raises(UserError, match=r"no image for pair \d+ \(expected \d{5}\.png"):
    evaluate_cli.run(_args(images=folder, testset="dreambooth", root=testsets["dreambooth"],
                  out=tmp_path / "y", clip=weights / "clip"))
  assert not (tmp_path / "y").exists()  # nothing half-written


def test_pixabay_has_one_pair_per_image_its_largest_instance(testsets, tmp_path):
  from imprint_jax.data_prep.readers import READERS
  from imprint_jax.data.pipeline import decode_record
  source, features, n = ts.open_pairs(testsets["pixabay"], "pixabay")
  recs = [decode_record(source[i], features) for i in range(n)]
  images = [r["target_id"].split("#")[0] for r in recs]
  assert n == 4 and len(set(images)) == 4  # one pair per image
  # The kept instance is the image's largest valid one.
  reader, root = READERS["images"], testsets["raw_images"]
  groups, _ = reader.list_groups(root)
  largest = {}
  for g in groups:
    views = prep_pairs.validate_frames(root, reader.group_frames(root, g), PREP, Counter())
    assert len(views) == 2 and views[0].area != views[1].area
    best = max(views, key=lambda v: v.area)
    largest[best.frame.image] = best.ident
  assert sorted(r["target_id"] for r in recs) == sorted(largest.values())
  # A set with every instance is refused for the paper's protocol, unless asked for.
  with pytest.raises(UserError, match="come from one image.*--instances largest"):
    runner.evaluate(testsets["pixabay_all"], "pixabay", tmp_path / "a", {},
                metrics.load_suite(batch_size=MB), progress=False)
  assert not (tmp_path / "a").exists()
  report = runner.evaluate(testsets["pixabay_all"], "pixabay", tmp_path / "b", {},
                       metrics.load_suite(batch_size=MB), all_instances=True, progress=False)
  assert report["pairs"] == 8 and report["settings"]["all_instances"] is True


def _tiny_paint_by_example(folder):
  """A random-weight Paint-by-Example pipeline built from diffusers' classes, saved."""
  from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler
  from diffusers import UNet2DConditionModel
  from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=9,
      out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
      norm_num_groups=8)
  vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                      down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                      norm_num_groups=8)
  encoder = PaintByExampleImageEncoder(transformers.CLIPVisionConfig(
      hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4,
      num_hidden_layers=5, image_size=32, patch_size=4), proj_size=32)
  PaintByExamplePipeline(
      vae=vae, image_encoder=encoder, unet=unet, scheduler=PNDMScheduler(skip_prk_steps=True),
      safety_checker=None, feature_extractor=transformers.CLIPImageProcessor(
          crop_size=32, size=32)).save_pretrained(folder)
  return folder


def test_paint_by_example_baseline_scored_beside_ours(testsets, weights, tmp_path, capsys):
  pbe = _tiny_paint_by_example(tmp_path / "pbe")
  out = tmp_path / "report"
  rc = evaluate_cli.run(_args(baseline="paint-by-example", baseline_weights=pbe, testset="pixabay",
                     root=testsets["pixabay"], out=out, limit=2, steps=2, batch_size=2,
                     clip=weights / "clip", dino=weights / "dino", metric_batch=MB,
                     write_inputs=True))
  assert rc == 0 and "| paint-by-example |" in capsys.readouterr().out
  report = json.loads((out / "metrics.json").read_text())
  assert list(report["methods"]) == ["paint-by-example", em.COPY_PASTE]
  assert report["settings"]["baseline_weights"] == str(pbe)
  r = report["methods"]["paint-by-example"]
  assert -100.0 <= r["clip"] <= 100.0 and -100.0 <= r["dino"] <= 100.0
  assert r["clip"] != report["methods"][em.COPY_PASTE]["clip"]
  # It ran on exactly our inputs: the pairs written by --write-inputs, per-pair seeds.
  pairs = next(ts.iter_batches(testsets["pixabay"], "pixabay", limit=2, batch_size=2))
  for p in pairs:
    stem = out / "inputs" / f"{p.pair_id:05d}"
    np.testing.assert_array_equal(np.asarray(Image.open(f"{stem}_background.png")),
                                  p.background)
    np.testing.assert_array_equal(np.asarray(Image.open(f"{stem}_mask.png")) > 0, p.region)
  from imprint_jax.evaluation import baselines
  generate = baselines.paint_by_example_generator(pbe, steps=2, batch_size=1)
  saved = [np.asarray(Image.open(out / "images" / "paint-by-example" / f"{p.pair_id:05d}.png"))
           for p in pairs]
  # Other batching and order: the same images (up to torch's float rounding, which differs
  # between batch sizes: measured at most 1 of 255 on 2 of 12,288 values).
  again = generate(pairs[::-1])[::-1]
  for a, b, p in zip(saved, again, pairs):
    assert a.shape == (G, G, 3)
    assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 0.01
    assert np.abs(a[p.region].astype(int) - p.background[p.region]).mean() > 1.0
  with pytest.raises(UserError, match="--baseline and --baseline-weights go together"):
    evaluate_cli.run(_args(baseline="paint-by-example", testset="pixabay", root=testsets["pixabay"],
                  out=tmp_path / "x"))
  with pytest.raises(UserError, match="no model_index.json"):
    evaluate_cli.run(_args(baseline="paint-by-example", baseline_weights=tmp_path, testset="pixabay",
                  root=testsets["pixabay"], out=tmp_path / "x"))
