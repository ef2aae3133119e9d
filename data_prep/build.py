"""The resumable, parallel build of one split: work units (phase 1), then TFDS shards (phase 2).

See `prepare`'s module docstring for the protocol: unit files with done-markers, shards
written under `.prepare/<split>/final/` and published together, then the metadata and
`done.json`. Every file appears under its final name only once complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
import pickle
import shutil
import sys
from typing import Any

from array_record.python import array_record_module
import numpy as np

from imprint_jax.data import records, schema
from imprint_jax.data.schema import shard_name, shard_re
from imprint_jax.data_prep import pairs, shards
from imprint_jax.data_prep.config import PrepareConfig
from imprint_jax.data_prep.readers import READERS
from imprint_jax.data_prep.readers import common
from imprint_jax.errors import UserError
from imprint_jax.progress import bar as progress_bar

_SHARD_BYTES = 256 * 2**20  # target size of one final shard when --num-shards is 0

# Test hook: called in the driver process after each finished work unit as (split, unit).
_AFTER_UNIT: Callable[[str, int], None] | None = None


def _unit_paths(work: Path, index: int) -> tuple[Path, Path]:
  return work / f"unit-{index:05d}.ar", work / f"unit-{index:05d}.json"


def write_json(path: Path, data: Any) -> None:
  """Writes JSON atomically (temporary file + rename)."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  try:
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise UserError(f"{path}: writing failed ({e.strerror or e}); the partial file was"
                    " removed") from None


def read_json(path: Path) -> Any | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _unit_done(work: Path, index: int) -> dict | None:
  """The unit's marker if the unit is complete (marker present, file size matching)."""
  data_path, marker_path = _unit_paths(work, index)
  marker = read_json(marker_path)
  if marker is None or not data_path.exists() or data_path.stat().st_size != marker["bytes"]:
    return None
  return marker


def _unit_job(job: dict[str, Any]) -> dict[str, Any]:
  """Phase-1 work unit (module level so worker processes can run it)."""
  reader = READERS[job["source"]]
  cfg = PrepareConfig(**job["cfg"])
  root, work = Path(job["root"]), Path(job["work"])
  skipped: Counter = Counter()
  view_groups: list = []

  def payloads():
    for group in job["groups"]:
      for record in pairs.group_records(reader, root, group, cfg, skipped, view_groups):
        yield pickle.dumps(record, protocol=5)

  data_path, marker_path = _unit_paths(work, job["index"])
  count, size = records.write_array_record(data_path, payloads(), tmp_dir=work)
  marker = {"unit": job["index"], "groups": len(job["groups"]), "records": count,
            "bytes": size, "skipped": dict(sorted(skipped.items()))}
  if pairs.uses_views(reader, cfg):
    marker["views"] = view_groups
  write_json(marker_path, marker)
  return marker


# ---------------------------------------------------------------------------------------
# Phase 2: unit files -> numbered TFDS shards.


def _shard_job(job: dict[str, Any]) -> int:
  """Phase-2 job: unit-file segments -> one numbered TFDS shard (module level for workers)."""
  features = schema.features(job["encoder_size"], job["generator_size"])

  def payloads():
    pair_id = job["first_pair_id"]
    for path, start, stop in job["segments"]:
      reader = array_record_module.ArrayRecordReader(path)
      try:
        raws = reader.read(start, stop)
      finally:
        reader.close()
      for raw in raws:
        record = pickle.loads(raw)
        record["pair_id"] = pair_id
        pair_id += 1
        yield shards.serialize(record, features)

  count, _ = records.write_array_record(Path(job["path"]), payloads(), tmp_dir=job["tmp"])
  return count


class Runner:
  """Runs jobs in this process (workers=1) or in one spawn pool shared by all phases."""

  def __init__(self, workers: int, progress: bool):
    self.workers, self.progress = workers, progress
    self.pool: concurrent.futures.ProcessPoolExecutor | None = None

  def __enter__(self) -> "Runner":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)

  def run(self, fn, jobs: list, desc: str,
          after: Callable[[Any, Any], None] | None = None) -> None:
    """Runs fn(job) for every job with a tqdm bar on stderr; after(job, result) in order of
    completion."""
    bar = progress_bar(total=len(jobs), desc=desc, file=sys.stderr, disable=not self.progress,
               unit="unit", dynamic_ncols=True)
    try:
      if self.workers <= 1 or len(jobs) <= 1:
        for job in jobs:
          result = fn(job)
          bar.update()
          if after:
            after(job, result)
        return
      if self.pool is None:
        # spawn, not fork: the driver may hold threads (tfds, absl) that fork copies broken.
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"))
      futures = {self.pool.submit(fn, job): job for job in jobs}
      try:
        for future in concurrent.futures.as_completed(futures):
          result = future.result()
          bar.update()
          if after:
            after(futures[future], result)
      except BaseException:
        for future in futures:
          future.cancel()
        raise
    finally:
      bar.close()


def _fingerprint(reader, root: Path, split: str, groups: list[common.Group],
                 cfg: PrepareConfig) -> dict[str, Any]:
  keys = hashlib.sha256("\n".join(g.key for g in groups).encode()).hexdigest()
  return {"source": reader.NAME, "root": os.fspath(root.resolve()), "split": split,
          "config": dataclasses.asdict(cfg), "groups": len(groups), "group_keys": keys}


