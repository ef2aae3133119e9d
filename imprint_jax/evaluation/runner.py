"""`imprint-jax evaluate`: the paper's benchmark (IMPRINT Sec. 4.2-4.3) on a prepared test set.

    imprint-jax evaluate --ckpt runs/stage2 --testset pixabay --root data/pixabay_test \\
        --out eval/pixabay --clip weights/clip-vit-large-patch14 --dino weights/dino-vits16 \\
        --inception weights/pt_inception-2015-12-05-6726825d.safetensors

Test sets (`--root`, a folder written by `imprint-jax prepare`; split `--split`, default test):
  pixabay     an `images`-source set (`prepare --source images --split test --instances
              largest` puts every image in "test" with one object per image, its largest
              valid instance, as the paper selects one object per image; a set with several
              pairs of one image is refused unless --all-instances, e.g. for `--split val` of
              a training set, which keeps every instance). Each
              record's object is perturbed by the training augmentation (`AugmentConfig
              .perturb()`: affine + colour/LUT, always on), seeded by (--seed, pair_id), and
              composited back into its own image: the record's target is both the background
              and, for FID, the real image. 'video' records (object from another frame) are
              used unperturbed.
  dreambooth  `prepare --source dreambooth` records (kind "test"): the subject photo goes into
              the manifest's box of a background; there is no real composite, so no FID (the
              paper reports none either).

The generation region is the record's object mask at shape-guidance level --mask-level
(default 4, the box, as for the paper's baselines), coarsened by `data.masks.coarse_mask`; for
DreamBooth it is the box.

Scores (per pair, then averaged):
  CLIP / DINO   100 x cosine between the embeddings of the generated object and of the
                reference object (the object image given to the model, segmented on white).
  DreamSim      DreamSim distance between the same two images (lower is better).
  FID           pool3 statistics of the full composites vs the real targets (Pixabay).
The generated object is cut out centred first: the square of side max(box w, h) centred on
the region's box. Pixabay keeps the real pixels around the object inside that square;
DreamBooth masks the background (everything outside the generation region is white), as in
the paper's appendix. (Without a segmenter the region, not the object's exact outline, is
what is kept.) Parts of the square outside the image are white.

Methods in the table: the model (--ckpt), Paint-by-Example run in-process on the same inputs
(--baseline paint-by-example --baseline-weights DIR: diffusers' pipeline from a local folder,
same DDIM steps, guidance and per-pair seeds; `evaluation/baselines.py`), a folder of another
method's outputs (--images, files `<pair_id>.png` - zero padding allowed - each a composite of
the record's target crop, square, resized to the target's size if needed; `--write-inputs`
saves the exact inputs to run other methods on; `evaluation/methods.py`), and always the
copy-and-paste baseline: the object's pixels
pasted into the region's box, aspect-fit and centred (for Pixabay onto the image with the
region first filled with the mean colour of its surroundings, so the original object does not
show through).

Outputs (written atomically): <out>/metrics.json, <out>/metrics.md (a Markdown table),
<out>/scores.jsonl (per pair and method, in record order), <out>/images/<method>/<pair_id>.png
(unless --no-save-images), <out>/inputs/ (with --write-inputs).

Several hosts: `plan` on every host, `score_share` of each host's pairs into its own share
folder (scores, Inception features, images), then `write_report` on one host merges the
shares into the same report a single host writes. `evaluate` is the single-host run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imprint_jax.convert.common import AtomicDir
from imprint_jax.errors import UserError
from imprint_jax.evaluation.methods import COPY_PASTE, GenerateFn, copy_paste, identity_crop
from imprint_jax.evaluation.metrics import cosine_x100
from imprint_jax.evaluation.metrics import fid as fid_lib
from imprint_jax.evaluation.report import PAPER, markdown, protocol_text
from imprint_jax.evaluation.testsets import (Pair, batches, check_one_per_image, open_pairs)
from imprint_jax.progress import bar

SCORES = ("clip", "dino", "dreamsim")  # per-pair scores; FID is over the whole set


@dataclasses.dataclass(frozen=True)
class Run:
  """What every host of an evaluation agrees on before scoring (`plan`); `pairs`: the number
  of test pairs (records 0 .. pairs - 1 of the split); `settings`: extra settings recorded in
  metrics.json."""
  root: str
  testset: str
  split: str
  pairs: int
  batch_size: int
  mask_level: int
  seed: int
  all_instances: bool
  settings: dict[str, Any]


def plan(root: str | os.PathLike, testset: str, *, split: str = "test",
         limit: int | None = None, batch_size: int = 8, mask_level: int = 4, seed: int = 0,
         all_instances: bool = False, settings: dict[str, Any] | None = None) -> Run:
  """Checks the arguments and the test set (arguments as for `evaluate`)."""
  if batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: must be >= 1")
  if mask_level not in (1, 2, 3, 4):
    raise UserError(f"--mask-level {mask_level}: expected 1, 2, 3 or 4")
  source, features, total = open_pairs(root, testset, split, limit)
  if testset == "pixabay" and not all_instances:
    check_one_per_image(source, features, total)
  return Run(os.fspath(root), testset, split, total, batch_size, mask_level, seed,
             all_instances, dict(settings or {}))


def _fid(run: Run, suite) -> tuple[bool, dict[str, str]]:
  """Whether FID is computed, and metric -> why it is not computed."""
  skipped = dict(suite.skipped)
  use_fid = suite.inception is not None and run.testset == "pixabay"
  if run.testset == "dreambooth" and suite.inception is not None:
    skipped["fid"] = "FID not computed for DreamBooth: there are no real composites"
  if use_fid and run.pairs < 2:
    use_fid, skipped["fid"] = False, "FID needs at least 2 pairs"
  return use_fid, skipped


def evaluate(root: str | os.PathLike, testset: str, out: str | os.PathLike,
             methods: dict[str, GenerateFn], suite, *, split: str = "test",
             limit: int | None = None, batch_size: int = 8, mask_level: int = 4, seed: int = 0,
             save_images: bool = True, write_inputs: bool = False, all_instances: bool = False,
             settings: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs every method on the test pairs, scores them and writes the report folder.

  Args:
    root, testset, split, limit: the pairs (see `testsets.iter_batches`).
    out: report folder, written atomically (replaced only when complete).
    methods: name -> GenerateFn (pairs -> (G, G, 3) uint8 composites); the copy-and-paste
      baseline is added.
    suite: a `metrics.MetricSuite` (skipped metrics show as '-').
    batch_size: pairs per generation call.
    mask_level: shape-guidance level of the region (Pixabay).
    seed: seeds the object perturbation and the models' noise (by pair id).
    save_images, write_inputs: also write the composites / the pairs' inputs.
    all_instances: Pixabay: accept several pairs per image (default: refuse them).
    settings: extra settings recorded in metrics.json.
    progress: a progress bar on stderr.

  Returns:
    The metrics.json content.
  """
  run = plan(root, testset, split=split, limit=limit, batch_size=batch_size,
             mask_level=mask_level, seed=seed, all_instances=all_instances, settings=settings)
  return execute(run, methods, suite, out, save_images=save_images, write_inputs=write_inputs,
                 progress=progress)


