"""A prepared dataset folder, and the one way to open one.

`imprint-jax prepare` (`data_prep`) writes the folder; every reader (the training pipelines,
`encode-objects`/`encode-latents`, evaluation, the demo) opens it through this module. A folder
holds the shards of one or more splits plus the TFDS metadata:

  <dir>/imprint_pairs-train.array_record-00000-of-00004   ...
  <dir>/imprint_pairs-val.array_record-00000-of-00001
  <dir>/dataset_info.json, <dir>/features.json
  <dir>/views-<split>.json    view datasets only (`schema.VIEW_INDEX`)

Each ArrayRecord entry is one pair record (`schema`) encoded by `schema.features(E, G)` into a
`tf.train.Example` proto; images are PNG bytes. Shards use TFDS' naming and `group_size:1`, so
random access is cheap. Two ways read it, neither needing TensorFlow:

  # 1. TFDS: a random-access data source, examples decoded to numpy.
  source = tfds.builder_from_directory(dir).as_data_source(split="train")
  # 2. grain: raw bytes from the shard files, decoded with the same FeaturesDict.
  ds = grain.sources.ArrayRecordDataSource(prepared.shard_paths(dir, "train"))
  example = prepared.load_features(dir).deserialize_example_np(ds[0])

`open_source` gives either (`reader="grain"` or `"tfds"`) and `decode_record` turns its items
into the same dicts. Text fields come back as `bytes` from both routes, as `str` from
`decode_record`.

A run config's data source is a folder, or `synthetic:<layout>` (tiny configs): a small
synthetic dataset in that published layout, which the caller of a run prepares
(`imprint_jax.data_prep.sources.prepare_sources`; `imprint-jax train` and `encode-*` do) into
`synthetic_folder(...)`, where the trainer then opens it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import grain
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_sources

from imprint_jax.data import records
from imprint_jax.data.schema import INFO_FILE, shard_name
from imprint_jax.errors import UserError

READERS = ("grain", "tfds")
SYNTHETIC = "synthetic:"
# A workdir given as a URL (gs://...), as `imprint_jax.storage.is_remote` tells them apart. Not
# that module itself: data preparation reads this one and needs none of storage's checkpointing.
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_prepared(data_dir) -> bool:
  """Whether `data_dir` holds a prepared dataset (its metadata is written last)."""
  return (Path(os.fspath(data_dir)) / INFO_FILE).is_file()


def require(data_dir, what: str = "data source") -> str:
  """`data_dir` as a string, or one UserError line when it is not a prepared dataset."""
  if not is_prepared(data_dir):
    raise UserError(f"{what} {data_dir}: not a prepared dataset (no {INFO_FILE}); run"
                    " `imprint-jax prepare` first")
  return os.fspath(data_dir)


def synthetic_folder(layout: str, workdir, *, seed: int, encoder_size: int,
                     generator_size: int) -> Path:
  """Where a run in `workdir` finds its `synthetic:<layout>` source once prepared.

  `<workdir>/data/<layout>` (absolute); with a remote (gs://) workdir a local folder named
  after the settings that shape the data, so a resumed run finds the same pairs (prepare
  writes local files, not a bucket's).
  """
  text = os.fspath(workdir)
  if not _URL.match(text):
    return Path(os.path.abspath(os.path.expanduser(text))) / "data" / layout
  name = f"{layout}-seed{seed}-e{encoder_size}-g{generator_size}"
  return Path(tempfile.gettempdir()) / "imprint-jax-synthetic" / name


def builder(data_dir: str):
  """The TFDS builder of a prepared dataset (metadata, features, splits)."""
  if not is_prepared(data_dir):
    raise UserError(f"{data_dir}: no {INFO_FILE} - not a prepared dataset; run "
                    "`imprint-jax prepare` or fix DataConfig.sources")
  return tfds.builder_from_directory(data_dir)


def open_source(data_dir: str, split: str, reader: str = "grain") -> tuple[Any, Any]:
  """A random-access source of one split, and the dataset's FeaturesDict.

  Args:
    data_dir: a prepared dataset folder.
    split: split name.
    reader: "grain" -> items are serialized bytes (a read failing riegeli's checksum raises
      `records.CorruptRecord` naming shard and record); "tfds" -> items are decoded dicts.

  Returns:
    (source supporting len() and [i], features); pass items to `decode_record`.
  """
  if reader not in READERS:
    raise UserError(f"DataConfig.reader={reader!r}: expected one of {READERS}")
  b = builder(data_dir)
  if split not in b.info.splits:
    raise UserError(f"{data_dir}: no split {split!r} (has {sorted(b.info.splits)}); "
                    "fix DataConfig.split")
  if reader == "tfds":
    return b.as_data_source(split=split), b.info.features
  instructions = tfds_sources.file_instructions(b.info, split)
  lengths = [i.take if i.take >= 0 else i.examples_in_shard - i.skip for i in instructions]
  return (records.Checked(grain.sources.ArrayRecordDataSource(instructions),
                          [i.filename for i in instructions], lengths),
          b.info.features)


def decode_record(item: Any, features: Any) -> dict[str, Any]:
  """A record from either reader as a dict of numpy arrays (text fields as str).

  Args:
    item: serialized bytes (grain reader) or an already decoded dict (tfds reader).
    features: the dataset's FeaturesDict (`open_source`'s second result).

  Returns:
    {"object": (E, E, 3) u8, "object_mask": (E, E, 1) u8, "target": (G, G, 3) u8,
     "target_mask": (G, G, 1) u8, "box": (4,) f32, "pair_id": int64, text fields: str}.
  """
  if isinstance(item, (bytes, bytearray, memoryview)):
    item = features.deserialize_example_np(bytes(item))
  return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in item.items()}


def shard_paths(data_dir, split: str) -> list[str]:
  """The shard file paths of `split` in order, as listed in the dataset's metadata."""
  info_path = Path(data_dir) / INFO_FILE
  if not info_path.exists():
    raise FileNotFoundError(f"{info_path} not found: {data_dir} is not a prepared dataset")
  info = json.loads(info_path.read_text())
  name = info["name"]
  for s in info.get("splits", []):
    if s["name"] == split:
      k = len(s["shardLengths"])
      return [os.fspath(Path(data_dir) / shard_name(split, i, k, name)) for i in range(k)]
  raise KeyError(f"split {split!r} not in {info_path} "
                 f"(has {[s['name'] for s in info.get('splits', [])]})")


def load_features(data_dir):
  """The FeaturesDict stored with the dataset (`features.json`), for deserializing records."""
  return tfds.features.FeatureConnector.from_config(os.fspath(data_dir))


def split_sizes(data_dir) -> dict[str, int]:
  """Number of records in each split of a prepared dataset, from its metadata."""
  info = json.loads((Path(data_dir) / INFO_FILE).read_text())
  return {s["name"]: sum(int(x) for x in s["shardLengths"]) for s in info.get("splits", [])}


def sizes(data_dir) -> tuple[int, int]:
  """(encoder_size, generator_size) of a prepared dataset, from its features."""
  features = load_features(data_dir)
  return int(features["object"].shape[0]), int(features["target"].shape[0])
