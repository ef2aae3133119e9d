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
same DDIM steps, guidance and per-pair seeds; `imprint_jax.evaluation.baselines`), a folder of another
method's outputs (--images,
files `<pair_id>.png` - zero padding allowed - each a composite of the record's target crop,
square, resized to the target's size if needed; `--write-inputs` saves the exact inputs
to run other methods on), and always the copy-and-paste baseline: the object's pixels
pasted into the region's box, aspect-fit and centred (for Pixabay onto the image with the
region first filled with the mean colour of its surroundings, so the original object does not
show through).

Outputs (written atomically): <out>/metrics.json, <out>/metrics.md (a Markdown table),
<out>/scores.jsonl (per pair), <out>/images/<method>/<pair_id>.png (unless
--no-save-images), <out>/inputs/ (with --write-inputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from imprint_jax.errors import UserError

TESTSETS = ("pixabay", "dreambooth")
BASELINES = ("paint-by-example",)  # imprint_jax.evaluation.baselines
COPY_PASTE = "copy-paste"
WHITE = 255
# The paper's Table 2 (IMPRINT), for reference in the Markdown table; never measured here.
PAPER = {"pixabay": {"fid": 16.4487, "clip": 96.1875, "dino": 94.705, "dreamsim": 0.0831},
         "dreambooth": {"fid": None, "clip": 77.0625, "dino": 43.4463, "dreamsim": 0.2898}}
METRICS = ("fid", "clip", "dino", "dreamsim")
HEADERS = {"fid": "FID ↓", "clip": "CLIP-score ↑", "dino": "DINO-score ↑",
           "dreamsim": "DreamSim ↓"}


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


GenerateFn = Callable[[Sequence[Pair]], Sequence[np.ndarray]]


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
  from imprint_jax.data import crops
  from imprint_jax.data import augment, masks
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
  from imprint_jax.data.pipeline import decode_record, open_source
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
  from imprint_jax.data.pipeline import decode_record
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
  return _batches(source, features, n, testset, batch_size, mask_level, seed)


def _batches(source, features, n: int, testset: str, batch_size: int, mask_level: int,
             seed: int) -> Iterator[list[Pair]]:
  from imprint_jax.data.pipeline import decode_record
  for start in range(0, n, batch_size):
    yield [make_pair(decode_record(source[i], features), testset, mask_level=mask_level,
                     seed=seed) for i in range(start, min(start + batch_size, n))]


# ------------------------------------------------------------------------------- protocol ops

def identity_crop(image: np.ndarray, box: Sequence[int], keep: np.ndarray | None = None
                  ) -> np.ndarray:
  """The square of side max(w, h) centred on `box`; pixels outside `keep` (if given) and
  outside the image are white. (H, W, 3) uint8 -> (S, S, 3) uint8."""
  x0, y0, x1, y1 = (int(v) for v in box)
  side = max(x1 - x0, y1 - y0)
  sx0, sy0 = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
  if keep is not None:
    image = np.where(keep[..., None], image, np.uint8(WHITE))
  h, w = image.shape[:2]
  out = np.full((side, side, 3), WHITE, np.uint8)
  cx0, cy0, cx1, cy1 = max(sx0, 0), max(sy0, 0), min(sx0 + side, w), min(sy0 + side, h)
  out[cy0 - sy0:cy1 - sy0, cx0 - sx0:cx1 - sx0] = image[cy0:cy1, cx0:cx1]
  return out


def erase_region(image: np.ndarray, region: np.ndarray) -> np.ndarray:
  """The region filled with the mean colour of a thin ring of pixels around it."""
  width = max(2, round(0.02 * max(image.shape[:2])))
  ring = ndimage.binary_dilation(region, iterations=width) & ~region
  around = image[ring] if ring.any() else image[~region]
  colour = around.mean(axis=0) if around.size else np.full(3, 127.5)
  out = image.copy()
  out[region] = np.rint(colour).astype(np.uint8)
  return out


def copy_paste(pair: Pair, erase: bool) -> np.ndarray:
  """The object's pixels pasted into the region's box, aspect-fit and centred, (G, G, 3)."""
  from imprint_jax.data import crops
  out = erase_region(pair.background, pair.region) if erase else pair.background.copy()
  obj_box = crops.bbox(pair.object_mask[..., 0] > 0)
  if obj_box is None:
    return out
  ox0, oy0, ox1, oy1 = obj_box
  ow, oh = ox1 - ox0, oy1 - oy0
  x0, y0, x1, y1 = pair.box
  scale = min((x1 - x0) / ow, (y1 - y0) / oh)
  w, h = max(1, round(ow * scale)), max(1, round(oh * scale))
  obj = np.asarray(Image.fromarray(pair.object[oy0:oy1, ox0:ox1]).resize(
      (w, h), Image.Resampling.BICUBIC))
  mask = np.asarray(Image.fromarray(pair.object_mask[oy0:oy1, ox0:ox1, 0]).resize(
      (w, h), Image.Resampling.BILINEAR)) >= 128
  px, py = x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2
  window = out[py:py + h, px:px + w]
  window[mask] = obj[mask]
  return out


# ---------------------------------------------------------------------------------- methods

def model_generator(ckpt: str | os.PathLike, *, steps: int = 50, guidance: float = 5.0,
                    batch_size: int = 8, seed: int = 0, dtype: str | None = None,
                    devices: Sequence[Any] | None = None, param_dtype: str | None = None,
                    shard_params: str = "auto") -> GenerateFn:
  """Compositing with a stage-2 checkpoint (`compositing.Compositor`): pair -> (G, G, 3).

  The region is passed as a level-1 mask (it is already at the chosen level); the noise of
  pair p is seeded by (seed, pair_id), so results do not depend on batching or --limit.
  `devices`: the batch mesh (default: all local devices); `param_dtype`, `shard_params`:
  the parameters' dtype and placement (`compositing.Compositor`).
  """
  from imprint_jax import compositing
  compositing.check_sampling(steps, guidance, "ddim")
  comp = compositing.Compositor.from_checkpoint(ckpt, dtype=dtype, devices=devices,
                                                param_dtype=param_dtype,
                                                shard_params=shard_params)

  def generate(pairs: Sequence[Pair]) -> list[np.ndarray]:
    jobs = [comp.prepare(p.object, p.background, object_mask=p.object_mask[..., 0] > 0,
                         mask=p.region, mask_level=1,
                         seed=int(np.random.SeedSequence([seed, p.pair_id]).generate_state(1)[0]))
            for p in pairs]
    # A short last batch is padded to the full size: one compiled sampler for the whole run.
    padded = jobs + jobs[-1:] * max(0, batch_size - len(jobs))
    results = comp.run(padded, steps=steps, guidance=guidance, batch_size=batch_size)
    return [samples[0] for samples in results[:len(jobs)]]

  return generate


_ID_FILE = re.compile(r"0*(\d+)\.(png|jpg|jpeg|webp)", re.IGNORECASE)


def folder_generator(folder: str | os.PathLike) -> GenerateFn:
  """Another method's outputs, one file per pair named by pair id (e.g. 00012.png)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"--images {folder}: no such folder")
  files: dict[int, Path] = {}
  for path in sorted(folder.iterdir()):
    m = _ID_FILE.fullmatch(path.name)
    if m:
      pid = int(m.group(1))
      if pid in files:
        raise UserError(f"--images {folder}: {files[pid].name} and {path.name} both hold pair"
                        f" {pid}")
      files[pid] = path
  if not files:
    raise UserError(f"--images {folder}: no images named by pair id (<pair_id>.png)")

  def generate(pairs: Sequence[Pair]) -> list[np.ndarray]:
    out = []
    for p in pairs:
      path = files.get(p.pair_id)
      if path is None:
        raise UserError(f"--images {folder}: no image for pair {p.pair_id} (expected"
                        f" {p.pair_id:05d}.png; files are named by pair id)")
      try:
        with Image.open(path) as img:
          image = np.asarray(img.convert("RGB"))
      except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable image ({type(e).__name__})") from None
      g = p.background.shape[0]
      if image.shape[0] != image.shape[1]:
        raise UserError(f"{path}: {image.shape[1]}x{image.shape[0]} is not square; expected the"
                        f" composite of the pair's {g}x{g} target crop")
      if image.shape[0] != g:
        image = np.asarray(Image.fromarray(image).resize((g, g), Image.Resampling.BICUBIC))
      out.append(image)
    return out

  return generate


# ---------------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class _Tally:
  """One method's per-pair scores and its Inception features (for FID)."""
  scores: dict[str, list[float]] = dataclasses.field(
      default_factory=lambda: {"clip": [], "dino": [], "dreamsim": []})
  features: list[np.ndarray] = dataclasses.field(default_factory=list)


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
  from imprint_jax.evaluation.metrics import cosine_x100
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


def evaluate(root: str | os.PathLike, testset: str, out: str | os.PathLike,
             methods: dict[str, GenerateFn], suite, *, split: str = "test",
             limit: int | None = None, batch_size: int = 8, mask_level: int = 4, seed: int = 0,
             save_images: bool = True, write_inputs: bool = False, all_instances: bool = False,
             settings: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs every method on the test pairs, scores them and writes the report folder.

  Args:
    root, testset, split, limit: the pairs (see `iter_batches`).
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
    progress: a tqdm bar on stderr.

  Returns:
    The metrics.json content.
  """
  from imprint_jax.convert.common import AtomicDir
  from imprint_jax.evaluation.metrics import fid as fid_lib
  if batch_size < 1:
    raise UserError(f"--batch-size {batch_size}: must be >= 1")
  if mask_level not in (1, 2, 3, 4):
    raise UserError(f"--mask-level {mask_level}: expected 1, 2, 3 or 4")
  if COPY_PASTE in methods:
    raise UserError(f"method name {COPY_PASTE!r} is reserved for the baseline")
  erase = testset == "pixabay"
  methods = {**methods, COPY_PASTE: lambda pairs: [copy_paste(p, erase) for p in pairs]}
  source, features, total = open_pairs(root, testset, split, limit)
  if testset == "pixabay" and not all_instances:
    check_one_per_image(source, features, total)
  skipped = dict(suite.skipped)
  use_fid = suite.inception is not None and testset == "pixabay"
  if testset == "dreambooth" and suite.inception is not None:
    skipped["fid"] = "FID not computed for DreamBooth: there are no real composites"
  if use_fid and total < 2:
    use_fid, skipped["fid"] = False, "FID needs at least 2 pairs"
  tallies = {name: _Tally() for name in methods}
  real_features: list[np.ndarray] = []
  batches = _batches(source, features, total, testset, batch_size, mask_level, seed)
  if progress:
    from imprint_jax.progress import bar
    batches = bar(batches, total=-(-total // batch_size), desc="evaluate", unit="batch",
                   file=sys.stderr)
  with AtomicDir(out) as tmp, open(tmp / "scores.jsonl", "w") as per_pair:
    for pairs in batches:
      refs = {"images": [p.object for p in pairs]}
      refs["clip"] = suite.clip(refs["images"]) if suite.clip else None
      refs["dino"] = suite.dino(refs["images"]) if suite.dino else None
      if use_fid:
        real_features.append(suite.inception([p.real for p in pairs]))
      if write_inputs:
        _write_inputs(tmp / "inputs", pairs)
      for name, generate in methods.items():
        outputs = _generate(name, generate, pairs)
        if save_images:
          for p, o in zip(pairs, outputs):
            _save_png(tmp / "images" / name / f"{p.pair_id:05d}.png", o)
        row = _identity_scores(suite, testset, pairs, outputs, refs)
        for key, values in row.items():
          tallies[name].scores[key].extend(float(v) for v in values)
        for i, p in enumerate(pairs):
          per_pair.write(json.dumps({"pair_id": p.pair_id, "method": name,
                                     **{k: float(v[i]) for k, v in row.items()}}) + "\n")
        if use_fid:
          tallies[name].features.append(suite.inception(outputs))
    results = {}
    for name, tally in tallies.items():
      results[name] = {k: (float(np.mean(v)) if v else None) for k, v in tally.scores.items()}
      results[name]["fid"] = (fid_lib.fid_from_features(np.concatenate(tally.features),
                                                        np.concatenate(real_features))
                              if use_fid else None)
    report = {
        "testset": testset, "split": split, "root": os.fspath(root), "pairs": total,
        "methods": results, "skipped": skipped,
        "settings": {"mask_level": mask_level, "seed": seed, "batch_size": batch_size,
                     "fid_resize": suite.fid_resize,
                     **({"all_instances": True} if all_instances else {}), **(settings or {})},
        "protocol": protocol_text(testset, suite.fid_resize),
        "paper": {"IMPRINT (paper, Table 2)": PAPER[testset]},
    }
    (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "metrics.md").write_text(markdown(report))
  return report


def protocol_text(testset: str, fid_resize: str) -> str:
  crop = ("square crop centred on the region's box, real context kept" if testset == "pixabay"
          else "square crop centred on the region's box, background outside the region white")
  fid = (f"FID: full composites vs real targets, Inception pool3, {fid_resize} resize to 299"
         if testset == "pixabay" else "FID: not applicable (no real composites)")
  return (f"CLIP/DINO: 100 x cosine(generated object, reference object), {crop}; DreamSim:"
          f" distance on the same crops; {fid}.")


def _fmt(key: str, value: float | None) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if key == "dreamsim" else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
  """The report as a Markdown table with its protocol, settings and skipped metrics."""
  lines = [f"# imprint-jax evaluate: {report['testset']} (split {report['split']},"
           f" {report['pairs']} pairs)", "",
           "| method | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
           "|---|" + "---:|" * len(METRICS)]
  for name, r in report["methods"].items():
    lines.append(f"| {name} | " + " | ".join(_fmt(k, r.get(k)) for k in METRICS) + " |")
  for name, r in report["paper"].items():
    lines.append(f"| *{name}* | " + " | ".join(_fmt(k, r.get(k)) for k in METRICS) + " |")
  lines += ["", f"Protocol: {report['protocol']}", "",
            "Settings: " + ", ".join(f"{k} {v}" for k, v in report["settings"].items())]
  if report["skipped"]:
    lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
  lines.append("")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI

EPILOG = """\
Metric weights (local files only; a metric whose weights are missing is skipped with one line):
  CLIP       hf download openai/clip-vit-large-patch14 config.json model.safetensors
               --local-dir DIR, then --clip DIR
  DINO       hf download facebook/dino-vits16 config.json model.safetensors --local-dir DIR,
               then --dino DIR
             (safetensors; a folder holding only pytorch_model.bin is refused)
  FID        download https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/\
pt_inception-2015-12-05-6726825d.pth and convert it once (we never unpickle):
             {convert}
             then --inception pt_inception-2015-12-05-6726825d.safetensors
  DreamSim   pip install 'imprint-jax[eval]'; --dreamsim-dir DIR
Writes <out>/metrics.json, metrics.md (table), scores.jsonl (per pair), images/<method>/."""


def epilog() -> str:
  """Text for the subcommand's --help epilog (use RawDescriptionHelpFormatter)."""
  from imprint_jax.evaluation.metrics.fid import CONVERT_INCEPTION
  return EPILOG.format(convert=CONVERT_INCEPTION)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `imprint-jax evaluate` flags."""
  parser.add_argument("--ckpt", help="stage-2 checkpoint or training workdir to evaluate"
                      " (local or gs://)")
  parser.add_argument("--which", default="latest", metavar="latest|best|STEP",
                      help="for a training workdir: latest (default), best (lowest validation"
                      " loss) or a step number")
  parser.add_argument("--images", metavar="DIR", help="instead of (or beside) --ckpt: a folder"
                      " of another method's composites, one per pair named <pair_id>.png"
                      " (AnyDoor, Paint-by-Example, ...)")
  parser.add_argument("--name", help="table name of the --images method (default: the folder"
                      " name)")
  parser.add_argument("--baseline", choices=BASELINES, help="also run this method on exactly"
                      " the same inputs and score it beside the others: paint-by-example"
                      " (diffusers' PaintByExamplePipeline, PyTorch; weights from"
                      " --baseline-weights)")
  parser.add_argument("--baseline-weights", metavar="DIR", help="the --baseline's local"
                      " pipeline folder (save_pretrained layout, e.g. Fantasy-Studio/"
                      "Paint-by-Example)")
  parser.add_argument("--all-instances", action="store_true", help="pixabay: accept several"
                      " pairs per image (the paper's protocol, and the default, is one object"
                      " per image: `prepare --instances largest`)")
  parser.add_argument("--testset", required=True, choices=TESTSETS + ("multiview",),
                      help="pixabay, dreambooth (compositing), or multiview: how well the"
                      " encoder keeps one object's views together (nearest-neighbour view"
                      " retrieval, silhouette, t-SNE PNG) for --dinov2 and/or the --ckpt's"
                      " DINOv2 on a view dataset (`imprint_jax/evaluation/multiview.py`)")
  parser.add_argument("--dinov2", metavar="DIR", help="multiview: the original DINOv2"
                      " (transformers folder) to compare with the --ckpt's")
  parser.add_argument("--root", required=True, help="test set folder written by `imprint-jax"
                      " prepare` (pixabay: --source images; dreambooth: --source dreambooth)")
  parser.add_argument("--split", default="test", help="split to read (default: test)")
  parser.add_argument("--out", required=True, help="report folder to write (replaced when"
                      " complete)")
  parser.add_argument("--clip", metavar="DIR", help="openai/clip-vit-large-patch14 folder"
                      " (transformers, safetensors; clip-vit-base-patch32 works too)")
  parser.add_argument("--dino", metavar="DIR", help="facebook/dino-vits16 folder"
                      " (transformers ViTModel, safetensors)")
  parser.add_argument("--inception", metavar="FILE", help="pytorch-fid's FID Inception weights"
                      " converted to safetensors (pt_inception-2015-12-05-6726825d.safetensors;"
                      " the one-line conversion is below)")
  parser.add_argument("--dreamsim-dir", metavar="DIR", help="DreamSim weights folder (its"
                      " cache_dir). DreamSim is PyTorch only and an optional extra: without"
                      " the `dreamsim` package the run prints 'DreamSim skipped: pip install"
                      " 'imprint-jax[eval]' and pass --dreamsim-dir' and scores the"
                      " rest")
  parser.add_argument("--fid-resize", default="pil-bicubic", choices=("pil-bicubic",
                      "torch-bilinear"), help="resize to 299 for FID: clean-fid style PIL"
                      " bicubic on uint8 (default) or pytorch-fid's bilinear")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
  parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance"
                      " scale (default 5)")
  parser.add_argument("--batch-size", type=int, default=8, help="pairs per generation call")
  parser.add_argument("--metric-batch", type=int, default=32, help="images per metric-network"
                      " call")
  parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
  parser.add_argument("--mask-level", type=int, default=4, choices=(1, 2, 3, 4),
                      help="shape guidance of the region for Pixabay (4 = box)")
  parser.add_argument("--seed", type=int, default=0, help="seeds the Pixabay object"
                      " perturbation and the model's noise, per pair id")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="model compute dtype"
                      " (default: bfloat16 on GPU/TPU, float32 on CPU)")
  from imprint_jax.cli import composite as composite_cli
  composite_cli.add_memory_arguments(parser)  # --param-dtype, --shard-params
  parser.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=True,
                      help="write every composite to <out>/images/<method>/")
  parser.add_argument("--write-inputs", action="store_true", help="write each pair's inputs"
                      " (object, object mask, background, region) to <out>/inputs/, to run"
                      " other methods on exactly these pairs")


def main(args: argparse.Namespace) -> int:
  """Runs `evaluate` from parsed flags; prints the table. UserError for bad input."""
  from imprint_jax.evaluation import metrics
  if args.testset == "multiview":
    from imprint_jax.evaluation import multiview as multiview_eval
    return multiview_eval.main(args)
  if not args.ckpt and not args.images and not args.baseline:
    raise UserError("give --ckpt (run the model), --baseline NAME and/or --images DIR (score"
                    " another method's composites)")
  if bool(args.baseline) != bool(args.baseline_weights):
    raise UserError("--baseline and --baseline-weights go together")
  source, features, n = open_pairs(args.root, args.testset, args.split, args.limit)
  if args.testset == "pixabay" and not args.all_instances:  # fail before loading models
    check_one_per_image(source, features, n)
  methods: dict[str, GenerateFn] = {}
  if args.images:
    name = args.name or Path(args.images).resolve().name
    methods[name] = folder_generator(args.images)
  suite = metrics.load_suite(clip=args.clip, dino=args.dino, inception=args.inception,
                             dreamsim_dir=args.dreamsim_dir, fid_resize=args.fid_resize,
                             batch_size=args.metric_batch)
  for reason in suite.skipped.values():
    print(f"imprint-jax evaluate: {reason}", file=sys.stderr)
  ckpt = None
  if args.ckpt:
    from imprint_jax.convert import checkpoint as ckpt_lib
    ckpt = ckpt_lib.resolve(args.ckpt, args.which)
    print(f"imprint-jax evaluate: using {ckpt_lib.describe(ckpt, ckpt_lib.read_meta(ckpt))}",
          file=sys.stderr)
  if args.ckpt:
    if "imprint" in methods:
      raise UserError("--name imprint is the model's row; give the --images method another"
                      " --name")
    methods = {"imprint": model_generator(ckpt, steps=args.steps, guidance=args.guidance,
                                          batch_size=args.batch_size, seed=args.seed,
                                          dtype=args.dtype, param_dtype=args.param_dtype,
                                          shard_params=args.shard_params), **methods}
  if args.baseline:
    from imprint_jax.evaluation import baselines
    if args.baseline in methods:
      raise UserError(f"--name {args.baseline} is the baseline's row; give the --images method"
                      " another --name")
    methods[args.baseline] = baselines.paint_by_example_generator(
        args.baseline_weights, steps=args.steps, guidance=args.guidance, seed=args.seed,
        batch_size=args.batch_size)
  settings = {"ckpt": None if ckpt is None else str(ckpt), "images": args.images,
              "steps": args.steps,
              "guidance": args.guidance}
  if args.baseline:
    settings.update(baseline=args.baseline, baseline_weights=args.baseline_weights)
  report = evaluate(args.root, args.testset, args.out, methods, suite, split=args.split,
                    limit=args.limit, batch_size=args.batch_size, mask_level=args.mask_level,
                    seed=args.seed, save_images=args.save_images,
                    write_inputs=args.write_inputs, all_instances=args.all_instances,
                    settings=settings)
  print(markdown(report))
  print(f"wrote {Path(args.out) / 'metrics.json'} and metrics.md")
  return 0
