"""`imprint-jax prepare`: every layout -> shards, determinism, resume, skips, errors."""

from __future__ import annotations

import argparse
from collections import Counter
import dataclasses
import hashlib
import json
from pathlib import Path
import shutil

import grain
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

from imprint_jax.cli import prepare as prepare_cli
from imprint_jax.cli.flags import prepare as prepare_flags
from imprint_jax.data import crops, prepared, schema
from imprint_jax.data_prep import build, pairs, prepare, shards, synthetic
from imprint_jax.data_prep.config import SOURCES
from imprint_jax.data_prep.readers import READERS
from imprint_jax.data_prep.readers import common
from imprint_jax.errors import UserError

E, G = 32, 64
CFG = prepare.PrepareConfig(encoder_size=E, generator_size=G, window=2, min_size=8,
                            min_area=0.005, val_fraction=0.34, pairs_per_instance=4,
                            groups_per_shard=1, num_shards=2, seed=7, pairing="pairs")
SYN = synthetic.SyntheticConfig(groups=3, frames=5, frame_size=96, objects=2, seed=3)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
  """Synthetic datasets in every layout (read-only: tests that damage one copy it)."""
  return synthetic.generate(tmp_path_factory.mktemp("raw"), SYN)


def _copy(raw_root: Path, tmp_path: Path) -> Path:
  dst = tmp_path / raw_root.name
  shutil.copytree(raw_root, dst)
  return dst


def _bytes(out: Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if ".array_record-" in p.name}


def _enumerated(source: str, root: Path, cfg: prepare.PrepareConfig) -> dict[str, int]:
  """Pairs per split as the reader enumerates them (validated views -> make_pairs)."""
  reader = READERS[source]
  root = reader.resolve_root(root)
  groups, _ = reader.list_groups(root)
  counts = {}
  for split, split_groups in prepare.assign_splits(source, groups, cfg).items():
    n = 0
    for g in split_groups:
      views = pairs.validate_frames(root, reader.group_frames(root, g), cfg, Counter(),
                                      apply_filters=reader.KIND != "test")
      if reader.KIND == "test":
        n += len(reader.make_test_pairs(root, g, views)[0])
      else:
        rng = np.random.default_rng(pairs.group_hash(cfg.seed, source, g.key))
        n += len(reader.make_pairs(views, cfg, rng))
    counts[split] = n
  return counts


def _closed_form(source: str) -> int:
  """Total pairs for the clean synthetic data, counted from its construction."""
  f, k, n, ppi = SYN.frames, SYN.objects, SYN.groups, CFG.pairs_per_instance
  if source == "mvimgnet":
    in_window = sum(1 for i in range(f) for j in range(f) if i != j and abs(i - j) <= CFG.window)
    return n * min(ppi, in_window)
  if source in ("youtube_vos", "vipseg"):
    return n * k * min(ppi, f * (f - 1))
  if source == "ppr10k":
    return n * min(ppi, f * (f - 1))
  if source == "images":
    return n * k
  return 2 * max(2, n)  # dreambooth: two manifest lines per subject


def _check_record(ex: dict, source: str, kind: str) -> None:
  assert ex["object"].shape == (E, E, 3) and ex["target"].shape == (G, G, 3)
  assert ex["object_mask"].shape == (E, E, 1) and ex["target_mask"].shape == (G, G, 1)
  for key in ("object_mask", "target_mask"):
    assert set(np.unique(ex[key])) <= {0, 255}, key
    assert ex[key].any(), key
  assert ex["source"].decode() == source and ex["kind"].decode() == kind
  # The box bounds the target mask within a pixel.
  ys, xs = np.nonzero(ex["target_mask"][..., 0])
  tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / G
  np.testing.assert_allclose(ex["box"], tight, atol=1.0 / G + 1e-6)
  assert (0 <= ex["box"]).all() and (ex["box"] <= 1).all()
  # Background removed: pixels well away from the object mask hold OBJECT_FILL (up to the
  # resampling filter's ringing from sub-pixel slivers that the mask threshold dropped).
  near = ndimage.binary_dilation(ex["object_mask"][..., 0] > 0, iterations=4)
  away = ex["object"][~near].astype(int)
  assert away.size == 0 or np.abs(away - schema.OBJECT_FILL).max() <= 3
  obj_path, obj_inst = ex["object_id"].decode().split("#")
  tgt_path, tgt_inst = ex["target_id"].decode().split("#")
  if kind in ("video", "multiview"):
    assert obj_inst == tgt_inst and obj_path != tgt_path
    assert obj_path.rsplit("/", 1)[0] == tgt_path.rsplit("/", 1)[0]  # same video/object
  if kind == "multiview":
    i, j = (int(Path(p).stem) for p in (obj_path, tgt_path))
    assert 1 <= abs(i - j) <= CFG.window
  if kind == "image":
    assert (obj_path, obj_inst) == (tgt_path, tgt_inst)


