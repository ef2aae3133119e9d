"""Precomputed object tokens for stage 2: the folder `imprint-jax encode-objects` writes and
the stage-2 pipeline reads (`data.object_tokens`).

DINOv2 is frozen in stage 2, so the tokens of an object image depend on the image alone. The
tokens are computed once per pair (`imprint_jax.train.encode_objects`) and training runs the
adapter on them instead of running DINOv2 in every step. The object perturbation of stage 2
then happens at encoding time: every pair is stored in `variants` independent perturbations
and a training step picks one at random (see `pipeline.Stage2Transform`).

  <folder>/manifest.json     written last: format, encoder_size, variants, tokens (L),
                             width (D), dtype, seed, and per data source its folder and split
                             sizes. A folder without it is incomplete.
  <folder>/probe.npy         the encoder's (L, D) float32 tokens of `probe_image`: `train`
                             recomputes them with its own DINOv2 and refuses tokens that
                             another encoder made
  <folder>/source-00/train.array_record-00000-of-00002
                             one record per pair of data source 0's split, in the order of the
                             source's records: pair_id (int64, little endian), then the
                             (variants, L, D) float16 tokens; one file per encoding process
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from imprint_jax.data import records
from imprint_jax.errors import UserError

FORMAT = 1
DTYPE = np.dtype("<f2")
MANIFEST = "manifest.json"
PROBE = "probe.npy"


def probe_image(encoder_size: int) -> np.ndarray:
  """A fixed (1, E, E, 3) float32 input in the encoder's normalised space."""
  return np.random.default_rng(20240617).standard_normal((1, encoder_size, encoder_size, 3),
                                                         dtype=np.float32)


def source_dir(folder: str | os.PathLike, index: int) -> Path:
  return Path(folder) / f"source-{index:02d}"


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}.array_record-{index:05d}-of-{count:05d}"


def shard_files(folder: str | os.PathLike, index: int, split: str) -> list[str]:
  """The token files of source `index`'s split, in order (one per encoding process)."""
  d = source_dir(folder, index)
  pattern = re.compile(rf"^{re.escape(split)}\.array_record-(\d{{5}})-of-(\d{{5}})$")
  found = sorted(p.name for p in d.iterdir() if pattern.match(p.name)) if d.is_dir() else []
  counts = {pattern.match(n).group(2) for n in found}
  if not found or len(counts) != 1 or len(found) != int(counts.pop()):
    raise UserError(f"{d}: the {split!r} token files are missing or incomplete ({len(found)}"
                    " found); rerun `imprint-jax encode-objects`")
  return [os.fspath(d / n) for n in found]


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
  path = Path(folder) / MANIFEST
  if not path.is_file():
    raise UserError(f"data.object_tokens {folder}: no {MANIFEST} (not an `imprint-jax"
                    " encode-objects` folder, or the encoding did not finish)")
  try:
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
      raise UserError(f"{path}: format {m.get('format')!r}, this version reads {FORMAT}")
    m["shape"] = (int(m["variants"]), int(m["tokens"]), int(m["width"]))
    return m
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: corrupt manifest ({e})") from None


def write_manifest(folder: str | os.PathLike, *, encoder_size: int, variants: int,
                   tokens: int, width: int, **info: Any) -> Path:
  """Writes `folder`/manifest.json (atomically); `info`: seed, sources, ... (JSON-able)."""
  manifest = {"format": FORMAT, "encoder_size": encoder_size, "variants": variants,
              "tokens": tokens, "width": width, "dtype": DTYPE.name, **info}
  path = Path(folder) / MANIFEST
  tmp = path.with_name(MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2) + "\n")
  tmp.replace(path)
  return path


def encode_record(pair_id: int, tokens_KLD: np.ndarray) -> bytes:
  return np.int64(pair_id).astype("<i8").tobytes() + np.asarray(tokens_KLD, DTYPE).tobytes()


def decode_record(payload: bytes, shape: tuple[int, int, int]) -> tuple[int, np.ndarray]:
  """A token record -> (pair_id, (variants, L, D) float16)."""
  expected = 8 + int(np.prod(shape)) * DTYPE.itemsize
  if len(payload) != expected:
    raise UserError(f"token record of {len(payload)} bytes, expected {expected} for"
                    f" {shape}: corrupt or from another encoder")
  pair_id = int(np.frombuffer(payload[:8], "<i8")[0])
  return pair_id, np.frombuffer(payload[8:], DTYPE).reshape(shape)


def check_sources(manifest: dict[str, Any], sources, split_sizes) -> None:
  """The run's data sources must be the ones encoded, in the same order and sizes.

  Args:
    manifest: `load_manifest`'s result.
    sources: the run's (folder, weight) pairs.
    split_sizes: folder -> {split: records} (`data_prep.shards.split_sizes`).
  """
  encoded = manifest["sources"]
  if len(encoded) != len(sources):
    raise UserError(f"object tokens were encoded for {len(encoded)} data sources, the run has"
                    f" {len(sources)}; rerun `imprint-jax encode-objects` with this config")
  for i, ((folder, _), entry) in enumerate(zip(sources, encoded)):
    if Path(folder).resolve() != Path(entry["path"]).resolve():
      raise UserError(f"data source {i} is {folder} but its object tokens were encoded from"
                      f" {entry['path']}; rerun `imprint-jax encode-objects` with this config")
    sizes = split_sizes(folder)
    for split, n in entry["splits"].items():
      if sizes.get(split) != n:
        raise UserError(f"data source {folder}: split {split!r} has {sizes.get(split)} pairs,"
                        f" its object tokens {n}; the data changed since encoding")


class TokenSource:
  """Random access to one source's token records of one split, aligned with its pair records.

  Picklable (grain workers reopen the files)."""

  def __init__(self, folder: str, index: int, data_dir: str, split: str):
    import grain
    manifest = load_manifest(folder)
    if index >= len(manifest["sources"]):
      raise UserError(f"{folder}: no object tokens for data source {index} ({data_dir})")
    self.shape = manifest["shape"]
    self.where = f"{source_dir(folder, index)} ({split})"
    files = shard_files(folder, index, split)
    self._source = records.Checked(grain.sources.ArrayRecordDataSource(files), files,
                                   records.array_record_lengths(files))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> bytes:
    return self._source[i]

  def zip(self, records) -> "_Zipped":
    """The pairs' source with each item paired with its token record."""
    if len(records) != len(self):
      raise UserError(f"{self.where}: {len(self)} token records for {len(records)} pairs;"
                      " the data changed since encoding")
    return _Zipped(records, self)

  def decode(self, payload: bytes, pair_id: int) -> np.ndarray:
    got, tokens = decode_record(payload, self.shape)
    if got != int(pair_id):
      raise UserError(f"{self.where}: token record of pair {got} where pair {pair_id} was"
                      " expected; the data changed since encoding")
    return tokens


class _Zipped:
  def __init__(self, a, b):
    self.a, self.b = a, b

  def __len__(self) -> int:
    return len(self.a)

  def __getitem__(self, i):
    return self.a[i], self.b[i]
