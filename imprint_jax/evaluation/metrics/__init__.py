"""The paper's evaluation metrics (IMPRINT Sec. 4.2) in JAX, loaded from PyTorch checkpoints.

    from imprint_jax.evaluation import metrics
    suite = metrics.load_suite(clip="weights/clip-vit-large-patch14",
                               dino="weights/dino-vits16",
                               inception="weights/pt_inception-2015-12-05-6726825d.safetensors")
    clip_a, clip_b = suite.clip(images_a), suite.clip(images_b)   # (N, D) embeddings
    scores = metrics.cosine_x100(clip_a, clip_b)                   # CLIP-score per pair
    fid = metrics.fid.fid_from_features(suite.inception(fakes), suite.inception(reals))

  CLIP-score  100 x cosine of CLIP image embeddings (ViT-L/14 by default), image to image.
  DINO-score  100 x cosine of DINO ViT-S/16 CLS tokens (after the final LayerNorm).
  DreamSim    DreamSim's distance (lower is better), through the optional `dreamsim` package
              (PyTorch only: its ensemble carries LoRA weights), from a local weights folder.
  FID         Fréchet distance of pool3 features of pytorch-fid's InceptionV3 (see `fid`).

Images go in as lists of (H, W, 3) uint8 arrays; each network applies its own preprocessing.
A metric whose weights are not given or not on disk is skipped with one line saying what to
download and which flag to pass (`MetricSuite.skipped`); the others still run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imprint_jax.errors import UserError
from imprint_jax.evaluation.metrics import fid
from imprint_jax.evaluation.metrics.fid import inception_missing_message

# JAX and the networks are imported on first use: `imprint_jax.cli` builds the `evaluate`
# parser from this package, and JAX must not start before `plan` has set JAX_PLATFORMS.

DREAMSIM_SKIPPED = ("DreamSim skipped: pip install 'imprint-jax[eval]' and pass"
                    " --dreamsim-dir")


def clip_missing_message(path: str | os.PathLike | None) -> str:
  where = f"at {path}" if path else "(no --clip given)"
  return (f"CLIP weights not found {where}: download openai/clip-vit-large-patch14 with"
          " `hf download openai/clip-vit-large-patch14 config.json model.safetensors --local-dir"
          " DIR` and pass --clip DIR")


def dino_missing_message(path: str | os.PathLike | None) -> str:
  where = f"at {path}" if path else "(no --dino given)"
  return (f"DINO weights not found {where}: download facebook/dino-vits16 with"
          " `hf download facebook/dino-vits16 config.json model.safetensors --local-dir DIR`"
          " (safetensors only) and pass --dino DIR")


@functools.cache
def _jitted_apply():
  # JAX only when a network runs: this package is read for `evaluate --help`'s defaults.
  import jax
  from flax import nnx

  # One compiled function per (architecture, input shape), shared by every Embedder.
  return jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)


def apply(module: Any, x: np.ndarray) -> np.ndarray:
  """`module(x)` jitted; compiled once per (architecture, input shape) for the process."""
  from flax import nnx  # see _jitted_apply
  graphdef, state = nnx.split(module)
  return np.asarray(_jitted_apply()(graphdef, state, x))


class Embedder:
  """A metric network and its preprocessing, jitted once and run in fixed-size batches."""

  def __init__(self, module: Any, preprocess: Callable[[Sequence[np.ndarray]], np.ndarray],
               batch_size: int = 32):
    from flax import nnx  # see _jitted_apply
    if batch_size < 1:
      raise UserError(f"metric batch size {batch_size} must be >= 1")
    self._graphdef, self._state = nnx.split(module)
    self.preprocess = preprocess
    self.batch_size = batch_size

  def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """N uint8 images -> (N, D) float32 features (last batch padded, so one compile)."""
    out = []
    for i in range(0, len(images), self.batch_size):
      x = self.preprocess(images[i:i + self.batch_size])
      n = x.shape[0]
      if n < self.batch_size:
        x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
      out.append(np.asarray(_jitted_apply()(self._graphdef, self._state, x))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def cosine_x100(a_ND: np.ndarray, b_ND: np.ndarray) -> np.ndarray:
  """Row-wise 100 x cosine similarity, float64 (N,)."""
  a, b = np.asarray(a_ND, np.float64), np.asarray(b_ND, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.sum(a * b, axis=-1)


class DreamSim:
  """DreamSim distances through the `dreamsim` package (PyTorch), weights from a local folder."""

  def __init__(self, cache_dir: str | os.PathLike, batch_size: int = 16):
    import torch  # the `eval` extra; an ImportError makes load_suite skip DreamSim
    from dreamsim import dreamsim  # the `eval` extra
    self.torch = torch
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
      self.model, self.preprocess = dreamsim(pretrained=True, device=self.device,
                                             cache_dir=str(cache_dir))
    except Exception as e:  # the package downloads missing weights; we have no network
      first = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"DreamSim could not load its weights from {cache_dir} ({first});"
                      " download them once on a networked machine into that folder") from None
    self.batch_size = batch_size

  def __call__(self, images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray]
               ) -> np.ndarray:
    """Per-pair distances (N,) float64; lower is more similar."""
    from PIL import Image  # with DreamSim only, like torch above
    torch = self.torch
    out = []
    with torch.no_grad():
      for i in range(0, len(images_a), self.batch_size):
        prep = lambda ims: torch.cat([self.preprocess(Image.fromarray(np.asarray(im)))
                                      for im in ims]).to(self.device)
        d = self.model(prep(images_a[i:i + self.batch_size]),
                       prep(images_b[i:i + self.batch_size]))
        out.append(np.asarray(d.detach().float().cpu().numpy(), np.float64).reshape(-1))
    return np.concatenate(out) if out else np.zeros((0,), np.float64)


@dataclasses.dataclass
class MetricSuite:
  """The loaded metrics; a None field was skipped for the reason in `skipped[name]`."""
  clip: Embedder | None = None
  dino: Embedder | None = None
  inception: Embedder | None = None
  dreamsim: DreamSim | None = None
  fid_resize: str = "pil-bicubic"
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def clip_embedder(module, batch_size: int = 32) -> Embedder:
  """An Embedder for a `clip.CLIPVision` with CLIPImageProcessor's preprocessing."""
  # Network modules import JAX; this package stays light for `evaluate --help`'s defaults.
  from imprint_jax.evaluation.metrics.clip import clip_preprocess
  return Embedder(module, clip_preprocess(module.cfg.image_size), batch_size)


