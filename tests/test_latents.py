"""Precomputed stage-2 VAE latents: `imprint-jax encode-latents` then training on them."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stage2_data

from imprint_jax import cli
from imprint_jax.data import latent_store, pipeline, prepared, token_store
from imprint_jax.data import masks as masks_lib
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.imprint import Imprint, mask_to_latent
from imprint_jax.train import encode_objects, loop
from imprint_jax.train import data as train_data
from imprint_jax.train import setup as setup_lib
from imprint_jax.train.steps import StepConfig, stage2_loss

DRAWS = 2
LEVELS = (1, 2, 2, 3, 3, 4)  # levels 2 and 3 in DRAWS draws each
STEPS = 8


def tiny(sources, **overrides):
  return stage2_data.tiny_config(sources, STEPS, **overrides)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Two synthetic stage-2 sources, prepared once: [(folder, weight)]."""
  return stage2_data.two_sources(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def encoded(sources, tmp_path_factory):
  out = tmp_path_factory.mktemp("latents") / "latents"
  assert encode_objects.encode_latents(tiny(sources), out, mask_draws=DRAWS,
                                       progress=False) == out
  return out


def _model(c) -> Imprint:
  """The run's random init (what `encode_latents` and `train` start from)."""
  return Imprint(setup_lib.model_config(c), rngs=layers.init_rngs(c.seed))


def test_stored_latents_are_the_vae_posteriors_of_target_and_masked_backgrounds(
    sources, encoded):
  manifest = latent_store.load_manifest(encoded)
  assert manifest["levels"] == LEVELS and manifest["latent"] == (16, 16, 8)
  assert [e["path"] for e in manifest["sources"]] == [p for p, _ in sources]
  c = tiny(sources)
  vae = _model(c).vae
  for i, (folder, _) in enumerate(sources):
    records, _ = prepared.open_source(folder, "val", "grain")
    store = latent_store.LatentSource(str(encoded), i, folder, "val")
    assert len(store) == len(records) == manifest["sources"][i]["splits"]["val"] > 0
    decode = pipeline.DecodeRecord(folder, c.data.encoder_size, c.data.generator_size)
    for index in (0, len(records) - 1):
      rec = decode(records[index])
      lat = store.decode(store[index], rec["pair_id"])
      masks = lat["masks"]
      assert masks.shape == (len(LEVELS), 64, 64, 1) and set(np.unique(masks)) <= {0, 1}
      for k, level in enumerate(LEVELS):  # the pipeline's coarse masks, seeded per variant
        want = masks_lib.coarse_mask(rec["target_mask"], level, np.random.default_rng(
            pipeline.derive_seed(c.seed, 4, i, index, k)))
        np.testing.assert_array_equal(masks[k], want)
      assert not np.array_equal(masks[1], masks[2]) or not np.array_equal(masks[3], masks[4])
      target = pipeline.normalize_target(rec["target"][None])
      images = np.concatenate([target, target * (1 - masks.astype(np.float32))])
      mean, logvar = vae.encode(jnp.asarray(images))
      want = np.concatenate([mean, logvar], axis=-1)
      got = np.concatenate([lat["target_moments"][None], lat["masked_target_moments"]])
      np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(UserError, match="data changed"):
      store.decode(store[0], 10**6)


def test_pipeline_batches_carry_a_stored_mask_and_its_latents(sources, encoded):
  c = tiny(sources, **{"data.latents": str(encoded), "data.mask_level_probs": (0, 1, 0, 1)})
  stored = {}
  for i, (folder, _) in enumerate(sources):
    src = latent_store.LatentSource(str(encoded), i, folder, "train")
    for j in range(len(src)):
      pair_id, _ = token_store.unpack_record(src[j], src.fields)
      stored.setdefault(pair_id, []).append(src.decode(src[j], pair_id))  # ids may repeat
  ds = pipeline.stage2_dataset(train_data.data_config(c, sources, "train"), global_batch=8)
  batch = next(iter(ds))
  assert batch["target_moments"].shape == batch["masked_target_moments"].shape == (8, 16, 16, 8)
  assert batch["target_moments"].dtype == np.float16
  np.testing.assert_array_equal(batch["mask_latent"],
                                mask_to_latent(jnp.asarray(batch["mask"]), 4))
  np.testing.assert_array_equal(batch["masked_target"], batch["target"] * (1 - batch["mask"]))
  for b, pair_id in enumerate(batch["pair_id"]):
    level = int(batch["mask_level"][b])
    assert level in (2, 4)
    assert any((lat["target_moments"] == batch["target_moments"][b]).all()
               and LEVELS[k] == level and (lat["masks"][k] == batch["mask"][b]).all()
               and (lat["masked_target_moments"][k] == batch["masked_target_moments"][b]).all()
               for lat in stored[int(pair_id)] for k in range(len(LEVELS)))
  # Validation batches also carry the pixels that sample grids show and the sampler encodes.
  setup = setup_lib.build(c, total_steps=STEPS, steps_per_epoch=1)
  val = train_data.val_batches(c, setup, sources)
  assert set(val[0]) == {"object", "target", "mask", "masked_target", "target_moments",
                         "masked_target_moments", "mask_latent"}


def test_loss_and_gradients_on_latents_equal_the_pixel_path(sources):
  """One batch, one key: the stage-2 loss and the gradients of every trained parameter are
  the same whether the step runs the VAE encoder on pixels or reads its posteriors (the
  object enters as tokens on both sides: `test_object_tokens` covers that part)."""
  c = tiny(sources)
  model = _model(c)
  g = np.random.default_rng(0)
  batch = {"object_tokens": g.standard_normal((2, 21, 32), np.float32),
           "target": g.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32),
           "mask": (g.uniform(size=(2, 64, 64, 1)) > 0.5).astype(np.float32)}
  batch["masked_target"] = batch["target"] * (1 - batch["mask"])
  cached = {"object_tokens": batch["object_tokens"],
            "mask_latent": np.stack([latent_store.latent_mask(m, 4) for m in batch["mask"]])}
  for name in ("target", "masked_target"):
    cached[f"{name}_moments"] = jnp.concatenate(model.vae.encode(jnp.asarray(batch[name])), -1)
  keys = jax.random.split(jax.random.key(0), 2)
  cfg = StepConfig(embed_dropout=0.5)
  trained = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vae")),
                    nnx.Not(nnx.PathContains("dinov2")))  # stage 2 trains the adapter and UNet
  loss_and_grads = nnx.jit(nnx.value_and_grad(
      lambda m, b: stage2_loss(m, b, keys, cfg), argnums=nnx.DiffState(0, trained)))
  want_loss, want = loss_and_grads(model, batch)
  got_loss, got = loss_and_grads(model, cached)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  want, got = jax.tree.leaves(want), jax.tree.leaves(got)
  assert len(want) == len(jax.tree.leaves(nnx.state(model, trained))) > 0
  assert sum(np.abs(a).max() > 0 for a in want) > len(want) // 2
  # float32 rounding only (the VAE runs inside the jitted step on one side, before it on the
  # other): every entry within 1e-5 of the largest gradient entry.
  scale = max(float(np.abs(a).max()) for a in want)
  worst = max(float(np.abs(b - a).max()) for a, b in zip(want, got))
  assert worst <= 1e-5 * scale, (worst, scale)


