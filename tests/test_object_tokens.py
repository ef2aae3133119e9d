"""Precomputed stage-2 object tokens: `imprint-jax encode-objects` then training on them
(the training run on tokens is tests/test_latents.py's, on tokens and latents together)."""

import os
from pathlib import Path

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stage2_data

from imprint_jax import cli
from imprint_jax.data_prep import sources as data_sources
from imprint_jax.data import pipeline, prepared, token_store
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.imprint import Imprint
from imprint_jax.train import encode_objects, loop, run_config, steps
from imprint_jax.train import data as train_data
from imprint_jax.train import setup as setup_lib
from imprint_jax.train.steps import StepConfig, stage2_loss

VARIANTS = 2
STEPS = 8


def tiny(sources, **overrides):
  return stage2_data.tiny_config(sources, STEPS, **overrides)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Two synthetic stage-2 sources, prepared once: [(folder, weight)]."""
  return stage2_data.two_sources(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def encoded(sources, tmp_path_factory):
  """The token folder of `sources`, through the command line."""
  out = tmp_path_factory.mktemp("tokens") / "tokens"
  c = tiny(sources)
  assert encode_objects.encode(c, out, variants=VARIANTS, progress=False) == out
  return out


def _model(c) -> Imprint:
  """The run's random init (what `encode` and `train` start from without checkpoints)."""
  return Imprint(setup_lib.model_config(c), rngs=layers.init_rngs(c.seed))


def test_stored_tokens_are_the_encoder_on_the_perturbed_objects(sources, encoded):
  out = encoded
  manifest = token_store.load_manifest(out)
  c = tiny(sources)
  assert [e["path"] for e in manifest["sources"]] == [p for p, _ in sources]
  assert manifest["shape"] == (VARIANTS, 21, 32)  # 1 + 4 registers + (56 / 14)^2 tokens
  model = _model(c)
  transform = pipeline.Stage2Transform(train_data.data_config(c, sources, "train"))
  for i, (folder, _) in enumerate(sources):
    records, _ = prepared.open_source(folder, "train", "grain")
    tokens = token_store.TokenSource(str(out), i, folder, "train")
    assert len(tokens) == len(records) == manifest["sources"][i]["splits"]["train"]
    decode = pipeline.DecodeRecord(folder, c.data.encoder_size, c.data.generator_size)
    for index in (0, len(records) - 1):
      rec = decode(records[index])
      stored = tokens.decode(tokens[index], rec["pair_id"])
      objs = np.stack([transform.perturb_object(rec, np.random.default_rng(
          pipeline.derive_seed(c.seed, 3, i, index, k))) for k in range(VARIANTS)])
      want = np.asarray(model.dinov2(jnp.asarray(pipeline.normalize_object(objs))))
      np.testing.assert_allclose(stored.astype(np.float32), want, rtol=2e-3, atol=2e-3)
      if rec["kind"] == "image":  # always perturbed: the variants differ
        assert not np.array_equal(stored[0], stored[1])
    with pytest.raises(UserError, match="data changed"):
      tokens.decode(tokens[0], 10**6)  # a record read against the wrong pair


def test_pipeline_batches_carry_a_stored_variant_of_their_pair(sources, encoded):
  out = encoded
  c = tiny(sources, **{"data.object_tokens": str(out)})
  by_pair = {}
  for i, (folder, _) in enumerate(sources):
    src = token_store.TokenSource(str(out), i, folder, "train")
    for j in range(len(src)):
      pair_id, tokens = token_store.decode_record(src[j], src.shape)
      by_pair[(i, pair_id)] = tokens
  ds = pipeline.stage2_dataset(train_data.data_config(c, sources, "train"), global_batch=8)
  it = iter(ds)
  seen = 0
  for _ in range(3):
    batch = next(it)
    assert batch["object_tokens"].shape == (8, 21, 32)
    assert batch["object_tokens"].dtype == np.float16
    for b, pair_id in enumerate(batch["pair_id"]):
      candidates = [t for (i, p), t in by_pair.items() if p == pair_id]
      assert any((batch["object_tokens"][b] == t).all(axis=(1, 2)).any() for t in candidates)
      seen += 1
  assert seen == 24


