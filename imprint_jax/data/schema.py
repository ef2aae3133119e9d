"""The pair record: what `imprint-jax prepare` writes and the grain pipelines read.

One record is one training (or test) pair, already cropped and resized, so that the input
pipeline only decodes, augments and batches. Images are PNG-encoded uint8 in the shards.

  object        (E, E, 3) uint8  the segmented object: background removed (filled with
                                 OBJECT_FILL), padded to a square around its box, resized to
                                 the encoder size E (224 by default)
  object_mask   (E, E, 1) uint8  the object's mask in that crop, 0 or 255
  target        (G, G, 3) uint8  the target crop around the object, with its real background,
                                 at the generator resolution G (512 by default)
  target_mask   (G, G, 1) uint8  the precise object mask in the target crop, 0 or 255
  box           (4,) float32     the object's box in the target crop, (x0, y0, x1, y1) in
                                 [0, 1] (fractions of the crop width and height)
  source        text             the reader that made it: mvimgnet, youtube_vos, vipseg,
                                 ppr10k, images, dreambooth
  kind          text             multiview (stage 1), video (stage 2, object from another
                                 frame), image (stage 2, pair made by augmentation at training
                                 time), test (DreamBooth test pair: target is the background),
                                 view (one view of a multi-view object: object and target crop
                                 of the same frame; the pipeline pairs views at training time,
                                 see below)
  object_id     text             provenance of the object: '<dataset path>#<instance>'
  target_id     text             provenance of the target: '<dataset path>#<instance>'
  pair_id       int64            index of the pair in its split, stable for a seed

View datasets (`imprint-jax prepare --pairing views`, the default for multi-view sources) hold
one "view" record per valid view and, per split, `views-<split>.json` (`VIEW_INDEX`): {"groups":
[[first record, number of records], ...] (one entry per object, its views in frame order),
"frame_index": [frame position of each record]}. The pipeline draws a fresh view pair (i, j)
from one group every time it visits it (`imprint_jax.data.views`).

The files of a prepared dataset folder are named here too (`shard_name`, `INFO_FILE`,
`VIEW_INDEX`); `imprint_jax.data.prepared` opens one, `imprint_jax.data_prep` writes one.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

OBJECT_FILL = 255  # white background behind segmented objects (ObjectStitch, AnyDoor)

IMAGE_KEYS = ("object", "object_mask", "target", "target_mask")
KINDS = ("multiview", "video", "image", "test", "view")
VIEW_INDEX = "views-{split}.json"
DATASET_NAME = "imprint_pairs"
INFO_FILE = "dataset_info.json"


def shard_re(name: str = DATASET_NAME) -> re.Pattern:
  """Matches final shard file names; groups: split, index, count."""
  return re.compile(rf"^{re.escape(name)}-(?P<split>\w+)\.array_record-(?P<index>\d{{5}})"
                    rf"-of-(?P<count>\d{{5}})$")


def shard_name(split: str, index: int, num_shards: int, name: str = DATASET_NAME) -> str:
  """TFDS' file name of one shard: `<name>-<split>.array_record-00000-of-00004`."""
  return f"{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


def load_view_index(data_dir, split: str) -> dict | None:
  """The view index of a view dataset's split (see the module docstring), or None when the
  dataset holds fixed pairs."""
  path = os.path.join(os.fspath(data_dir), VIEW_INDEX.format(split=split))
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def features(encoder_size: int = 224, generator_size: int = 512):
  """The TFDS FeaturesDict of a pair record (TensorFlow is not needed to use it)."""
  # Here, not at the head: tensorflow_datasets takes ~0.7 s to import, and compositing reads
  # only this module's constants.
  import tensorflow_datasets as tfds
  E, G = encoder_size, generator_size
  return tfds.features.FeaturesDict({
      "object": tfds.features.Image(shape=(E, E, 3), encoding_format="png"),
      "object_mask": tfds.features.Image(shape=(E, E, 1), encoding_format="png"),
      "target": tfds.features.Image(shape=(G, G, 3), encoding_format="png"),
      "target_mask": tfds.features.Image(shape=(G, G, 1), encoding_format="png"),
      "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "source": tfds.features.Text(),
      "kind": tfds.features.Text(),
      "object_id": tfds.features.Text(),
      "target_id": tfds.features.Text(),
      "pair_id": tfds.features.Scalar(dtype=np.int64),
  })
