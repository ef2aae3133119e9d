"""View datasets (`imprint-jax prepare --pairing views`): a fresh pair per visit.

A view dataset holds one record per valid view of each object and, per split, a view index
(`schema.VIEW_INDEX`). Training draws a new pair (i, j) of views of one object every time the
stream visits the object, within `data.window` frame positions, as the paper samples its
multi-view pairs during training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from imprint_jax.data import schema


class ViewPairs:
  """The objects of a view dataset's split that have an allowed pair, and the draw.

  An allowed pair is an ordered (i, j) of two views of one object, 1 <= |f_i - f_j| <= window
  (f: the views' frame positions). A draw picks one allowed pair of the object uniformly."""

  def __init__(self, index: Mapping[str, Any], window: int):
    frames = np.asarray(index["frame_index"], np.int64)
    self.window = int(window)
    self.starts, self.frames, self.counts = [], [], []
    for start, n in index["groups"]:
      f = frames[start:start + n]
      partners = self._partners(f)
      if partners.sum() > 0:
        self.starts.append(int(start))
        self.frames.append(f)
        self.counts.append(np.cumsum(partners))

  def _partners(self, f: np.ndarray) -> np.ndarray:
    """Per view: the number of other views within the window."""
    d = np.abs(f[:, None] - f[None, :])
    return ((d >= 1) & (d <= self.window)).sum(axis=1)

  def __len__(self) -> int:
    return len(self.starts)

  def draw(self, group: int, rng: np.random.Generator) -> tuple[int, int]:
    """(object record, target record) of a uniformly drawn allowed pair of `group`."""
    f, cum = self.frames[group], self.counts[group]
    r = int(rng.integers(cum[-1]))
    i = int(np.searchsorted(cum, r, side="right"))
    d = np.abs(f - f[i])
    partners = np.flatnonzero((d >= 1) & (d <= self.window))
    j = int(partners[r - (cum[i - 1] if i else 0)])
    return self.starts[group] + i, self.starts[group] + j


def view_pairs(data_dir: str, split: str, window: int) -> ViewPairs | None:
  """The ViewPairs of a view dataset's split; None for a dataset of fixed pairs."""
  index = schema.load_view_index(data_dir, split)
  return None if index is None else ViewPairs(index, window)


class DrawViewPair:
  """Visit index -> a pair record: the object of view i and the target of view j of one
  object, (i, j) drawn by `ViewPairs.draw` with grain's per-element generator (so the pair
  depends on the seed and the element's position in the stream: a new one every epoch, the
  same after a resume). pair_id = object record << 32 | target record."""

  def __init__(self, source, pairs: ViewPairs, decode: Callable[[Any], dict[str, Any]]):
    self.source, self.pairs, self.decode = source, pairs, decode

  def __call__(self, visit: int, rng: np.random.Generator) -> dict[str, Any]:
    i, j = self.pairs.draw(int(visit) % len(self.pairs), rng)
    a, b = self.decode(self.source[i]), self.decode(self.source[j])
    return {"object": a["object"], "object_mask": a["object_mask"], "target": b["target"],
            "target_mask": b["target_mask"], "box": b["box"], "source": b["source"],
            "kind": "multiview", "object_id": a["object_id"], "target_id": b["target_id"],
            "pair_id": np.int64((i << 32) | j)}