def test_loss_on_tokens_equals_loss_on_pixels(sources):
  """The step's two context paths: adapter(tokens) == adapter(DINOv2(pixels)): the same
  stage-2 loss, and the same adapter gradients through the context."""
  c = tiny(sources)
  model = _model(c)
  g = np.random.default_rng(0)
  batch = {"object": g.standard_normal((4, 56, 56, 3), np.float32),
           "target": g.uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32),
           "mask": (g.uniform(size=(4, 64, 64, 1)) > 0.5).astype(np.float32)}
  batch["masked_target"] = batch["target"] * (1 - batch["mask"])
  with_tokens = {**{k: v for k, v in batch.items() if k != "object"},
                 "object_tokens": model.dinov2(jnp.asarray(batch["object"]))}
  keys = jax.random.split(jax.random.key(0), 4)
  cfg = StepConfig(embed_dropout=0.25)
  loss = nnx.jit(lambda m, b: stage2_loss(m, b, keys, cfg))
  np.testing.assert_allclose(loss(model, with_tokens), loss(model, batch), rtol=1e-5)

  def context_grads(b):
    adapter = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("adapter")))
    return nnx.grad(lambda m: jnp.sum(steps._context(m, b, keys, cfg.embed_dropout) ** 2),
                    argnums=adapter)(model)

  want, got = (jax.tree.leaves(context_grads(b)) for b in (batch, with_tokens))
  assert len(want) == len(jax.tree.leaves(nnx.state(model.adapter, nnx.Param))) > 0
  assert sum(np.abs(a).max() > 0 for a in want) > len(want) // 2
  for a, b in zip(want, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_bad_token_folders_fail_before_compiling(sources, encoded, tmp_path, monkeypatch):
  def no_compiling(*args):
    raise AssertionError("compiled the step before refusing the tokens")

  monkeypatch.setattr(loop, "compile_steps", no_compiling)

  def fails(match, c):
    with pytest.raises(UserError, match=match):
      loop.train(c, tmp_path / "run")

  fails("no manifest.json", tiny(sources, **{"data.object_tokens": str(tmp_path)}))
  c = tiny(sources, **{"data.object_tokens": str(encoded)})
  c.components.dinov2 = {"phase_lrs": (1e-6, 1e-6), "warmup_steps": 0}
  fails("needs a frozen DINOv2", c)
  fails("encoded for 2 data sources, the run has 1",
        tiny(sources[:1], **{"data.object_tokens": str(encoded)}))
  fails("encoded at 56 px", tiny(sources, **{"data.object_tokens": str(encoded),
                                             "data.encoder_size": 28}))
  # Another encoder: the random DINOv2 of another seed.
  fails("made by another encoder", tiny(sources, **{"data.object_tokens": str(encoded),
                                                    "seed": 1}))


def test_synthetic_sources_are_prepared_by_their_caller(sources, tmp_path):
  """The trainer only opens prepared folders: an unprepared `synthetic:` source is one line
  saying how to prepare it; preparing again keeps the folders already there."""
  c = run_config.load("stage2:tiny")
  c.data.sources = (("synthetic:images", 2.0), ("synthetic:youtube_vos", 1.0))
  with pytest.raises(UserError) as e:
    train_data.resolve_sources(c, tmp_path)
  assert "\n" not in str(e.value) and "prepare_sources(config, workdir)" in str(e.value)
  assert not (tmp_path / "data").exists()
  workdir = Path(sources[0][0]).parents[1]
  info = Path(sources[0][0]) / "dataset_info.json"
  before = info.stat().st_mtime_ns
  assert data_sources.prepare_sources(c, workdir) == {
      "synthetic:images": Path(sources[0][0]), "synthetic:youtube_vos": Path(sources[1][0])}
  assert info.stat().st_mtime_ns == before
  assert train_data.resolve_sources(c, workdir) == sources
  c.data.sources = (("synthetic:coco", 1.0),)
  with pytest.raises(UserError, match="unknown layout"):
    data_sources.prepare_sources(c, tmp_path)


def test_encode_objects_cli_errors(sources, encoded, tmp_path, capsys):
  def run(*args):
    return cli.main(["encode-objects", "--config", "configs/stage2.py:tiny", *args])

  assert run("--out", str(encoded)) == 2
  assert "already holds object tokens" in capsys.readouterr().err
  assert run("--out", str(tmp_path / "t"), "--config", "configs/stage1.py:tiny") == 2
  assert "not a stage-2 config" in capsys.readouterr().err
  assert run("--out", str(tmp_path / "t"), "--variants", "0") == 2
  assert "--variants 0" in capsys.readouterr().err
  assert not (tmp_path / "t" / token_store.MANIFEST).exists()


def test_encode_objects_to_gs_uploads_the_same_store(sources, encoded, gcs, tmp_path):
  """`--out gs://...`: the store is written locally and uploaded (manifest last); it holds the
  same files, byte for byte, as the local encoding, and nothing local is left."""
  remote = epath.Path(f"{gcs}/tokens-{tmp_path.name}")
  got = encode_objects.encode(tiny(sources), os.fspath(remote), variants=VARIANTS,
                              progress=False)
  assert os.fspath(got) == os.fspath(remote)
  local = {p.relative_to(encoded).as_posix(): p.read_bytes()
           for p in encoded.rglob("*") if p.is_file()}
  def files(folder):  # epath has no recursive glob on gs://
    for p in folder.iterdir():
      yield from files(p) if p.is_dir() else (p,)

  uploaded = {os.fspath(p)[len(os.fspath(remote)) + 1:]: p.read_bytes() for p in files(remote)}
  # The manifest names the data sources and folder-independent settings only.
  assert uploaded.keys() == local.keys() and "manifest.json" in uploaded
  assert all(uploaded[k] == local[k] for k in local), [k for k in local if uploaded[k] != local[k]]
  with pytest.raises(UserError, match="already holds object tokens"):
    encode_objects.encode(tiny(sources), os.fspath(remote), variants=VARIANTS, progress=False)
