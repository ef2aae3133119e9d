"""Input-pipeline throughput: stage-2 pairs/s per host against what a training step consumes.

  .venv/bin/python benchmarks/data_throughput.py                     # synthetic 224/512 data
  .venv/bin/python benchmarks/data_throughput.py --data /data/pairs  # a prepared dataset

Without --data it writes a synthetic dataset (procedural photo-like images, two sources:
'image' pairs that get the full perturbation and 'video' pairs, mixed 0.56 : 0.44 like the
paper's stage-2 set) with imprint_jax.data_prep.shards.write_dataset into a temporary folder. It then
times the full stage-2 pipeline (read, decode, augment, mask, batch, normalise) in-process and
with 1 and 2 grain workers, times each step on its own, and prints one table next to the rate
a training step needs: by default the MLPerf SD anchor, ~87 img/s per v5p chip, times the
chips per host (4 on v5p) = 348 pairs/s per host. Divide that by the per-worker rate to size
`DataConfig.num_workers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import logging as absl_logging
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imprint_jax.data import augment, masks, pipeline, prepared, schema  # noqa: E402
from imprint_jax.data_prep import shards  # noqa: E402

MLPERF_SD_V5P_IMGS_PER_CHIP = 87.0  # MLPerf Training SD v2, 512^2, v5p at 8 chips


def _photo(size: int, rng: np.random.Generator) -> np.ndarray:
  """A photo-like uint8 (size, size, 3) image: smooth colour fields plus sensor noise (the
  noise keeps PNGs about as large, and as slow to decode, as real photos)."""
  small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC),
                   np.int16)
  img = img + rng.integers(-6, 7, img.shape, dtype=np.int16)
  return np.clip(img, 0, 255).astype(np.uint8)


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
  yy, xx = np.mgrid[:size, :size]
  t = np.arctan2(yy - size / 2, xx - size / 2)
  r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
  radius = rng.uniform(0.4, 0.8) * (1 + 0.15 * np.sin(rng.integers(2, 6) * t + rng.uniform(0, 6)))
  return r < radius


def synthetic_records(n: int, kind: str, encoder_size: int, generator_size: int, seed: int):
  rng = np.random.default_rng(seed)
  for i in range(n):
    tgt = _photo(generator_size, rng)
    # The object sits in the target at a random scale; its crop is the object on white.
    side = int(generator_size * rng.uniform(0.3, 0.7))
    y0, x0 = rng.integers(0, generator_size - side, 2)
    shape = _blob(side, rng)
    tm = np.zeros((generator_size, generator_size), bool)
    tm[y0:y0 + side, x0:x0 + side] = shape
    om = _blob(encoder_size, np.random.default_rng(rng.integers(1 << 30)))
    obj = np.full((encoder_size, encoder_size, 3), schema.OBJECT_FILL, np.uint8)
    obj[om] = _photo(encoder_size, rng)[om]
    ys, xs = np.nonzero(tm)
    yield dict(object=obj, object_mask=(om * 255).astype(np.uint8)[..., None], target=tgt,
               target_mask=(tm * 255).astype(np.uint8)[..., None],
               box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                            np.float32) / generator_size,
               source="synthetic", kind=kind, object_id=f"synthetic#{i}",
               target_id=f"synthetic#{i}", pair_id=i)


def build_synthetic(root: Path, n: int, encoder_size: int, generator_size: int):
  n_img = int(round(n * 0.56))
  sources = []
  for kind, count, weight in (("image", n_img, 0.56), ("video", n - n_img, 0.44)):
    out = root / kind
    shards.write_dataset(out, "train", synthetic_records(count, kind, encoder_size,
                                                         generator_size, len(sources)),
                         encoder_size=encoder_size, generator_size=generator_size,
                         num_shards=2)
    sources.append((str(out), weight))
  return tuple(sources)


def time_steps(cfg: pipeline.DataConfig, n: int) -> dict[str, float]:
  """Per-pair cost (ms) of each step, single thread, over n records."""
  data_dir = cfg.sources[0][0]
  src, features = prepared.open_source(data_dir, cfg.split, "grain")
  tsrc, _ = prepared.open_source(data_dir, cfg.split, "tfds")
  n = min(n, len(src))
  out = {}
  t = time.perf_counter()
  raw = [src[i] for i in range(n)]
  out["read bytes (grain ArrayRecord)"] = time.perf_counter() - t
  t = time.perf_counter()
  recs = [prepared.decode_record(r, features) for r in raw]
  out["decode (deserialize_example_np)"] = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(n):
    tsrc[i]
  out["read + decode (tfds data source)"] = time.perf_counter() - t
  rng = np.random.default_rng(0)
  perturb = cfg.augment.perturb()
  t = time.perf_counter()
  for r in recs:
    augment.augment_object(r["object"], r["object_mask"], perturb, rng)
  out["augment object (forced affine+colour)"] = time.perf_counter() - t
  for level in masks.LEVELS:
    t = time.perf_counter()
    for r in recs:
      masks.coarse_mask(r["target_mask"], level, rng)
    out[f"mask level {level}"] = time.perf_counter() - t
  out = {k: v / n * 1e3 for k, v in out.items()}
  elems = [pipeline.Stage2Transform(cfg)(r, rng) for r in recs[:16]]
  stacked = {k: np.stack([e[k] for e in elems]) for k in elems[0]}
  times = []
  for _ in range(3):  # median: the first call also pays for fresh pages
    t = time.perf_counter()
    pipeline._finish_stage2(stacked)  # pylint: disable=protected-access
    times.append(time.perf_counter() - t)
  out["batch normalise to float32"] = float(np.median(times)) / len(elems) * 1e3
  return out


def time_pipeline(cfg: pipeline.DataConfig, batch: int, batches: int) -> tuple[float, float]:
  """(seconds to the first batch, pairs/s over `batches` batches after 2 warm-up batches)."""
  t0 = time.perf_counter()
  it = iter(pipeline.stage2_dataset(cfg, global_batch=batch))
  next(it)
  first = time.perf_counter() - t0
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch / (time.perf_counter() - t)
  close = getattr(it, "close", None)
  if close:
    close()
  return first, rate


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", action="append", help="prepared dataset folder (repeatable); "
                 "default: write a synthetic one")
  p.add_argument("--records", type=int, default=300, help="synthetic records in all")
  p.add_argument("--synthetic-dir", help="keep the synthetic dataset here and reuse it on "
                 "later runs (default: a temporary folder)")
  p.add_argument("--encoder-size", type=int, default=224)
  p.add_argument("--generator-size", type=int, default=512)
  p.add_argument("--batch", type=int, default=16, help="per-host batch")
  p.add_argument("--batches", type=int, default=8, help="timed batches per setting")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--read-threads", type=int, default=1, help="threads per process")
  p.add_argument("--step-imgs-per-s", type=float, default=MLPERF_SD_V5P_IMGS_PER_CHIP,
                 help="pairs/s one accelerator chip consumes (default: MLPerf SD on v5p)")
  p.add_argument("--chips-per-host", type=int, default=4)
  args = p.parse_args(argv)

  absl_logging.set_verbosity(absl_logging.ERROR)  # tfds' "OpenCV is not installed" notice

  with tempfile.TemporaryDirectory() as tmp:
    if args.data:
      sources = tuple((d, 1.0) for d in args.data)
      desc = ", ".join(args.data)
    else:
      root = Path(args.synthetic_dir or tmp)
      t = time.perf_counter()
      if (root / "video" / "dataset_info.json").exists():
        sources = ((str(root / "image"), 0.56), (str(root / "video"), 0.44))
        written = "reused"
      else:
        sources = build_synthetic(root, args.records, args.encoder_size, args.generator_size)
        written = f"written in {time.perf_counter() - t:.0f} s"
      desc = f"synthetic in {root}, {args.records} records (image 0.56 / video 0.44), {written}"
    cfg = pipeline.DataConfig(sources=sources, encoder_size=args.encoder_size,
                              generator_size=args.generator_size,
                              read_threads=args.read_threads, prefetch=2)
    steps = time_steps(cfg, 64)
    runs = []
    for w in args.workers:
      first, rate = time_pipeline(dataclasses.replace(cfg, num_workers=w), args.batch,
                                  args.batches)
      runs.append((w, first, rate))

  need = args.step_imgs_per_s * args.chips_per_host
  print(f"\nstage-2 input pipeline, E={args.encoder_size} G={args.generator_size}, per-host "
        f"batch {args.batch}, read_threads={args.read_threads}, {os.cpu_count()} CPU cores")
  print(f"data: {desc}")
  print(f"{'':42s}{'ms/pair':>10s}")
  for k, v in steps.items():
    print(f"  {k:40s}{v:10.2f}")
  print(f"{'workers':>8s}{'first batch s':>15s}{'pairs/s':>10s}{'ms/pair/process':>17s}")
  for w, first, rate in runs:
    print(f"{w:8d}{first:15.1f}{rate:10.1f}{1e3 * max(w, 1) / rate:17.1f}")
  per_worker = max(rate / max(w, 1) for w, _, rate in runs)
  print(f"needed: {args.step_imgs_per_s:g} img/s/chip x {args.chips_per_host} chips = "
        f"{need:g} pairs/s per host -> about {math.ceil(need / per_worker)} workers at "
        f"{per_worker:.1f} pairs/s each (needs that many free cores)")


if __name__ == "__main__":
  main()
