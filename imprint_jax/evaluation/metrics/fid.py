"""Fréchet Inception Distance: image preprocessing, feature statistics, the distance.

Resize method (it moves FID by whole points, so it is stated with every score):
  * "pil-bicubic" (default, clean-fid's "clean" mode): each uint8 image is resized to
    299 x 299 with PIL's bicubic filter, which antialiases when shrinking; then [0, 255] ->
    [-1, 1]. The network's own bilinear resize is then the identity.
  * "torch-bilinear" (pytorch-fid's default): the image is scaled to [0, 1] and resized with
    PyTorch's bilinear interpolation (align_corners=False, no antialias), then mapped to
    [-1, 1]; aliasing when shrinking 512 -> 299 is what clean-fid corrects.

The distance d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) is computed in
float64. tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the
symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2), which avoids scipy's
non-symmetric `sqrtm` and its complex round-off: the result matches pytorch-fid's to
round-off, also for the rank-deficient covariances of small test sets.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imprint_jax.errors import UserError

FID_SIZE = 299
RESIZE_METHODS = ("pil-bicubic", "torch-bilinear")
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# pytorch-fid's weights are a pickle; this converts them once (torch.load of a plain state
# dict with weights_only=True runs no code).
CONVERT_INCEPTION = (
    "python -c \"import torch; from safetensors.torch import save_file; sd = torch.load("
    "'pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True); save_file("
    "{k: v.contiguous() for k, v in sd.items()}, 'pt_inception-2015-12-05-6726825d.safetensors')\"")


def inception_missing_message(path: str | os.PathLike | None) -> str:
  """The one line printed when the FID Inception weights are not there."""
  where = f"at {path}" if path else "(no --inception given)"
  return (f"FID Inception weights not found {where}: download {FID_WEIGHTS_URL}, convert it"
          f" once to safetensors with `{CONVERT_INCEPTION}` and pass --inception"
          " pt_inception-2015-12-05-6726825d.safetensors")


@functools.lru_cache(maxsize=16)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of PyTorch's 1-D bilinear resize (align_corners=False, no AA)."""
  scale = n_in / n_out
  src = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  m.setflags(write=False)
  return m


def preprocess(images: Sequence[np.ndarray], method: str = "pil-bicubic",
               size: int = FID_SIZE) -> np.ndarray:
  """uint8 (H, W, 3) images (sizes may differ) -> (B, size, size, 3) float32 in [-1, 1]."""
  if method not in RESIZE_METHODS:
    raise UserError(f"FID resize method {method!r}: expected one of {RESIZE_METHODS}")
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise UserError(f"FID input must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if method == "pil-bicubic":
      if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size),
                                                         Image.Resampling.BICUBIC))
      x = image.astype(np.float32) / np.float32(255.0)
    else:
      x = image.astype(np.float64) / 255.0
      h, w = image.shape[:2]
      if (h, w) != (size, size):
        x = (bilinear_matrix(h, size) @ x.reshape(h, -1)).reshape(size, w, 3)
        x = np.matmul(bilinear_matrix(w, size), x)  # batched over output rows
      x = x.astype(np.float32)
    out[i] = 2.0 * x - 1.0
  return out


def statistics(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and covariance (D, D) (unbiased, like np.cov) of N feature rows, float64."""
  f = np.asarray(features_ND, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise UserError(f"FID needs at least 2 images, got features of shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise UserError(f"FID statistics differ in shape: {mu1.shape}/{sigma1.shape} vs"
                    f" {mu2.shape}/{sigma2.shape}")
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two sets of (N, D) Inception features."""
  return frechet_distance(*statistics(features_a), *statistics(features_b))
