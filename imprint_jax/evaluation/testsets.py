"""The test sets of `imprint-jax evaluate` (IMPRINT Sec. 4.2-4.3): prepared records -> test
pairs under each test set's protocol (see `imprint_jax.evaluation.runner`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imprint_jax.data import augment, crops, masks
from imprint_jax.data.pipeline import decode_record, open_source
from imprint_jax.errors import UserError
from imprint_jax.evaluation.report import TESTSETS


@dataclasses.dataclass
class Pair:
  """One test pair, inputs and references (all uint8, target-crop pixels).

  object: (E, E, 3) the object given to the model, on white; also the identity reference.
  object_mask: (E, E, 1) 0/255.
  background: (G, G, 3) the image to composite into.
  region: (G, G) bool, the generation region.
  box: (x0, y0, x1, y1) the region's tight box, pixels, exclusive ends.
  real: (G, G, 3) the real image for FID, or None (DreamBooth).
  """
  pair_id: int
  object: np.ndarray
  object_mask: np.ndarray
  background: np.ndarray
  region: np.ndarray
  box: tuple[int, int, int, int]
  real: np.ndarray | None




# ------------------------------------------------------------------------------------- pairs

def check_kind(rec: dict[str, Any], testset: str) -> None:
  """UserError when a record does not belong to the test set's protocol."""
  kind, where = rec["kind"], f"pair_id {rec['pair_id']} ({rec.get('target_id', '?')})"
  if testset == "dreambooth" and kind != "test":
    raise UserError(f"{where}: a {kind!r} record; --testset dreambooth needs the records of"
                    " `imprint-jax prepare --source dreambooth` (kind 'test')")
  if testset == "pixabay" and kind == "test":
    raise UserError(f"{where}: a DreamBooth test record has no real composite; use"
                    " --testset dreambooth")


def make_pair(rec: dict[str, Any], testset: str, *, mask_level: int = 4, seed: int = 0) -> Pair:
  """A decoded record -> a test pair under the test set's protocol (see module docstring)."""
  pair_id, kind = int(rec["pair_id"]), rec["kind"]
  where = f"pair_id {pair_id} ({rec.get('target_id', '?')})"
  check_kind(rec, testset)
  if testset == "dreambooth":
    region = rec["target_mask"][..., 0] > 0  # the manifest's box
    obj, obj_mask, real = rec["object"], rec["object_mask"], None
  else:
    rng = np.random.default_rng([int(seed), pair_id])
    obj, obj_mask = rec["object"], rec["object_mask"]
    try:
      if kind == "image":
        obj, obj_mask = augment.augment_object(obj, obj_mask, augment.AugmentConfig().perturb(),
                                               rng)
      region = masks.coarse_mask(rec["target_mask"][..., 0], mask_level, rng)
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    real = rec["target"]
  box = crops.bbox(region)
  if box is None:
    raise UserError(f"{where}: empty target mask; re-run `imprint-jax prepare`")
  return Pair(pair_id, obj, obj_mask, rec["target"], region, box, real)


def open_pairs(root: str | os.PathLike, testset: str, split: str = "test",
               limit: int | None = None) -> tuple[Any, Any, int]:
  """(source, features, number of pairs to evaluate) of a prepared test set."""
  if testset not in TESTSETS:
    raise UserError(f"--testset {testset!r}: expected one of {', '.join(TESTSETS)}")
  if not Path(root).is_dir():
    raise UserError(f"--root {root}: no such folder (a test set written by `imprint-jax"
                    " prepare`)")
  source, features = open_source(str(root), split)
  n = len(source) if limit is None else min(int(limit), len(source))
  if n < 1:
    raise UserError(f"--root {root}: split {split!r} holds no pairs" if len(source) == 0
                    else f"--limit {limit}: must be >= 1")
  check_kind(decode_record(source[0], features), testset)
  return source, features, n


def check_one_per_image(source, features, n: int) -> None:
  """UserError when two of the first n records come from one image (the paper's Pixabay test
  set has one object per image)."""
  seen: dict[str, int] = {}
  for i in range(n):
    rec = decode_record(source[i], features)
    image = rec["target_id"].split("#")[0]
    if image in seen:
      raise UserError(f"{image}: pairs {seen[image]} and {rec['pair_id']} come from one image;"
                      " the Pixabay protocol takes one object per image: prepare the test set"
                      " with `--instances largest`, or pass --all-instances")
    seen[image] = int(rec["pair_id"])


def iter_batches(root, testset: str, *, split: str = "test", limit: int | None = None,
                 batch_size: int = 8, mask_level: int = 4, seed: int = 0
                 ) -> Iterator[list[Pair]]:
  """The first `limit` pairs (all by default) in record order, `batch_size` at a time."""
  source, features, n = open_pairs(root, testset, split, limit)
  return batches(source, features, range(n), testset, batch_size, mask_level, seed)


def batches(source, features, indices: Sequence[int], testset: str, batch_size: int,
            mask_level: int, seed: int) -> Iterator[list[Pair]]:
  """The pairs of records `indices` of `source`, `batch_size` at a time."""
  for start in range(0, len(indices), batch_size):
    yield [make_pair(decode_record(source[i], features), testset, mask_level=mask_level,
                     seed=seed) for i in indices[start:start + batch_size]]