@pytest.mark.parametrize("source", synthetic.LAYOUTS)
def test_every_layout_builds_and_reads(raw, tmp_path, source):
  out = tmp_path / "out"
  summary = prepare.prepare(source, raw[source], out, CFG, workers=1, progress=False)
  enumerated = _enumerated(source, raw[source], CFG)
  written = {k: v["pairs"] for k, v in summary["splits"].items()}
  assert written == enumerated
  assert sum(written.values()) == _closed_form(source)
  assert summary["skipped"] == {} and summary["pairs_written"] == {source: sum(written.values())}
  assert json.loads((out / prepare.SUMMARY_FILE).read_text()) == summary
  kind = READERS[source].KIND
  builder = tfds.builder_from_directory(out)
  features = prepared.load_features(out)
  groups_seen = {}
  for split, n in written.items():
    ds = builder.as_data_source(split=split)
    paths = prepared.shard_paths(out, split)
    assert len(paths) == CFG.num_shards
    raw_ds = grain.sources.ArrayRecordDataSource(paths)
    assert len(ds) == len(raw_ds) == n
    for i in range(n):
      ex = ds[i]
      assert ex["pair_id"] == i
      _check_record(ex, source, kind)
      if i == n - 1:
        via_grain = features.deserialize_example_np(raw_ds[i])
        for key in ex:
          np.testing.assert_array_equal(np.asarray(ex[key]), np.asarray(via_grain[key]))
      group = ex["object_id"].decode().split("#")[0].rsplit("/", 1)[0]
      groups_seen.setdefault(split, set()).add(group)
  if kind in ("video", "multiview") and source != "ppr10k":
    assert not groups_seen["train"] & groups_seen["val"]  # split by video/object, not pair
  if kind == "test":
    assert set(written) == {"test"}


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  prepare_flags.add_arguments(parser)
  return parser.parse_args(argv)


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
  return ["--source", "youtube_vos", "--root", str(root), "--out", str(out), "--seed", "7",
          "--encoder-size", str(E), "--generator-size", str(G), "--min-size", "8",
          "--min-area", "0.005", "--val-fraction", "0.34", "--pairs-per-instance", "4",
          "--groups-per-shard", "1", "--num-shards", "2", "--no-progress", *extra]


def test_main_is_deterministic_across_worker_counts(raw, tmp_path, capsys):
  assert prepare_cli.run(_parse(_argv(raw["youtube_vos"], tmp_path / "a", "--workers", "1"))) == 0
  assert "prepare youtube_vos: train" in capsys.readouterr().out
  assert prepare_cli.run(_parse(_argv(raw["youtube_vos"], tmp_path / "b", "--workers", "2"))) == 0
  a, b = _bytes(tmp_path / "a"), _bytes(tmp_path / "b")
  assert len(a) == 4 and a == b  # 2 train + 2 val shards, byte-identical
  # The library call with the same config makes the same bytes too.
  prepare.prepare("youtube_vos", raw["youtube_vos"], tmp_path / "c", CFG, progress=False)
  assert _bytes(tmp_path / "c") == a
  # Another seed samples other pairs.
  other = dataclasses.replace(CFG, seed=8)
  prepare.prepare("youtube_vos", raw["youtube_vos"], tmp_path / "d", other, progress=False)
  assert _bytes(tmp_path / "d") != a