def test_train_on_latents_and_tokens(sources, encoded, tmp_path):
  """Stage 2 with neither frozen encoder in the step (the UNet-and-adapter step). Also the
  training run of `data.object_tokens` (tests/test_object_tokens.py has none of its own)."""
  tokens = encode_objects.encode(tiny(sources), tmp_path / "tokens", variants=2,
                                 progress=False)
  c = tiny(sources, **{"data.latents": str(encoded), "data.object_tokens": str(tokens)})
  assert setup_lib.model_keys(c) == ("object_tokens", "target_moments", "mask_latent",
                                     "masked_target_moments")
  result = loop.train(c, tmp_path / "run")
  assert result.final_step == STEPS
  m = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  loss = {r["step"]: r["loss"] for r in m if "loss" in r}
  assert sorted(loss) == list(range(1, STEPS + 1))
  first, last = np.mean([loss[1], loss[2]]), np.mean([loss[STEPS - 1], loss[STEPS]])
  assert last < 0.85 * first, (first, last)
  assert any("val_loss" in r for r in m)
  # The sampler encodes pixels: validation batches of a cached run must still carry them.
  assert (tmp_path / "run" / "samples" / f"step_{STEPS:07d}.png").is_file()


def test_bad_latent_folders_fail_before_compiling(sources, encoded, tmp_path, monkeypatch):
  def no_compiling(*args):
    raise AssertionError("compiled the step before refusing the latents")

  monkeypatch.setattr(loop, "compile_steps", no_compiling)

  def fails(match, c):
    with pytest.raises(UserError, match=match):
      loop.train(c, tmp_path / "run")

  fails("data.latents .*: no manifest.json", tiny(sources, **{"data.latents": str(tmp_path)}))
  fails("latents were encoded for 2 data sources, the run has 1",
        tiny(sources[:1], **{"data.latents": str(encoded)}))
  fails("encoded at 64 px", tiny(sources, **{"data.latents": str(encoded),
                                             "data.generator_size": 32}))
  # Another VAE: the random init of another seed.
  fails("made by another encoder than this run's VAE",
        tiny(sources, **{"data.latents": str(encoded), "seed": 1}))
  # A run drawing a mask level that was not stored.
  partial = tmp_path / "partial"
  shutil.copytree(encoded, partial)
  manifest = json.loads((partial / "manifest.json").read_text())
  manifest["levels"] = [1, 4]
  (partial / "manifest.json").write_text(json.dumps(manifest))
  fails("no stored masks of level 2", tiny(sources, **{"data.latents": str(partial)}))
  # Changed data: a source with fewer pairs than were encoded.
  manifest = latent_store.load_manifest(encoded)
  manifest["sources"][0]["splits"]["train"] += 1
  token_store.write_json_manifest(partial, {**manifest, "levels": list(LEVELS)})
  fails("the data changed since encoding", tiny(sources, **{"data.latents": str(partial)}))


def test_encode_latents_cli(sources, encoded, tmp_path, capsys):
  def run(*args):
    return cli.main(["encode-latents", "--config", "stage2:tiny", *args])

  assert run("--out", str(encoded)) == 2
  assert "already holds latents" in capsys.readouterr().err
  assert run("--out", str(tmp_path / "t"), "--config", "stage1:tiny") == 2
  assert "not a stage-2 config" in capsys.readouterr().err
  assert run("--out", str(tmp_path / "t"), "--mask-draws", "0") == 2
  assert "--mask-draws 0" in capsys.readouterr().err
  workdir = str(Path(sources[0][0]).parents[1])
  prepared = "data.sources=(('synthetic:images', 2.0), ('synthetic:youtube_vos', 1.0))"
  assert run("--out", str(tmp_path / "t"), "--batch", "8", "--mask-draws", "4",
             "--workdir", workdir, "--set", prepared) == 2
  assert "needs 11 images per pair" in capsys.readouterr().err
  assert not (tmp_path / "t" / token_store.MANIFEST).exists()