def execute(run: Run, methods: dict[str, GenerateFn], suite, out: str | os.PathLike, *,
            save_images: bool = True, write_inputs: bool = False,
            progress: bool = True) -> dict[str, Any]:
  """`evaluate` of a planned run on one host."""
  with AtomicDir(out) as tmp:
    share = tmp / ".share"
    share.mkdir()
    score_share(run, methods, suite, share, range(run.pairs), save_images=save_images,
                write_inputs=write_inputs, progress=progress)
    report = _assemble(run, suite, list(methods), [share], tmp)
    shutil.rmtree(share)
  return report


def share_folder(out: str | os.PathLike, process: int) -> Path:
  """Where host `process` writes its share of a multi-host evaluation (beside `out`)."""
  out = Path(out)
  return out.parent / f".{out.name}.share-{process}"


def write_report(run: Run, suite, names: Sequence[str], shares: Sequence[str | os.PathLike],
                 out: str | os.PathLike) -> dict[str, Any]:
  """Merges the `score_share` folders of all hosts (which together hold every pair once) into
  the report folder `out`, written atomically; removes the shares. `names`: the methods given
  to `score_share`. Returns metrics.json's content."""
  shares = [Path(s) for s in shares]
  with AtomicDir(out) as tmp:
    report = _assemble(run, suite, names, shares, tmp)
  for share in shares:
    shutil.rmtree(share, ignore_errors=True)
  return report


