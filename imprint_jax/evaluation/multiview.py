"""`imprint-jax evaluate --testset multiview`: does an encoder keep one object's views together?

The paper's Fig. 10 shows with t-SNE that stage 1 makes DINOv2's embeddings of different views
of one object cluster. This measures it on a held-out multi-view set (a view dataset written by
`imprint-jax prepare --source mvimgnet --pairing views --split test`, or the val split of the
training set), for the original DINOv2 (`--dinov2 DIR`, a transformers folder) and for the
DINOv2 of a stage-1 checkpoint (`--ckpt`):

  embedding      DINOv2's CLS token (after its final LayerNorm) of each view's segmented object
                 on white (the record's `object`, as stage 1 feeds it), ImageNet-normalised,
                 L2-normalised. Objects = the view index's groups.
  nn_accuracy    share of views whose nearest other view (cosine) shows the same object
                 (chance: about (views per object - 1) / (views - 1)).
  silhouette     mean silhouette coefficient with cosine distance and the objects as clusters,
                 in [-1, 1] (higher: tighter, better separated objects).
  tsne.png       exact t-SNE (perplexity 30, or less for small sets) of each encoder's
                 embeddings, one panel per encoder, one colour per object.

Written atomically to --out: metrics.json, metrics.md, tsne.png.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from imprint_jax import convert
from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.convert.common import AtomicDir
from imprint_jax.data import schema
from imprint_jax.data.pipeline import decode_record, normalize_object, open_source
from imprint_jax.errors import UserError

EmbedFn = Callable[[np.ndarray], np.ndarray]  # (B, E, E, 3) uint8 -> (B, D) float


# ------------------------------------------------------------------------------------ scores

def _cosine_distance(x_ND: np.ndarray) -> np.ndarray:
  x = np.asarray(x_ND, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.clip(1.0 - x @ x.T, 0.0, 2.0)


def nn_accuracy(x_ND: np.ndarray, labels_N: np.ndarray) -> float:
  """Share of rows whose nearest other row (cosine) has the same label."""
  d = _cosine_distance(x_ND)
  np.fill_diagonal(d, np.inf)
  return float(np.mean(labels_N[np.argmin(d, axis=1)] == labels_N))


def silhouette(x_ND: np.ndarray, labels_N: np.ndarray) -> float:
  """Mean silhouette coefficient, cosine distance (a row alone in its cluster scores 0)."""
  d = _cosine_distance(x_ND)
  labels_N = np.asarray(labels_N)
  names = np.unique(labels_N)
  if len(names) < 2:
    raise UserError("the silhouette score needs at least 2 objects")
  member = labels_N[None, :] == names[:, None]                    # (C, N)
  sums = d @ member.T.astype(np.float64)                         # (N, C): distance to each
  sizes = member.sum(axis=1).astype(np.float64)                  # (C,)
  own = np.searchsorted(names, labels_N)
  own_size = sizes[own]
  a = sums[np.arange(len(d)), own] / np.maximum(own_size - 1, 1)
  other = sums / sizes[None, :]
  other[np.arange(len(d)), own] = np.inf
  b = other.min(axis=1)
  s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
  return float(np.mean(s))


def tsne(x_ND: np.ndarray, *, perplexity: float = 30.0, steps: int = 500,
         seed: int = 0) -> np.ndarray:
  """Exact t-SNE (van der Maaten & Hinton 2008) to 2-D: (N, D) -> (N, 2). O(N^2) memory: for
  the few hundred to few thousand views of a test set."""
  x = np.asarray(x_ND, np.float64)
  n = len(x)
  perplexity = min(perplexity, max(1.0, (n - 1) / 3.0))
  sq = np.square(x[:, None, :] - x[None, :, :]).sum(-1)
  # Per-row Gaussian bandwidth by bisection on the entropy.
  p = np.zeros((n, n))
  target = np.log(perplexity)
  for i in range(n):
    lo, hi, beta = 0.0, np.inf, 1.0
    row = np.delete(sq[i], i)
    for _ in range(64):
      w = np.exp(-(row - row.min()) * beta)
      w_sum = w.sum()
      h = np.log(w_sum) + beta * np.sum((row - row.min()) * w) / w_sum
      if abs(h - target) < 1e-5:
        break
      if h > target:
        lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
      else:
        hi, beta = beta, (beta + lo) / 2
    p[i, np.arange(n) != i] = w / w_sum
  p = np.maximum((p + p.T) / (2 * n), 1e-12)
  rng = np.random.default_rng(seed)
  y = rng.normal(0.0, 1e-4, (n, 2))
  velocity = np.zeros_like(y)
  gains = np.ones_like(y)
  rate = max(n / 12.0 / 4.0, 50.0)  # scikit-learn's learning_rate="auto"
  for it in range(steps):
    exaggeration = 12.0 if it < 100 else 1.0
    diff = y[:, None, :] - y[None, :, :]
    num = 1.0 / (1.0 + np.square(diff).sum(-1))
    np.fill_diagonal(num, 0.0)
    q = np.maximum(num / num.sum(), 1e-12)
    grad = 4.0 * ((exaggeration * p - q) * num)[:, :, None] * diff
    grad = grad.sum(axis=1)
    momentum = 0.5 if it < 250 else 0.8
    gains = np.where(np.sign(grad) != np.sign(velocity), gains + 0.2, gains * 0.8)
    gains = np.maximum(gains, 0.01)
    velocity = momentum * velocity - rate * gains * grad
    y = y + velocity
    y = y - y.mean(axis=0)
  return y


def _colours(k: int) -> list[tuple[int, int, int]]:
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(k, 1), 0.8, 0.85))
          for i in range(k)]


def tsne_png(panels: dict[str, np.ndarray], labels_N: np.ndarray, path: Path,
             size: int = 400) -> None:
  """One square scatter panel per encoder (points coloured by object, name on top)."""
  names = np.unique(labels_N)
  colour = dict(zip(names.tolist(), _colours(len(names))))
  canvas = Image.new("RGB", (size * len(panels), size + 20), "white")
  draw = ImageDraw.Draw(canvas)
  for k, (title, y) in enumerate(panels.items()):
    lo, hi = y.min(axis=0), y.max(axis=0)
    uv = (y - lo) / np.maximum(hi - lo, 1e-12) * (size - 20) + 10
    x0 = k * size
    draw.text((x0 + 8, 4), title, fill="black")
    draw.rectangle([x0, 20, x0 + size - 1, size + 19], outline=(200, 200, 200))
    for (u, v), label in zip(uv, labels_N.tolist()):
      draw.ellipse([x0 + u - 3, 20 + v - 3, x0 + u + 3, 20 + v + 3], fill=colour[label])
  canvas.save(path)


# -------------------------------------------------------------------------------- encoders

def _embed_with(dino, batch_size: int) -> EmbedFn:
  graphdef, state = nnx.split(dino)

  @jax.jit
  def cls(state, pixels):
    return nnx.merge(graphdef, state)(pixels)[:, 0].astype("float32")

  def embed(images: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      padded = np.concatenate([chunk, chunk[-1:].repeat(batch_size - len(chunk), 0)])
      out.append(np.asarray(cls(state, normalize_object(padded)))[:len(chunk)])
    return np.concatenate(out)

  return embed


def dinov2_encoder(folder: str | os.PathLike, batch_size: int = 16) -> EmbedFn:
  """The original DINOv2 from a transformers folder."""
  if not Path(folder).is_dir():
    raise UserError(f"--dinov2 {folder}: no such folder (a transformers DINOv2 folder)")
  return _embed_with(convert.load_dinov2(folder), batch_size)


def checkpoint_encoder(ckpt: str | os.PathLike, batch_size: int = 16) -> EmbedFn:
  """The DINOv2 of a checkpoint (stage 1's fine-tuned encoder, or any run's)."""
  model, _ = ckpt_lib.load_model(ckpt, dtype="float32")
  return _embed_with(model.dinov2, batch_size)


# ------------------------------------------------------------------------------------ data

def load_views(root: str | os.PathLike, split: str, limit: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(objects (N, E, E, 3) uint8, object label per view (N,), object names) of a view
  dataset's split; `limit` keeps the first objects."""
  if not Path(root).is_dir():
    raise UserError(f"--root {root}: no such folder (a view dataset written by `imprint-jax"
                    " prepare --source mvimgnet --pairing views`)")
  index = schema.load_view_index(root, split)
  if index is None:
    raise UserError(f"--root {root}: no {schema.VIEW_INDEX.format(split=split)}; --testset"
                    " multiview needs a view dataset (`prepare --pairing views`)")
  groups = index["groups"][:limit] if limit else index["groups"]
  groups = [g for g in groups if g[1] >= 2]
  if len(groups) < 2:
    raise UserError(f"--root {root}: split {split!r} has {len(groups)} objects with two or"
                    " more views; the scores need at least 2")
  source, features = open_source(str(root), split)
  images, labels, names = [], [], []
  for k, (start, n) in enumerate(groups):
    for r in range(start, start + n):
      rec = decode_record(source[r], features)
      images.append(rec["object"])
      labels.append(k)
    names.append(rec["object_id"].split("#")[0].rsplit("/", 2)[0])
  return np.stack(images), np.asarray(labels), names