def dino_embedder(module, batch_size: int = 32) -> Embedder:
  """An Embedder for a `vit.ViT` with DINO's evaluation preprocessing."""
  from imprint_jax.evaluation.metrics.vit import dino_preprocess  # JAX: see clip_embedder
  return Embedder(module, dino_preprocess(module.cfg.image_size), batch_size)


def inception_embedder(module, resize: str = "pil-bicubic", batch_size: int = 32) -> Embedder:
  """An Embedder for an `inception.FIDInceptionV3` with the FID resize `resize`."""
  if resize not in fid.RESIZE_METHODS:
    raise UserError(f"--fid-resize {resize!r}: expected one of {fid.RESIZE_METHODS}")
  return Embedder(module, lambda ims: fid.preprocess(ims, resize), batch_size)


def load_suite(*, clip: str | os.PathLike | None = None, dino: str | os.PathLike | None = None,
               inception: str | os.PathLike | None = None,
               dreamsim_dir: str | os.PathLike | None = None, fid_resize: str = "pil-bicubic",
               batch_size: int = 32, dtype: str = "float32") -> MetricSuite:
  """Loads every metric whose weights are given and present; records why the others are not.

  A path that exists but holds something unusable (wrong files, pickle weights, bad shapes)
  raises UserError: the user asked for that metric.
  """
  from imprint_jax.evaluation.metrics import convert  # JAX: see clip_embedder
  suite = MetricSuite(fid_resize=fid_resize)
  if clip and Path(clip).exists():
    suite.clip = clip_embedder(convert.load_clip(clip, dtype), batch_size)
  else:
    suite.skipped["clip"] = clip_missing_message(clip)
  if dino and Path(dino).exists():
    suite.dino = dino_embedder(convert.load_vit(dino, dtype), batch_size)
  else:
    suite.skipped["dino"] = dino_missing_message(dino)
  if inception and Path(inception).exists():
    suite.inception = inception_embedder(convert.load_inception(inception, dtype), fid_resize,
                                         batch_size)
  else:
    suite.skipped["fid"] = inception_missing_message(inception)
  if not dreamsim_dir:
    suite.skipped["dreamsim"] = DREAMSIM_SKIPPED + " DIR (no --dreamsim-dir given)"
  elif not Path(dreamsim_dir).is_dir():
    suite.skipped["dreamsim"] = (f"DreamSim weights not found at {dreamsim_dir}: run"
                                 " `dreamsim(pretrained=True, cache_dir=DIR)` once on a"
                                 " networked machine and pass --dreamsim-dir DIR")
  else:
    try:
      suite.dreamsim = DreamSim(dreamsim_dir)
    except ImportError:
      suite.skipped["dreamsim"] = DREAMSIM_SKIPPED + f" {dreamsim_dir}"
  return suite


__all__ = ["DREAMSIM_SKIPPED", "DreamSim", "Embedder", "MetricSuite", "apply", "clip_embedder",
           "clip_missing_message", "cosine_x100", "dino_embedder", "dino_missing_message", "fid",
           "inception_embedder", "inception_missing_message", "load_suite"]
