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

The layout (manifest last, probe, per-source record files aligned with the pair records) and
the code that reads and checks it (`read_manifest`, `pack_record`, `RecordSource`,
`check_sources`) are shared with the VAE latents of `imprint_jax.data.latent_store`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import grain
import numpy as np

from imprint_jax.data import prepared, records
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


def shard_files(folder: str | os.PathLike, index: int, split: str,
                command: str = "encode-objects") -> list[str]:
  """The record files of source `index`'s split, in order (one per encoding process)."""
  d = source_dir(folder, index)
  pattern = re.compile(rf"^{re.escape(split)}\.array_record-(\d{{5}})-of-(\d{{5}})$")
  found = sorted(p.name for p in d.iterdir() if pattern.match(p.name)) if d.is_dir() else []
  counts = {pattern.match(n).group(2) for n in found}
  if not found or len(counts) != 1 or len(found) != int(counts.pop()):
    raise UserError(f"{d}: the {split!r} record files are missing or incomplete ({len(found)}"
                    f" found); rerun `imprint-jax {command}`")
  return [os.fspath(d / n) for n in found]


def read_manifest(folder: str | os.PathLike, fmt: int, key: str, command: str,
                  derive=lambda m: None) -> dict[str, Any]:
  """`folder`/manifest.json of a store written by `imprint-jax COMMAND`, read by config `key`,
  checked to be format `fmt`; `derive(manifest)` adds derived entries (KeyError etc. mean a
  corrupt manifest)."""
  path = Path(folder) / MANIFEST
  if not path.is_file():
    raise UserError(f"{key} {folder}: no {MANIFEST} (not an `imprint-jax {command}` folder,"
                    " or the encoding did not finish)")
  try:
    m = json.loads(path.read_text())
    if m.get("format") != fmt:
      raise UserError(f"{path}: format {m.get('format')!r}, this version reads {fmt}")
    derive(m)
    return m
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: corrupt manifest ({e})") from None


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
  def derive(m):
    m["shape"] = (int(m["variants"]), int(m["tokens"]), int(m["width"]))
  return read_manifest(folder, FORMAT, "data.object_tokens", "encode-objects", derive)


def write_manifest(folder: str | os.PathLike, *, encoder_size: int, variants: int,
                   tokens: int, width: int, **info: Any) -> Path:
  """Writes `folder`/manifest.json (atomically); `info`: seed, sources, ... (JSON-able)."""
  return write_json_manifest(folder, {"format": FORMAT, "encoder_size": encoder_size,
                                      "variants": variants, "tokens": tokens, "width": width,
                                      "dtype": DTYPE.name, **info})


def write_json_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
  """Writes `folder`/manifest.json atomically (a store's last file)."""
  path = Path(folder) / MANIFEST
  tmp = path.with_name(MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2) + "\n")
  tmp.replace(path)
  return path


def pack_record(pair_id: int, arrays) -> bytes:
  """pair_id (int64, little endian) followed by the raw bytes of each array, in order."""
  return np.int64(pair_id).astype("<i8").tobytes() + b"".join(
      np.ascontiguousarray(a).tobytes() for a in arrays)


def unpack_record(payload: bytes, fields) -> tuple[int, list[np.ndarray]]:
  """`pack_record`'s bytes -> (pair_id, arrays); fields: one (shape, dtype) per array."""
  sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in fields]
  if len(payload) != 8 + sum(sizes):
    raise UserError(f"record of {len(payload)} bytes, expected {8 + sum(sizes)} for"
                    f" {[tuple(f[0]) for f in fields]}: corrupt or from another encoder")
  pair_id = int(np.frombuffer(payload[:8], "<i8")[0])
  arrays, at = [], 8
  for (shape, dtype), size in zip(fields, sizes):
    arrays.append(np.frombuffer(payload[at:at + size], dtype).reshape(shape))
    at += size
  return pair_id, arrays


def encode_record(pair_id: int, tokens_KLD: np.ndarray) -> bytes:
  return pack_record(pair_id, [np.asarray(tokens_KLD, DTYPE)])


def decode_record(payload: bytes, shape: tuple[int, int, int]) -> tuple[int, np.ndarray]:
  """A token record -> (pair_id, (variants, L, D) float16)."""
  pair_id, (tokens,) = unpack_record(payload, [(shape, DTYPE)])
  return pair_id, tokens


def check_sources(manifest: dict[str, Any], sources, what: str = "object tokens",
                  command: str = "encode-objects") -> None:
  """The run's data sources must be the ones encoded, in the same order and sizes.

  Args:
    manifest: `load_manifest`'s result (or another store's manifest with "sources").
    sources: the run's (folder, weight) pairs.
    what, command: the store's contents and the command that writes it (for errors).
  """
  encoded = manifest["sources"]
  if len(encoded) != len(sources):
    raise UserError(f"{what} were encoded for {len(encoded)} data sources, the run has"
                    f" {len(sources)}; rerun `imprint-jax {command}` with this config")
  for i, ((folder, _), entry) in enumerate(zip(sources, encoded)):
    if Path(folder).resolve() != Path(entry["path"]).resolve():
      raise UserError(f"data source {i} is {folder} but its {what} were encoded from"
                      f" {entry['path']}; rerun `imprint-jax {command}` with this config")
    sizes = prepared.split_sizes(folder)
    for split, n in entry["splits"].items():
      if sizes.get(split) != n:
        raise UserError(f"data source {folder}: split {split!r} has {sizes.get(split)} pairs,"
                        f" its {what} {n}; the data changed since encoding")


class RecordSource:
  """Random access to one source's records of one split in a store (one record per pair, in
  the order of the source's pair records), aligned with those pair records.

  Picklable (grain workers reopen the files)."""
  what = "records"
  command = "encode-objects"

  def __init__(self, folder: str, manifest: dict[str, Any], index: int, data_dir: str,
               split: str):
    if index >= len(manifest["sources"]):
      raise UserError(f"{folder}: no {self.what} for data source {index} ({data_dir})")
    self.where = f"{source_dir(folder, index)} ({split})"
    files = shard_files(folder, index, split, self.command)
    self._source = records.Checked(grain.sources.ArrayRecordDataSource(files), files,
                                   records.array_record_lengths(files))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> bytes:
    return self._source[i]

  def zip(self, records) -> "_Zipped":
    """The pairs' source with each item paired with its record in this store."""
    if len(records) != len(self):
      raise UserError(f"{self.where}: {len(self)} records for {len(records)} pairs;"
                      " the data changed since encoding")
    return _Zipped(records, self)

  def unpack(self, payload: bytes, pair_id: int, fields) -> list[np.ndarray]:
    """The arrays of the record of pair `pair_id` (refused if it is another pair's)."""
    got, arrays = unpack_record(payload, fields)
    if got != int(pair_id):
      raise UserError(f"{self.where}: record of pair {got} where pair {pair_id} was"
                      " expected; the data changed since encoding")
    return arrays


class TokenSource(RecordSource):
  """One source's token records of one split: `decode` gives (variants, L, D) float16."""
  what = "object tokens"

  def __init__(self, folder: str, index: int, data_dir: str, split: str):
    manifest = load_manifest(folder)
    super().__init__(folder, manifest, index, data_dir, split)
    self.shape = manifest["shape"]

  def decode(self, payload: bytes, pair_id: int) -> np.ndarray:
    return self.unpack(payload, pair_id, [(self.shape, DTYPE)])[0]


class _Zipped:
  def __init__(self, a, b):
    self.a, self.b = a, b

  def __len__(self) -> int:
    return len(self.a)

  def __getitem__(self, i):
    return self.a[i], self.b[i]