def test_resume_after_interruption(raw, tmp_path, monkeypatch):
  ref = tmp_path / "ref"
  prepare.prepare("mvimgnet", raw["mvimgnet"], ref, CFG, progress=False)
  out = tmp_path / "out"
  work = out / shards.WORK_DIR / "train"  # train has 2 units (1 group each), val 1
  finished = []

  def crash_after(n):
    def hook(split, unit):
      finished.append((split, unit))
      if len(finished) == n:
        raise KeyboardInterrupt("simulated interruption")
    return hook

  monkeypatch.setattr(build, "_AFTER_UNIT", crash_after(1))
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare("mvimgnet", raw["mvimgnet"], out, CFG, progress=False)
  assert not _bytes(out) and not (out / "dataset_info.json").exists()  # nothing published
  assert sorted(p.name for p in work.glob("unit-*")) == ["unit-00000.ar", "unit-00000.json"]
  # A half-written unit file without its done-marker is never taken as complete.
  (work / "unit-00001.ar").write_bytes(b"partial")
  finished.clear()
  monkeypatch.setattr(build, "_AFTER_UNIT", crash_after(1))
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare("mvimgnet", raw["mvimgnet"], out, CFG, progress=False)
  assert finished == [("train", 1)]  # unit 0 was kept, unit 1 redone
  # Losing a finished unit's done-marker makes the next run redo that unit only.
  (work / "unit-00000.json").unlink()
  finished.clear()
  monkeypatch.setattr(build, "_AFTER_UNIT", lambda split, unit: finished.append((split, unit)))
  prepare.prepare("mvimgnet", raw["mvimgnet"], out, CFG, progress=False)
  assert finished == [("train", 0), ("val", 0)]
  assert _bytes(out) == _bytes(ref)  # identical to the uninterrupted build
  assert not list(work.glob("unit-*"))  # work files cleaned up
  # A finished build is not redone; a changed build is refused without --overwrite.
  finished.clear()
  prepare.prepare("mvimgnet", raw["mvimgnet"], out, CFG, progress=False)
  assert finished == []
  bigger = dataclasses.replace(CFG, generator_size=48)
  with pytest.raises(UserError, match="--overwrite"):
    prepare.prepare("mvimgnet", raw["mvimgnet"], out, bigger, progress=False)
  prepare.prepare("mvimgnet", raw["mvimgnet"], out, bigger, progress=False, overwrite=True)
  assert prepared.sizes(out) == (E, 48)
  with pytest.raises(UserError, match="same --encoder-size"):  # val would not match train
    prepare.prepare("mvimgnet", raw["mvimgnet"], out, CFG, split="train", overwrite=True)


def test_damaged_files_are_skipped_and_counted(raw, tmp_path):
  root = _copy(raw["mvimgnet"], tmp_path)
  faults = synthetic.inject_faults(root, "mvimgnet", corrupt_image=1, mask_size_mismatch=1,
                                   empty_mask=1, unreadable_folder=1, seed=1)
  assert all(len(v) == 1 for v in faults.values())
  # A mask that cannot be decoded at all, and a mask that is missing.
  groups, _ = READERS["mvimgnet"].list_groups(root)
  frames = [f for g in groups if (root / g.key / "images").is_dir()
            for f in READERS["mvimgnet"].group_frames(root, g)]
  untouched = [f for f in frames if f.image not in faults["corrupt_image"]
               and f.mask not in faults["mask_size_mismatch"] + faults["empty_mask"]]
  (root / untouched[0].mask).write_bytes(b"not a png")
  (root / untouched[1].mask).unlink()
  summary = prepare.prepare("mvimgnet", root, tmp_path / "out", CFG, progress=False)
  # With views gone, an object may keep no two views within the window: counted apart.
  files = {k: v for k, v in summary["skipped"].items() if k != "instance_without_pair"}
  assert files == {"corrupt_image": 1, "mask_size_mismatch": 1, "empty_mask": 1,
                   "unreadable_folder": 1, "corrupt_mask": 1, "missing_mask": 1}
  on_disk = json.loads((tmp_path / "out" / prepare.SUMMARY_FILE).read_text())
  assert on_disk["skipped"] == summary["skipped"]
  assert sum(s["pairs"] for s in summary["splits"].values()) > 0


def test_damaged_video_dataset_does_not_crash(raw, tmp_path):
  root = _copy(raw["youtube_vos"], tmp_path)
  synthetic.inject_faults(root, "youtube_vos", corrupt_image=2, mask_size_mismatch=1,
                          empty_mask=1, unreadable_folder=1, seed=2)
  summary = prepare.prepare("youtube_vos", root, tmp_path / "out", CFG, progress=False)
  skipped = summary["skipped"]
  assert skipped["corrupt_image"] == 2 and skipped["mask_size_mismatch"] == 1
  assert skipped["unreadable_folder"] == 1
  assert skipped["empty_mask"] == SYN.objects  # both objects listed in the cleared frame


def test_vipseg_release_layout_matches_coco_layout(raw, tmp_path):
  root = _copy(raw["vipseg"], tmp_path)
  (root / "panoptic_gt_VIPSeg.json").unlink()  # now only imgs/ + 16-bit panomasks/
  summary = prepare.prepare("vipseg", root, tmp_path / "out", CFG, progress=False)
  assert sum(s["pairs"] for s in summary["splits"].values()) == _closed_form("vipseg")
  ds = tfds.builder_from_directory(tmp_path / "out").as_data_source(split="train")
  # Instances are things only (value = category * 100 + k >= 125), never stuff.
  assert all(int(ds[i]["object_id"].decode().split("#")[1]) >= 125 for i in range(len(ds)))


