"""`imprint-jax evaluate --testset multiview`: view retrieval, silhouette, t-SNE, end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from imprint_jax.data_prep import prepare, synthetic
from imprint_jax.cli import evaluate as evaluate_cli
from imprint_jax.cli.flags import evaluate as evaluate_flags
from imprint_jax.evaluation import multiview as mv
from imprint_jax.errors import UserError


def _clusters(rng, objects=6, views=5, dim=16, spread=0.1):
  centres = rng.normal(size=(objects, dim))
  x = np.repeat(centres, views, axis=0) + spread * rng.normal(size=(objects * views, dim))
  return x, np.repeat(np.arange(objects), views)


def test_scores_higher_for_an_encoder_that_separates_objects():
  rng = np.random.default_rng(0)
  separated, labels = _clusters(rng)
  random = rng.normal(size=separated.shape)  # a random encoder: no relation to the object
  assert mv.nn_accuracy(separated, labels) == 1.0
  assert mv.nn_accuracy(random, labels) < 0.5
  s_sep, s_rand = mv.silhouette(separated, labels), mv.silhouette(random, labels)
  assert s_sep > 0.8 and abs(s_rand) < 0.15 and s_sep > s_rand + 0.5
  # The silhouette against its definition, computed point by point (clusters of 1, 2, 4).
  x, lab = rng.normal(size=(7, 3)), np.array([0, 1, 1, 2, 2, 2, 2])
  d = mv._cosine_distance(x)
  ref = []
  for i in range(7):
    same = [j for j in range(7) if lab[j] == lab[i] and j != i]
    if not same:
      ref.append(0.0)
      continue
    a = np.mean(d[i, same])
    b = min(np.mean(d[i, lab == c]) for c in set(lab) if c != lab[i])
    ref.append((b - a) / max(a, b))
  assert mv.silhouette(x, lab) == pytest.approx(np.mean(ref), abs=1e-12)
  # t-SNE keeps separated objects apart: its 2-D map retrieves views as well.
  y = mv.tsne(separated, steps=300)
  assert y.shape == (len(labels), 2)
  d = np.square(y[:, None] - y[None]).sum(-1)
  np.fill_diagonal(d, np.inf)
  assert np.mean(labels[d.argmin(axis=1)] == labels) > 0.9  # measured 1.0


@pytest.fixture(scope="module")
def view_set(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mv")
  raw = synthetic.generate(tmp / "raw", synthetic.SyntheticConfig(
      groups=3, frames=4, frame_size=64, seed=4), layouts=("mvimgnet",))
  cfg = prepare.PrepareConfig(encoder_size=28, generator_size=32, min_size=8, min_area=0.005,
                              seed=0)
  prepare.prepare("mvimgnet", raw["mvimgnet"], tmp / "views", cfg, split="test", progress=False)
  torch.manual_seed(0)
  transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      image_size=28, patch_size=14)).save_pretrained(tmp / "dinov2")
  return tmp


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  """A checkpoint of configs/common.py's tiny IMPRINT, random weights filled in numpy."""
  import jax
  from flax import nnx
  from imprint_jax.configs.common import tiny_model
  from imprint_jax.convert import checkpoint as ckpt_lib
  from imprint_jax.models.imprint import Imprint, ImprintConfig
  cfg = ImprintConfig.from_dict(tiny_model().to_dict())
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Imprint(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def fill(path, x):
    if str(path[-1].key) == "scale":
      return np.ones(x.shape, np.float32)
    return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      fill, nnx.to_pure_dict(state)))
  path = tmp_path_factory.mktemp("ckpt") / "stage1"
  return ckpt_lib.save_model(path, nnx.merge(graphdef, state), {"stage": 1, "step": 0})


def _args(**kw):
  parser = argparse.ArgumentParser()
  evaluate_flags.add_arguments(parser)
  argv = []
  for k, v in kw.items():
    argv += ["--" + k.replace("_", "-"), str(v)]
  return parser.parse_args(argv)


def test_cli_end_to_end_on_a_view_set(view_set, tiny_ckpt, tmp_path, capsys):
  out = tmp_path / "report"
  rc = evaluate_cli.run(_args(testset="multiview", root=view_set / "views", dinov2=view_set / "dinov2",
                     ckpt=tiny_ckpt, out=out, batch_size=4))
  printed = capsys.readouterr().out
  assert rc == 0 and "| dinov2 |" in printed and "| checkpoint |" in printed
  report = json.loads((out / "metrics.json").read_text())
  assert report["objects"] == 3 and report["views"] == 12
  assert list(report["encoders"]) == ["dinov2", "checkpoint"]
  for r in report["encoders"].values():
    assert 0.0 <= r["nn_accuracy"] <= 1.0 and -1.0 <= r["silhouette"] <= 1.0
  assert report["encoders"]["dinov2"] != report["encoders"]["checkpoint"]
  assert report["nn_chance"] == pytest.approx(3 / 11)
  png = np.asarray(Image.open(out / "tsne.png"))
  assert png.shape == (420, 800, 3) and (png != 255).any()  # one panel per encoder
  views, labels, names = mv.load_views(view_set / "views", "test")
  assert views.shape == (12, 28, 28, 3) and len(set(names)) == 3
  assert np.bincount(labels).tolist() == [4, 4, 4]
  with pytest.raises(UserError, match="needs a view dataset"):
    mv.load_views(view_set / "views", "train")
  with pytest.raises(UserError, match="give --dinov2 DIR and/or --ckpt"):
    evaluate_cli.run(_args(testset="multiview", root=view_set / "views", out=tmp_path / "x"))