# ---------------------------------------------------------------------------------- scoring

def _save_png(path: Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def _write_inputs(folder: Path, pairs: Sequence[Pair]) -> None:
  for p in pairs:
    stem = f"{p.pair_id:05d}"
    _save_png(folder / f"{stem}_object.png", p.object)
    _save_png(folder / f"{stem}_object_mask.png", p.object_mask[..., 0])
    _save_png(folder / f"{stem}_background.png", p.background)
    _save_png(folder / f"{stem}_mask.png", p.region.astype(np.uint8) * 255)


def _generate(name: str, generate: GenerateFn, pairs: Sequence[Pair]) -> list[np.ndarray]:
  outputs = [np.asarray(o) for o in generate(pairs)]
  if len(outputs) != len(pairs):
    raise ValueError(f"method {name} returned {len(outputs)} images for {len(pairs)} pairs")
  for p, o in zip(pairs, outputs):
    if o.dtype != np.uint8 or o.shape != p.background.shape:
      raise ValueError(f"method {name}, pair {p.pair_id}: output {o.shape} {o.dtype},"
                       f" expected {p.background.shape} uint8")
  return outputs


def _identity_scores(suite, testset: str, pairs: Sequence[Pair], outputs: Sequence[np.ndarray],
                     refs: dict[str, Any]) -> dict[str, np.ndarray]:
  """Per-pair CLIP / DINO / DreamSim of the centred object crops vs the reference objects."""
  crops = [identity_crop(o, p.box, p.region if testset == "dreambooth" else None)
           for p, o in zip(pairs, outputs)]
  row = {}
  if suite.clip:
    row["clip"] = cosine_x100(suite.clip(crops), refs["clip"])
  if suite.dino:
    row["dino"] = cosine_x100(suite.dino(crops), refs["dino"])
  if suite.dreamsim:
    row["dreamsim"] = suite.dreamsim(crops, refs["images"])
  return row


def _with_copy_paste(run: Run, methods: dict[str, GenerateFn]) -> dict[str, GenerateFn]:
  if COPY_PASTE in methods:
    raise UserError(f"method name {COPY_PASTE!r} is reserved for the baseline")
  erase = run.testset == "pixabay"
  return {**methods, COPY_PASTE: lambda pairs: [copy_paste(p, erase) for p in pairs]}


def score_share(run: Run, methods: dict[str, GenerateFn], suite, folder: str | os.PathLike,
                indices: Sequence[int], *, save_images: bool = True, write_inputs: bool = False,
                progress: bool = True) -> None:
  """Runs and scores every method and the copy-and-paste baseline on the pairs `indices`
  (record positions) of `run`; writes `folder`: scores.jsonl (a row per pair and method, with
  its record index), features.npz (the Inception features, when FID is computed), images/ and
  inputs/ as in the report."""
  folder = Path(folder)
  methods = _with_copy_paste(run, methods)
  source, features, _ = open_pairs(run.root, run.testset, run.split, run.pairs)
  indices = list(indices)
  names = list(methods)
  use_fid, _ = _fid(run, suite)
  fakes: dict[str, list[np.ndarray]] = {name: [] for name in names}
  reals: list[np.ndarray] = []
  stream = batches(source, features, indices, run.testset, run.batch_size, run.mask_level,
                   run.seed)
  if progress:
    stream = bar(stream, total=-(-len(indices) // run.batch_size), desc="evaluate",
                 unit="batch", file=sys.stderr)
  done = 0
  with open(folder / "scores.jsonl", "w") as rows:
    for pairs in stream:
      index = indices[done:done + len(pairs)]
      done += len(pairs)
      refs = {"images": [p.object for p in pairs]}
      refs["clip"] = suite.clip(refs["images"]) if suite.clip else None
      refs["dino"] = suite.dino(refs["images"]) if suite.dino else None
      if use_fid:
        reals.append(suite.inception([p.real for p in pairs]))
      if write_inputs:
        _write_inputs(folder / "inputs", pairs)
      for name in names:
        outputs = _generate(name, methods[name], pairs)
        if save_images:
          for p, o in zip(pairs, outputs):
            _save_png(folder / "images" / name / f"{p.pair_id:05d}.png", o)
        scores = _identity_scores(suite, run.testset, pairs, outputs, refs)
        for i, p in enumerate(pairs):
          rows.write(json.dumps({"index": index[i], "pair_id": p.pair_id, "method": name,
                                 **{k: float(v[i]) for k, v in scores.items()}}) + "\n")
        if use_fid:
          fakes[name].append(suite.inception(outputs))
  if use_fid and indices:
    np.savez(folder / "features.npz", index=np.asarray(indices), real=np.concatenate(reals),
             **{f"method_{k}": np.concatenate(fakes[name]) for k, name in enumerate(names)})


def _assemble(run: Run, suite, names: Sequence[str], shares: Sequence[Path], tmp: Path
              ) -> dict[str, Any]:
  """The report of `run` from its shares, written into `tmp` (images and inputs moved).
  `names`: the methods given to `score_share` (the copy-and-paste baseline comes last)."""
  names = [*names, COPY_PASTE]
  use_fid, skipped = _fid(run, suite)
  rank = {name: k for k, name in enumerate(names)}
  rows = []
  for share in shares:
    rows += [json.loads(line) for line in (share / "scores.jsonl").read_text().splitlines()]
  rows.sort(key=lambda r: (r["index"], rank[r["method"]]))
  if sorted({r["index"] for r in rows}) != list(range(run.pairs)):
    raise ValueError(f"the shares hold {len({r['index'] for r in rows})} of {run.pairs} pairs")
  with open(tmp / "scores.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps({k: v for k, v in r.items() if k != "index"}) + "\n")
  results: dict[str, dict[str, float | None]] = {}
  for name in names:
    mine = [r for r in rows if r["method"] == name]
    results[name] = {k: (float(np.mean([r[k] for r in mine])) if mine and k in mine[0]
                         else None) for k in SCORES}
    results[name]["fid"] = None
  if use_fid:
    stored = [np.load(share / "features.npz") for share in shares
              if (share / "features.npz").exists()]
    order = np.argsort(np.concatenate([s["index"] for s in stored]), kind="stable")
    real = np.concatenate([s["real"] for s in stored])[order]
    for k, name in enumerate(names):
      fake = np.concatenate([s[f"method_{k}"] for s in stored])[order]
      results[name]["fid"] = fid_lib.fid_from_features(fake, real)
  for share in shares:
    for path in sorted(share.rglob("*")):
      rel = path.relative_to(share)
      if path.is_file() and rel.parts[0] in ("images", "inputs"):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, tmp / rel)
  report = {
      "testset": run.testset, "split": run.split, "root": run.root, "pairs": run.pairs,
      "methods": results, "skipped": skipped,
      "settings": {"mask_level": run.mask_level, "seed": run.seed, "batch_size": run.batch_size,
                   "fid_resize": suite.fid_resize,
                   **({"all_instances": True} if run.all_instances else {}), **run.settings},
      "protocol": protocol_text(run.testset, suite.fid_resize),
      "paper": {"IMPRINT (paper, Table 2)": PAPER[run.testset]},
  }
  (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
  (tmp / "metrics.md").write_text(markdown(report))
  return report