def test_user_errors(raw, tmp_path):
  with pytest.raises(UserError, match="--source 'coco' is unknown"):
    prepare_cli.run(_parse(["--source", "coco", "--root", str(tmp_path), "--out", str(tmp_path)]))
  with pytest.raises(UserError, match="does not exist"):
    prepare_cli.run(_parse(_argv(tmp_path / "nowhere", tmp_path / "out")))
  with pytest.raises(UserError, match="--root is required"):
    prepare_cli.run(_parse(["--source", "images", "--out", str(tmp_path / "o")]))
  with pytest.raises(UserError, match="meta.json"):  # a folder in the wrong layout
    prepare.prepare("youtube_vos", raw["images"], tmp_path / "o", CFG)
  with pytest.raises(UserError, match="test pairs only"):
    prepare.prepare("dreambooth", raw["dreambooth"], tmp_path / "o", CFG, split="train")
  with pytest.raises(UserError, match="--max-area"):
    prepare.prepare("images", raw["images"], tmp_path / "o",
                    prepare.PrepareConfig(min_area=0.5, max_area=0.1))


def test_split_assignment_is_by_group_and_stable():
  groups = [common.Group(f"g{i}") for i in range(50)]
  cfg = prepare.PrepareConfig(val_fraction=0.2, seed=1)
  plan = prepare.assign_splits("images", groups, cfg)
  assert len(plan["val"]) == 10 and len(plan["train"]) == 40
  assert not {g.key for g in plan["val"]} & {g.key for g in plan["train"]}
  assert prepare.assign_splits("images", groups[::-1], cfg) == plan  # input order is irrelevant
  other = prepare.assign_splits("images", groups, prepare.PrepareConfig(val_fraction=0.2, seed=2))
  assert {g.key for g in other["val"]} != {g.key for g in plan["val"]}
  tiny = prepare.assign_splits("images", groups[:2], prepare.PrepareConfig(val_fraction=0.01))
  assert len(tiny["val"]) == 1 and len(tiny["train"]) == 1


def test_crop_geometry():
  # Shifted inside the frame, never shrunk below the context square when it fits.
  assert crops.target_window((0, 0, 10, 10), 100, 80, 2.0) == (0, 0, 20)
  assert crops.target_window((90, 70, 100, 80), 100, 80, 2.0) == (80, 60, 20)
  assert crops.target_window((40, 30, 50, 40), 100, 80, 10.0) == (5, 0, 80)
  # A box longer than the frame's short side: the square overhangs only that axis.
  assert crops.target_window((10, 20, 90, 40), 100, 60, 2.0) == (10, -10, 80)
  image = np.full((60, 100, 3), 100, np.uint8)
  mask = np.zeros((60, 100), bool)
  mask[20:40, 10:90] = True
  tgt, tgt_mask, box = crops.target_crop(image, mask, 40, 2.0)
  assert (tgt[:4] == 0).all() and (tgt[-4:] == 0).all()  # padding rows (0-4, 35-39) are black
  assert np.abs(tgt[8:32].astype(int) - 100).max() <= 3  # the frame (Lanczos rings at edges)
  np.testing.assert_allclose(box, [0, 15 / 40, 1, 25 / 40])
  mask[:] = False
  mask[0:60, 10:30] = True
  obj, obj_mask = crops.object_crop(image, mask, 30)
  assert (obj[:, :5] == schema.OBJECT_FILL).all() and (obj_mask[:, :5] == 0).all()
  assert (obj_mask[:, 10:20] == 255).all()
  # Test crops: the rasterised box and the stored box agree within a pixel.
  tgt, tgt_mask, box = crops.box_target_crop(np.zeros((90, 120, 3), np.uint8), (30, 20, 61, 50),
                                             48, 2.0)
  ys, xs = np.nonzero(tgt_mask[..., 0])
  np.testing.assert_allclose(box * 48, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1)


def test_filters():
  kw = dict(min_area=0.01, max_area=0.5, min_size=4, min_connected=0.8)
  m = np.zeros((100, 100), bool)
  assert crops.filter_reason(m, **kw) == "empty_mask"
  m[10:13, 10:13] = True
  assert crops.filter_reason(m, **kw) == "area_too_small"
  m[10:90, 10:90] = True
  assert crops.filter_reason(m, **kw) == "area_too_large"
  m[:] = False
  m[0:100, 0:3] = True
  assert crops.filter_reason(m, **kw) == "too_small"
  m[:] = False
  m[10:30, 10:30] = True
  m[60:80, 60:80] = True  # two equal parts: the largest holds half of the mask
  assert crops.filter_reason(m, **kw) == "disconnected"
  m[60:80, 60:80] = False
  assert crops.filter_reason(m, **kw) is None


