"""`imprint-jax prepare`: published dataset layouts -> pair shards (TFDS ArrayRecord).

  imprint-jax prepare --source youtube_vos --root /data/youtube-vos --out /data/pairs/ytvos \
      --workers 32 --seed 0

How a build runs (all of it is deterministic for a seed, whatever --workers is):

1. The reader lists the groups (videos, objects, photo groups, images, subjects) of --root.
   Groups are ordered by a hash of (seed, source, key); the first round(n * val_fraction)
   (at least one when val_fraction > 0 and n >= 2) form "val", the rest "train", so every
   pair of a group lands in one split (no leakage between frames of one video).
   DreamBooth (and --split test) puts every group in "test". (`assign_splits`, here.)
2. Phase 1 (`build`, `pairs`), parallel over --workers processes: groups are cut into work units of
   --groups-per-shard groups. A unit validates every annotated frame (skips counted by
   reason), samples its pairs with the group's own random generator, crops and PNG-encodes
   them, and writes `<out>/.prepare/<split>/unit-NNNNN.ar` (temporary name, then renamed)
   followed by a `unit-NNNNN.json` done-marker holding its record count, byte size and skips.
   A unit counts as done only when its marker exists and the file size matches, so a rerun
   after an interruption redoes exactly the units that were not finished.
3. Phase 2 (`build`): the units' records are concatenated in unit order, numbered (pair_id =
   index in the split) and dealt into --num-shards TFDS shards (0 = one per ~256 MiB), written
   under `.prepare/<split>/final/` and moved into <out> only when all are complete; then the TFDS
   metadata is (re)written for every split in <out>, `done.json` records the split's
   fingerprint and the unit files are deleted.
4. `<out>/prepare_summary.json` (also printed): pairs per split and source, and the skipped
   files/views by reason.

A rerun with the same settings skips finished splits and units. A rerun with different
settings (or a different dataset) into the same --out is refused unless --overwrite.
"""

from __future__ import annotations

from collections import Counter
import dataclasses
import os
from pathlib import Path
from typing import Any

from imprint_jax.data_prep import build, pairs, shards
from imprint_jax.data_prep.config import PrepareConfig
from imprint_jax.data_prep.readers import READERS
from imprint_jax.data_prep.readers import common
from imprint_jax.errors import UserError

SPLITS = ("train", "val", "test", "all")
SUMMARY_FILE = "prepare_summary.json"


def prepare(source: str, root, out, cfg: PrepareConfig = PrepareConfig(), *,
            split: str = "all", workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
  """Builds the pair shards of one source; returns the summary (also written as JSON).

  Args:
    source: a reader name (`READERS`).
    root: dataset folder in that reader's layout.
    out: output folder (a TFDS dataset folder once done).
    cfg: crop sizes, filters, sampling and seed.
    split: "train", "val", "test" (every group) or "all" (train + val; test for dreambooth).
    workers: worker processes; 1 runs everything in this process.
    overwrite: discard earlier output of these splits instead of refusing a changed build.
    progress: show tqdm bars on stderr.
  """
  if source not in READERS:
    raise UserError(f"--source {source!r} is unknown: choose one of {', '.join(READERS)}")
  if split not in SPLITS:
    raise UserError(f"--split {split!r} is unknown: choose one of {', '.join(SPLITS)}")
  cfg.validate()
  reader = READERS[source]
  root = Path(root)
  if not root.is_dir():
    raise UserError(f"--root {root} does not exist or is not a folder")
  root = reader.resolve_root(root)
  out = Path(out)
  groups, scan_skipped = reader.list_groups(root)
  if not groups:
    raise UserError(f"--root {root}: no {source} groups (videos/objects/images) found")
  plan = assign_splits(source, groups, cfg, split)
  out.mkdir(parents=True, exist_ok=True)
  for other in sorted((out / shards.WORK_DIR).glob("*/done.json")):
    other_cfg = (build.read_json(other) or {}).get("fingerprint", {}).get("config", {})
    sizes = (other_cfg.get("encoder_size"), other_cfg.get("generator_size"))
    if other.parent.name not in plan and sizes != (cfg.encoder_size, cfg.generator_size):
      raise UserError(f"{out} holds split {other.parent.name!r} with sizes E, G = {sizes}; one "
                      "dataset folder has one feature spec: use the same --encoder-size and "
                      "--generator-size, or another --out")
  with build.Runner(workers, progress) as runner:
    for name, split_groups in plan.items():
      build.build_split(reader, root, out, name, split_groups, cfg, runner, overwrite=overwrite)
  return _write_summary(out, source, root, cfg, scan_skipped)


def assign_splits(source: str, groups: list[common.Group], cfg: PrepareConfig,
                  split: str = "all") -> dict[str, list[common.Group]]:
  """Which groups go to which split, each list in build order (hash order for the seed).

  Returns {split name: groups}; splits without groups are left out.
  """
  order = sorted(groups, key=lambda g: (pairs.group_hash(cfg.seed, source, g.key), g.key))
  if READERS[source].KIND == "test" or split == "test":
    if split in ("train", "val"):
      raise UserError(f"--source {source} makes test pairs only: use --split test (or all)")
    return {"test": order} if order else {}
  n = len(order)
  n_val = int(round(n * cfg.val_fraction))
  if cfg.val_fraction > 0 and n >= 2:
    n_val = min(max(n_val, 1), n - 1)
  plan = {"train": order[n_val:], "val": order[:n_val]}
  wanted = ("train", "val") if split == "all" else (split,)
  return {k: v for k, v in plan.items() if k in wanted and v}


def _write_summary(out: Path, source: str, root: Path, cfg: PrepareConfig,
                   scan_skipped: dict[str, int]) -> dict[str, Any]:
  """Summary of every finished split in `out` (this run's and earlier ones)."""
  splits = {}
  work = out / shards.WORK_DIR
  if work.is_dir():
    for d in sorted(work.iterdir()):
      done = build.read_json(d / "done.json")
      if done is not None:
        splits[d.name] = dict(done["summary"], source=done["fingerprint"]["source"])
  skipped: Counter = Counter(scan_skipped)
  pairs: Counter = Counter()
  for s in splits.values():
    skipped.update(s["skipped"])
    pairs[s["source"]] += s["pairs"]
  summary = {"source": source, "root": os.fspath(root), "out": os.fspath(out),
             "config": dataclasses.asdict(cfg), "splits": splits,
             "pairs_written": dict(sorted(pairs.items())),
             "skipped": dict(sorted(skipped.items()))}
  build.write_json(out / SUMMARY_FILE, summary)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines of a `prepare` summary."""
  parts = [f"{name} {s['pairs']} pairs ({s['groups']} groups, {s['shards']} shards)"
           for name, s in summary["splits"].items()]
  skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
  return (f"prepare {summary['source']}: {'; '.join(parts) or 'no pairs'}\n"
          f"skipped: {skipped}\n"
          f"summary: {Path(summary['out']) / SUMMARY_FILE}")