# --------------------------------------------------------------------------------- running

def evaluate_multiview(root, out, encoders: dict[str, EmbedFn], *, split: str = "test",
                       limit: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Scores every encoder on the views of `root`'s split; writes the report folder."""
  if not encoders:
    raise UserError("--testset multiview: give --dinov2 DIR and/or --ckpt (a stage-1 run)")
  images, labels, names = load_views(root, split, limit)
  results, panels = {}, {}
  for name, embed in encoders.items():
    x = np.asarray(embed(images), np.float64)
    results[name] = {"nn_accuracy": nn_accuracy(x, labels), "silhouette": silhouette(x, labels)}
    panels[name] = tsne(x, seed=seed)
  chance = float(np.mean([(np.sum(labels == l) - 1) / (len(labels) - 1) for l in labels]))
  report = {"testset": "multiview", "root": os.fspath(root), "split": split,
            "objects": len(names), "views": int(len(labels)), "nn_chance": chance,
            "encoders": results}
  with AtomicDir(out) as tmp:
    (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "metrics.md").write_text(markdown(report))
    tsne_png(panels, labels, tmp / "tsne.png")
  return report


def markdown(report: dict[str, Any]) -> str:
  lines = [f"# imprint-jax evaluate: multiview (split {report['split']}, {report['objects']}"
           f" objects, {report['views']} views)", "",
           "| encoder | NN view retrieval ↑ | silhouette ↑ |", "|---|---:|---:|"]
  for name, r in report["encoders"].items():
    lines.append(f"| {name} | {100 * r['nn_accuracy']:.2f}% | {r['silhouette']:.4f} |")
  lines += ["", f"Chance NN retrieval: {100 * report['nn_chance']:.2f}%. Embedding: DINOv2 CLS"
            " token of the segmented object, cosine; t-SNE in tsne.png.", ""]
  return "\n".join(lines)