def build_split(reader, root: Path, out: Path, split: str, groups: list[common.Group],
                 cfg: PrepareConfig, runner: Runner, *, overwrite: bool) -> dict:
  work = out / shards.WORK_DIR / split
  fingerprint = _fingerprint(reader, root, split, groups, cfg)
  view_index = out / schema.VIEW_INDEX.format(split=split)
  if overwrite:
    shutil.rmtree(work, ignore_errors=True)
    for f in shards.split_shard_files(out, split):
      f.unlink()
    view_index.unlink(missing_ok=True)
  done = read_json(work / "done.json")
  if done is not None:
    if done["fingerprint"] != fingerprint:
      raise UserError(f"{out} already holds split {split!r} built with other settings or data; "
                      "pass --overwrite to rebuild it, or use another --out")
    if len(shards.split_shard_files(out, split)) == done["summary"]["shards"]:
      return done["summary"]  # finished earlier: nothing to do
  state = read_json(work / "state.json")
  if state is not None and state["fingerprint"] != fingerprint:
    raise UserError(f"{out} holds an unfinished build of split {split!r} with other settings or "
                    "data; pass --overwrite to start over, or use another --out")
  if state is None and shards.split_shard_files(out, split):
    raise UserError(f"{out} already holds shards of split {split!r} not made by this build; "
                    "pass --overwrite to replace them, or use another --out")
  work.mkdir(parents=True, exist_ok=True)
  write_json(work / "state.json", {"fingerprint": fingerprint})

  # Phase 1.
  units = [groups[i:i + cfg.groups_per_shard] for i in range(0, len(groups),
                                                               cfg.groups_per_shard)]
  base = {"source": reader.NAME, "root": os.fspath(root), "work": os.fspath(work),
          "cfg": dataclasses.asdict(cfg)}
  jobs = [dict(base, index=i, groups=u) for i, u in enumerate(units) if not _unit_done(work, i)]

  def after_unit(job, _):
    if _AFTER_UNIT is not None:
      _AFTER_UNIT(split, job["index"])

  runner.run(_unit_job, jobs, f"{reader.NAME}/{split} units", after_unit)
  markers = [_unit_done(work, i) for i in range(len(units))]
  if any(m is None for m in markers):
    raise RuntimeError(f"work units of {split} incomplete after phase 1: {work}")

  # Phase 2.
  lengths = [m["records"] for m in markers]
  total = sum(lengths)
  num_shards = cfg.num_shards or max(1, math.ceil(sum(m["bytes"] for m in markers)
                                                  / _SHARD_BYTES))
  if total == 0:
    num_shards = 0  # TFDS cannot read a split without examples: publish none
  final = work / "final"
  final.mkdir(exist_ok=True)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
  shard_jobs = []
  for k in range(num_shards):
    lo, hi = k * total // num_shards, (k + 1) * total // num_shards
    path = final / shard_name(split, k, num_shards)
    if path.exists():
      continue  # complete: shards only appear under their name once written
    segments = []
    for u in range(len(units)):
      a, b = max(lo, starts[u]), min(hi, starts[u + 1])
      if a < b:
        segments.append((os.fspath(_unit_paths(work, u)[0]), int(a - starts[u]),
                         int(b - starts[u])))
    shard_jobs.append({"path": os.fspath(path), "tmp": os.fspath(work), "segments": segments,
                       "first_pair_id": lo, "encoder_size": cfg.encoder_size,
                       "generator_size": cfg.generator_size})
  for stale in final.iterdir():
    if not stale.name.endswith(f"-of-{num_shards:05d}"):
      stale.unlink()
  runner.run(_shard_job, shard_jobs, f"{reader.NAME}/{split} shards")

  # Publish: the split's shards appear in <out> together, then metadata, then done.json.
  for old in shards.split_shard_files(out, split):
    old.unlink()
  view_index.unlink(missing_ok=True)
  if pairs.uses_views(reader, cfg):
    # Records are numbered in unit order, each unit's instances in order, views in frame order.
    groups_index, frame_index, start = [], [], 0
    for m in markers:
      for n, frames in m["views"]:
        groups_index.append([start, n])
        frame_index.extend(frames)
        start += n
    if start != total:
      raise RuntimeError(f"view index of {split} covers {start} records, the split has {total}")
    tmp = view_index.with_name(view_index.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"groups": groups_index, "frame_index": frame_index},
                              separators=(",", ":")) + "\n")
    os.replace(tmp, view_index)
  for k in range(num_shards):
    name = shard_name(split, k, num_shards)
    os.replace(final / name, out / name)
  if any(shard_re().match(p.name) for p in out.iterdir()):
    shards.write_metadata(out, encoder_size=cfg.encoder_size,
                          generator_size=cfg.generator_size)
  skipped: Counter = Counter()
  for m in markers:
    skipped.update(m["skipped"])
  summary = {"pairs": total, "groups": len(groups), "shards": num_shards,
             "skipped": dict(sorted(skipped.items()))}
  write_json(work / "done.json", {"fingerprint": fingerprint, "summary": summary})
  for i in range(len(units)):
    for p in _unit_paths(work, i):
      p.unlink(missing_ok=True)
  shutil.rmtree(final, ignore_errors=True)
  return summary