def test_write_dataset_readers(tmp_path):
  rng = np.random.default_rng(0)

  def record(i):
    tm = np.zeros((G, G, 1), np.uint8)
    tm[8:24, 4:40] = 255
    return {"object": rng.integers(0, 256, (E, E, 3), np.uint8),
            "object_mask": np.full((E, E), 255, np.uint8),
            "target": rng.integers(0, 256, (G, G, 3), np.uint8), "target_mask": tm,
            "box": [4 / G, 8 / G, 40 / G, 24 / G], "source": "images", "kind": "image",
            "object_id": f"o{i}", "target_id": f"t{i}", "pair_id": i}

  records = [record(i) for i in range(7)]
  assert shards.write_dataset(tmp_path, "train", records, encoder_size=E, generator_size=G,
                              num_shards=3) == [2, 2, 3]
  shards.write_dataset(tmp_path, "val", records[:2], encoder_size=E, generator_size=G)
  ds = tfds.builder_from_directory(tmp_path).as_data_source(split="train")
  raw_ds = grain.sources.ArrayRecordDataSource(prepared.shard_paths(tmp_path, "train"))
  features = prepared.load_features(tmp_path)
  assert len(ds) == len(raw_ds) == 7 and prepared.split_sizes(tmp_path) == {"train": 7, "val": 2}
  for i in (0, 6):
    for ex in (ds[i], features.deserialize_example_np(raw_ds[i])):
      np.testing.assert_array_equal(ex["target"], records[i]["target"])
      np.testing.assert_array_equal(ex["object_mask"][..., 0], records[i]["object_mask"])
      assert ex["object_id"] == f"o{i}".encode() and ex["pair_id"] == i
  with pytest.raises(ValueError, match="target_mask"):
    bad = dict(records[0], target_mask=np.ones((G, G, 1), np.uint8))
    shards.write_dataset(tmp_path, "bad", [bad], encoder_size=E, generator_size=G)


def test_synthetic_is_deterministic(tmp_path):
  small = synthetic.SyntheticConfig(groups=2, frames=3, frame_size=64, seed=5)

  def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}

  a = synthetic.generate(tmp_path / "a", small, layouts=("vipseg", "dreambooth"))
  b = synthetic.generate(tmp_path / "b", small, layouts=("vipseg", "dreambooth"))
  assert digest(a["vipseg"]) == digest(b["vipseg"]) and digest(a["dreambooth"]) == digest(
      b["dreambooth"])
  c = synthetic.generate(tmp_path / "c", dataclasses.replace(small, seed=6), layouts=("vipseg",))
  assert digest(c["vipseg"]) != digest(a["vipseg"])


def test_synthetic_source_via_main(tmp_path, capsys):
  args = _parse(["--source", "synthetic", "--out", str(tmp_path), "--synthetic-groups", "1",
                 "--synthetic-frame-size", "48"])
  assert prepare_cli.run(args) == 0
  assert "--source mvimgnet" in capsys.readouterr().out
  assert (tmp_path / "youtube_vos" / "train" / "meta.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(synthetic.LAYOUTS)


def test_everything_filtered_out(raw, tmp_path):
  strict = dataclasses.replace(CFG, min_area=0.9, max_area=1.0)
  summary = prepare.prepare("images", raw["images"], tmp_path / "out", strict, progress=False)
  assert {k: v["pairs"] for k, v in summary["splits"].items()} == {"train": 0, "val": 0}
  assert summary["skipped"] == {"area_too_small": SYN.groups * SYN.objects}
  assert "train 0 pairs" in prepare.format_summary(summary)
  assert not _bytes(tmp_path / "out")  # no unreadable empty split is published


def test_exif_orientation_is_applied(tmp_path):
  pixels = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high
  pixels[:, :10] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # displayed rotated by 90 degrees: 20 wide, 40 high
  Image.fromarray(pixels).save(tmp_path / "a.jpg", exif=exif.tobytes(), quality=95)
  assert crops.check_image(tmp_path / "a.jpg") == (20, 40)
  image = crops.load_image(tmp_path / "a.jpg")
  assert image.shape == (40, 20, 3)
  assert image[:8].mean() > 200 and image[12:].mean() < 50  # the white band is now on top


def test_source_names_are_the_readers_and_synthetic():
  """`prepare --help` lists SOURCES without importing the readers: the list must match them."""
  assert SOURCES == (*READERS, "synthetic")
