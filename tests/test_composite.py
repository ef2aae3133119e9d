"""Compositing: seeded reproducibility, the exact background outside the feathered region, mask
levels and boxes, input formats, batch mode (resume, status file, grids) and bad input.

The model is the tiny random stage-2 IMPRINT (configs/common.py `tiny_model()` with a 9-channel
UNet). E = 56 and G = 32 (not 64): the VAE's mid-block attention at 64 px makes each device call
~10x slower on a shared 2-core CPU. Every generation here uses the same static setting (all local
devices, batch 8, 2 DDIM steps, guidance 5), so the sampler is compiled once for the file.
Classifier-free guidance at scale 1 equalling the conditional prediction is tested at the sampler
level: tests/test_sampling.py::test_cfg_at_scale_one_is_the_conditional_prediction.
"""

import contextlib
import json
import struct
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from scipy import ndimage

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.cli import composite as composite_cli
from imprint_jax import compositing
from imprint_jax.compositing import engine
from imprint_jax.data import schema
from imprint_jax.errors import UserError
from imprint_jax.models.adapter import AdapterConfig
from imprint_jax.models.dinov2 import Dinov2Config
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.models.unet import UNetConfig
from imprint_jax.models.vae import VAEConfig

E, G, STEPS = 56, 32, 2
BG_H, BG_W = 90, 120


def _tiny_config(in_channels: int) -> ImprintConfig:
  return ImprintConfig(
      dinov2=Dinov2Config(hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2.0,
                          patch_size=14, image_size=56, num_register_tokens=4),
      adapter=AdapterConfig(in_dim=32, width=32, depth=2, num_heads=1, out_dim=32),
      unet=UNetConfig(in_channels=in_channels, out_channels=4, sample_size=G // 2,
                      block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                      attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8),
      vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    sample_size=G))


def _random_model(cfg: ImprintConfig, seed: int) -> Imprint:
  """`Imprint(cfg)` with random weights, filled in numpy: an eager nnx init dispatches
  thousands of tiny ops (over a minute on a shared 2-core CPU)."""
  abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = str(path[-1].key)
    if name == "scale":
      v = 1.0 + 0.1 * rng.standard_normal(x.shape)
    elif name == "bias":
      v = 0.02 * rng.standard_normal(x.shape)
    else:
      v = rng.standard_normal(x.shape) / np.sqrt(max(1, int(np.prod(x.shape[:-1]))))
    return np.asarray(v, np.float32)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


META = {"stage": 2, "step": 0, "config": {"data": {"encoder_size": E, "generator_size": G}}}


@pytest.fixture(scope="module")
def model():
  return _random_model(_tiny_config(9), seed=0)


@pytest.fixture(scope="module")
def comp(model):
  return compositing.Compositor(model, encoder_size=E, generator_size=G)


@pytest.fixture(scope="module")
def ckpts(model, tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  stage1_model = _random_model(_tiny_config(4), seed=1)
  stage2 = ckpt_lib.save_model(root / "stage2", model, META)
  stage1 = ckpt_lib.save_model(root / "stage1", stage1_model, dict(META, stage=1))
  return {"stage2": stage2, "stage1": stage1, "stage1_model": stage1_model}


def _object_rgba(rng) -> np.ndarray:
  """A 40x30 object: an opaque ellipse with random colours on a transparent canvas."""
  h, w = 40, 30
  yy, xx = np.mgrid[:h, :w]
  inside = ((xx - 15) / 12) ** 2 + ((yy - 20) / 17) ** 2 < 1
  rgba = np.zeros((h, w, 4), np.uint8)
  rgba[..., :3] = rng.integers(0, 255, (h, w, 3))
  rgba[..., 3] = inside * 255
  return rgba


def _region_mask() -> np.ndarray:
  yy, xx = np.mgrid[:BG_H, :BG_W]
  return ((xx - 55) / 16) ** 2 + ((yy - 45) / 22) ** 2 < 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  bg = rng.integers(0, 255, (BG_H, BG_W, 3), np.uint8)
  paths = {"bg": root / "bg.png", "obj": root / "obj.png", "mask": root / "mask.png"}
  Image.fromarray(bg).save(paths["bg"])
  Image.fromarray(_object_rgba(rng)).save(paths["obj"])
  Image.fromarray(_region_mask().astype(np.uint8) * 255).save(paths["mask"])
  (root / "notes.png").write_text("not an image")
  paths["not_image"] = root / "notes.png"
  Image.fromarray(np.full((50, 60), 255, np.uint8)).save(root / "small_mask.png")
  paths["small_mask"] = root / "small_mask.png"
  Image.fromarray(np.zeros((BG_H, BG_W), np.uint8)).save(root / "empty_mask.png")
  paths["empty_mask"] = root / "empty_mask.png"
  return paths


def test_per_element_keys_draw_each_row_alone():
  """generate.composite_latents takes one key per row: row i's noise is that of key i alone."""
  from imprint_jax.diffusion import generate
  keys = np.stack([np.asarray(jax.random.PRNGKey(i)) for i in range(3)])
  rows, first, second = jax.jit(lambda k: (generate._normal(k, (3, 4, 4, 2)),
                                           *generate._split2(k)))(keys)
  for i in range(3):
    np.testing.assert_array_equal(rows[i], jax.random.normal(keys[i], (4, 4, 2)))
    np.testing.assert_array_equal(np.stack([first[i], second[i]]), jax.random.split(keys[i]))
  one = keys[0]  # a single key still draws the whole batch at once
  np.testing.assert_array_equal(generate._normal(one, (3, 4, 4, 2)),
                                jax.random.normal(one, (3, 4, 4, 2)))


@contextlib.contextmanager
def _traces():
  """Collects the traces of the engine's batch program (`composite_batch`) inside the block,
  from jax.monitoring's trace event; the program is cached process-wide, so a new Compositor
  of the same architecture (e.g. the CLI's) traces nothing for a batch shape seen before."""
  seen = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_trace_duration" and kw.get("fun_name") == (
        "composite_batch"):
      seen.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _far_from(region: np.ndarray, feather: float) -> np.ndarray:
  """Pixels farther than `feather` from the region (Euclidean, pixel centres)."""
  return ndimage.distance_transform_edt(~region) > feather


@pytest.fixture(scope="module")
def first(comp, files):
  """One composite (2 samples, seed 3), a repeat, and the traces of the repeat."""
  kw = dict(mask=files["mask"], steps=STEPS, guidance=5.0, seed=3, num_samples=2)
  out1 = compositing.composite(comp, files["obj"], files["bg"], **kw)
  with _traces() as traces:
    out2 = compositing.composite(comp, files["obj"], files["bg"], **kw)
  return {"out1": out1, "out2": out2, "retraces": len(traces),
          "job": comp.prepare(files["obj"], files["bg"], mask=files["mask"], seed=3)}


def test_same_seed_same_output_without_retracing(first, files):
  out1, out2 = first["out1"], first["out2"]
  assert len(out1) == 2
  for a, b in zip(out1, out2):
    assert a.shape == (BG_H, BG_W, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  # Two samples of one job differ (noise fold_in(seed, k)) inside the region.
  region = _region_mask()
  assert (out1[0][region] != out1[1][region]).mean() > 0.5
  assert first["retraces"] == 0, "the second call with the same shapes retraced"


def test_trace_count_sees_a_new_batch_shape(comp):
  """The retrace checks count real traces: a batch shape no test runs traces the program once
  (lowered only, not compiled)."""
  fn = engine.program(comp.graphdef, comp.mesh, STEPS, "ddim", comp.prediction_type, True)
  b = 3 * comp.num_devices

  def arg(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)

  with _traces() as traces:
    fn.lower(comp.state, arg(b, E, E, 3), arg(b, G, G, 3), arg(b, G, G, 1),
             arg(b, dtype=jnp.uint32), arg(b, dtype=jnp.uint32), arg(), arg())
  assert len(traces) == 1


def test_background_is_exact_beyond_the_feather(first, files):
  bg = np.asarray(Image.open(files["bg"]))
  job = first["job"]
  side = job.window[2]
  assert job.feather == max(3.0, round(0.02 * side)) == 3.0
  region = _region_mask()
  np.testing.assert_array_equal(job.region, region)  # level 1: the mask as given
  far = _far_from(region, job.feather)
  for out in first["out1"]:
    np.testing.assert_array_equal(out[far], bg[far])
    # Inside the region the generated crop replaced the background.
    assert (out[region] != bg[region]).any(axis=-1).mean() > 0.9


def test_paste_blends_only_within_the_feather():
  rng = np.random.default_rng(1)
  bg = rng.integers(0, 255, (70, 100, 3), np.uint8)
  region = np.zeros((70, 100), bool)
  region[20:40, 30:60] = True
  window = (10, 0, 70)  # x0, y0, side: a 70 px square containing the region
  crop = np.full((G, G, 3), 7, np.uint8)  # a flat crop resizes to itself
  out = compositing.paste(bg, crop, window, region, feather=5.0)
  d = ndimage.distance_transform_edt(~region)
  np.testing.assert_array_equal(out[region], 7)
  np.testing.assert_array_equal(out[d >= 5], bg[d >= 5])
  ring = (d > 0) & (d < 5)
  a = (1 - d[ring] / 5)[:, None]
  np.testing.assert_allclose(out[ring], np.rint(bg[ring] * (1 - a) + 7 * a), atol=0.5)
  # feather 0: a hard paste of the region only.
  hard = compositing.paste(bg, crop, window, region, feather=0.0)
  np.testing.assert_array_equal(hard[~region], bg[~region])
  # A region touching the window edge: nothing changes outside the window.
  region2 = np.zeros((70, 100), bool)
  region2[10:30, 75:80] = True
  out2 = compositing.paste(bg, crop, window, region2, feather=5.0)
  np.testing.assert_array_equal(out2[:, 80:], bg[:, 80:])


def test_box_and_every_mask_level_in_one_batch(comp, files, first):
  mask = _region_mask()
  jobs = [comp.prepare(files["obj"], files["bg"], mask=files["mask"], mask_level=level, seed=3)
          for level in (1, 2, 3, 4)]
  box = (30, 15, 80, 75)
  jobs.append(comp.prepare(files["obj"], files["bg"], box=box, seed=5))
  with _traces() as traces:
    results = comp.run(jobs, steps=STEPS, guidance=5.0, batch_size=8)
  assert not traces  # same batch shape: no new trace
  regions = [j.region for j in jobs]
  ys, xs = np.nonzero(mask)
  tight = np.zeros_like(mask)
  tight[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
  np.testing.assert_array_equal(regions[0], mask)
  np.testing.assert_array_equal(regions[3], tight)
  for finer, coarser in zip(regions, regions[1:4]):
    assert not (finer & ~coarser).any()
  assert regions[0].sum() < regions[1].sum() <= regions[2].sum() < regions[3].sum()
  assert [j.mask_level for j in jobs] == [1, 2, 3, 4, 4]
  boxed = np.zeros_like(mask)
  boxed[15:75, 30:80] = True
  np.testing.assert_array_equal(regions[4], boxed)
  bg = np.asarray(Image.open(files["bg"]))
  for job, (out,) in zip(jobs, results):
    assert out.shape == (BG_H, BG_W, 3)
    far = _far_from(job.region, job.feather)
    np.testing.assert_array_equal(out[far], bg[far])
    assert (out[job.region] != bg[job.region]).any(axis=-1).mean() > 0.9
  # The level-1 job (seed 3, sample 0) shares its batch with other jobs here and was alone
  # (with its second sample) before: its noise depends on its own seed only, and on CPU the
  # rest of the computation is row-independent too (bit-identical).
  np.testing.assert_array_equal(results[0][0], first["out1"][0])


def _png_rgb16(path: Path, rgb16: np.ndarray) -> None:
  """Writes a 16-bit RGB PNG (PIL cannot make one from an array)."""
  h, w, _ = rgb16.shape
  raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2,
                                                                    0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_input_formats(comp, tmp_path):
  rng = np.random.default_rng(7)
  # 16-bit grayscale: scaled, not clipped.
  g16 = rng.integers(0, 65536, (BG_H, BG_W), dtype=np.uint16)
  Image.fromarray(g16).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode == "I;16"
  rgb, alpha = compositing.load_image(tmp_path / "g16.png")
  expect = np.rint(g16 / 257.0).astype(np.uint8)
  assert alpha is None
  np.testing.assert_array_equal(rgb, np.repeat(expect[..., None], 3, axis=2))
  # 16-bit RGB.
  rgb16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
  _png_rgb16(tmp_path / "rgb16.png", rgb16)
  rgb, _ = compositing.load_image(tmp_path / "rgb16.png")
  assert np.abs(rgb.astype(int) - rgb16 / 257.0).max() <= 1.0
  # Grayscale (L) background.
  gray = rng.integers(0, 255, (BG_H, BG_W), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "gray.png")
  # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 120x90, shown 90x120.
  stored = rng.integers(0, 255, (BG_W, BG_H, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=100)
  rot, _ = compositing.load_image(tmp_path / "rot.jpg")
  decoded = np.asarray(Image.open(tmp_path / "rot.jpg").convert("RGB"))
  np.testing.assert_array_equal(rot, np.rot90(decoded, k=-1))
  assert rot.shape == (BG_H, BG_W, 3)
  # A mask stored rotated with the same EXIF tag lines up with the rotated background.
  Image.fromarray(np.rot90(_region_mask(), k=1).astype(np.uint8) * 255).save(
      tmp_path / "rot_mask.png", exif=exif)
  np.testing.assert_array_equal(compositing.load_mask(tmp_path / "rot_mask.png"),
                                _region_mask())
  # RGBA object: alpha segments it; palette object with a transparent index likewise.
  obj = _object_rgba(rng)
  Image.fromarray(obj).save(tmp_path / "obj.png")
  index = rng.integers(1, 16, obj.shape[:2]).astype(np.uint8)
  index[obj[..., 3] == 0] = 0
  pal = Image.fromarray(index)
  pal.putpalette(rng.integers(0, 255, 48).astype(np.uint8).tobytes())
  assert pal.mode == "P"
  pal.save(tmp_path / "obj_p.png", transparency=0)

  jobs = [
      comp.prepare(tmp_path / "obj.png", tmp_path / "g16.png", mask=_region_mask(), seed=1),
      comp.prepare(tmp_path / "obj_p.png", tmp_path / "gray.png", mask=_region_mask(), seed=1),
      comp.prepare(Image.open(tmp_path / "obj.png"), tmp_path / "rot.jpg",
                   mask=tmp_path / "rot_mask.png", seed=1),
      comp.prepare(obj[..., :3], Image.fromarray(gray), mask=_region_mask(), seed=1,
                   object_mask=obj[..., 3] > 0),
  ]
  # The object crop is the alpha-segmented object on white, the same however it was given.
  np.testing.assert_array_equal(jobs[0].object_crop, jobs[2].object_crop)
  np.testing.assert_array_equal(jobs[0].object_crop, jobs[3].object_crop)
  for job in jobs[:2]:
    crop = job.object_crop
    assert 0.1 < np.all(crop == schema.OBJECT_FILL, axis=-1).mean() < 0.9
    for corner in (crop[:5, :5], crop[:5, -5:], crop[-5:, :5], crop[-5:, -5:]):
      assert np.all(corner == schema.OBJECT_FILL)  # outside the ellipse
    centre = crop[E // 2 - 3:E // 2 + 3, E // 2 - 3:E // 2 + 3]
    assert not np.all(centre == schema.OBJECT_FILL, axis=-1).any()  # colours < 255: object
  results = comp.run(jobs, steps=STEPS, guidance=5.0, batch_size=8)
  far = _far_from(_region_mask(), jobs[0].feather)
  np.testing.assert_array_equal(results[0][0][far], np.repeat(expect[..., None], 3, 2)[far])
  np.testing.assert_array_equal(results[1][0][far], np.repeat(gray[..., None], 3, 2)[far])
  np.testing.assert_array_equal(results[2][0][far], rot[far])
  for (out,) in results:
    assert out.shape == (BG_H, BG_W, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# The command line.


def _args(*argv):
  return composite_cli.build_parser().parse_args([str(a) for a in argv])


def test_cli_single_writes_the_library_result(ckpts, files, first, tmp_path):
  out = tmp_path / "out" / "result.png"
  with _traces() as traces:
    code = composite_cli.main(_args("--ckpt", ckpts["stage2"], "--object", files["obj"],
                                    "--background", files["bg"], "--mask", files["mask"],
                                    "--out", out, "--steps", STEPS, "--seed", 3,
                                    "--num-samples", 2))
  assert code == 0
  # The loaded model has the in-memory one's architecture: the compiled sampler is reused.
  assert not traces
  assert not out.exists()
  for k in range(2):
    written = np.asarray(Image.open(tmp_path / "out" / f"result_{k}.png"))
    np.testing.assert_array_equal(written, first["out1"][k])  # lossless, same seed, same model
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result_0.png", "result_1.png"]


def _manifest(path: Path, files, extra_lines=()) -> Path:
  lines = [json.dumps({"object": str(files["obj"]), "background": str(files["bg"]),
                       "mask": str(files["mask"]), "seed": 3}),
           json.dumps({"id": "boxed", "object": "obj.png", "background": "bg.png",
                       "box": [30, 15, 80, 75], "mask_level": 4}),
           json.dumps({"id": "missing", "object": "nope.png", "background": "bg.png",
                       "box": "1,1,20,20"}),
           "{not json", *extra_lines]
  path.write_text("\n".join(lines) + "\n")
  return path


def _status(out_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (out_dir / "status.jsonl").read_text().splitlines()]


def test_cli_batch_mode_resumes_and_reports_bad_jobs(ckpts, files, first, tmp_path):
  # The manifest sits next to the inputs: relative paths resolve against its folder.
  manifest = _manifest(files["bg"].parent / "jobs.jsonl", files)
  out_dir = tmp_path / "batch"
  argv = ("--ckpt", ckpts["stage2"], "--manifest", manifest, "--out", out_dir,
          "--steps", STEPS, "--batch-size", 8)
  assert composite_cli.main(_args(*argv)) == 1  # a job failed
  status = {r["id"]: r for r in _status(out_dir)}
  assert status["000001"]["status"] == "ok" and status["boxed"]["status"] == "ok"
  assert status["missing"]["status"] == "error" and "nope.png: no such file" in (
      status["missing"]["error"])
  assert status["000004"]["status"] == "error" and "not valid JSON" in status["000004"]["error"]
  np.testing.assert_array_equal(np.asarray(Image.open(out_dir / "000001.png")),
                                first["out1"][0])
  grid = np.asarray(Image.open(out_dir / "boxed_grid.png"))
  assert grid.shape[0] == 256 and grid.shape[1] > 3 * 200
  assert sorted(p.name for p in out_dir.iterdir()) == [
      "000001.png", "000001_grid.png", "boxed.png", "boxed_grid.png", "status.jsonl"]

  # Resume: finished jobs are skipped (files untouched), failed ones retried.
  stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.png")}
  with _traces() as traces:
    assert composite_cli.main(_args(*argv)) == 1
  assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.png")} == stamps
  assert not traces
  retried = _status(out_dir)[4:]
  assert sorted(r["id"] for r in retried) == ["000004", "missing"]

  # Without the bad lines everything is done: exit 0, nothing rewritten.
  manifest.write_text("\n".join(manifest.read_text().splitlines()[:2]) + "\n")
  assert composite_cli.main(_args(*argv)) == 0
  assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.png")} == stamps


BAD = {
    "missing object": (["--object", "{dir}/nope.png"], "object image .*nope.png: no such file"),
    "not an image": (["--background", "{not_image}"], "background .*notes.png: not an image"),
    "mask size": (["--mask", "{small_mask}"], "size 60x50 differs from the background's 120x90"),
    "empty mask": (["--mask", "{empty_mask}"], "empty_mask.png is empty"),
    "box outside": (["--mask", None, "--box", "100,10,130,50"], "outside the 120x90 background"),
    "empty box": (["--mask", None, "--box", "40,10,40,50"], r"box \(40,10,40,50\) is empty"),
    "stage 1": (["--ckpt", "{stage1}"], "a stage-1 checkpoint"),
    "bad extension": (["--out", "{out_dir}/result.xyz"], "unknown image extension"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input_is_one_line_and_writes_nothing(case, ckpts, files, tmp_path):
  fields = {"dir": files["bg"].parent, "stage1": ckpts["stage1"], "out_dir": tmp_path,
            **{k: v for k, v in files.items()}}
  opts = {"--ckpt": str(ckpts["stage2"]), "--object": str(files["obj"]),
          "--background": str(files["bg"]), "--mask": str(files["mask"]),
          "--out": str(tmp_path / "result.png")}
  changes, needle = BAD[case]
  for flag, value in zip(changes[::2], changes[1::2]):
    opts[flag] = None if value is None else value.format(**fields)
  argv = [x for flag, value in opts.items() if value is not None for x in (flag, value)]
  with pytest.raises(UserError, match=needle) as info:
    composite_cli.main(_args(*argv, "--steps", STEPS))
  assert "\n" not in str(info.value)
  assert UserError.exit_code == 2  # what `imprint-jax` exits with on a UserError
  assert list(tmp_path.iterdir()) == []


def test_library_rejects_bad_models_and_arguments(ckpts, model, files):
  with pytest.raises(UserError, match="a stage-1 checkpoint"):
    compositing.Compositor.from_checkpoint(ckpts["stage1"])
  with pytest.raises(UserError, match="stage-2"):
    compositing.Compositor(ckpts["stage1_model"])
  kw = dict(steps=STEPS, encoder_size=E, generator_size=G)
  with pytest.raises(UserError, match="exactly one of a mask"):
    compositing.composite(model, files["obj"], files["bg"], **kw)
  with pytest.raises(UserError, match="a box is shape guidance level 4"):
    compositing.composite(model, files["obj"], files["bg"], box=(1, 1, 9, 9), mask_level=2,
                          **kw)
  with pytest.raises(UserError, match="sampler 'euler'"):
    compositing.composite(model, files["obj"], files["bg"], box=(1, 1, 9, 9), sampler="euler",
                          **kw)
  transparent = np.zeros((10, 10, 4), np.uint8)
  with pytest.raises(UserError, match="fully transparent"):
    compositing.composite(model, transparent, files["bg"], box=(1, 1, 9, 9), **kw)


@pytest.mark.slow  # a second compilation (bfloat16), ~30 s on CPU
def test_bfloat16_compute(model, files):
  comp16 = compositing.Compositor(model, encoder_size=E, generator_size=G, dtype="bfloat16")
  merged = nnx.merge(comp16.graphdef, comp16.state)
  assert merged.cfg.unet.dtype == merged.cfg.vae.dtype == "bfloat16"
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(comp16.state))  # params stay f32
  job = comp16.prepare(files["obj"], files["bg"], mask=files["mask"], seed=3)
  (out,), = comp16.run([job], steps=STEPS, guidance=5.0)
  bg = np.asarray(Image.open(files["bg"]))
  far = _far_from(job.region, job.feather)
  np.testing.assert_array_equal(out[far], bg[far])
  assert (out[job.region] != bg[job.region]).any(axis=-1).mean() > 0.9


# ---------------------------------------------------------------------------------------------
# At scale: parameter dtype and placement, several hosts.


def _split_compositor(ckpts):
  return compositing.Compositor.from_checkpoint(ckpts["stage2"], shard_params="always",
                                                encoder_size=E, generator_size=G)


def test_sharded_params_are_split_over_the_devices(ckpts, comp):
  """--shard-params always: each large weight split over the 8 devices (fsdp-style) as it is
  restored, the same values as the replicated model's."""
  split = _split_compositor(ckpts)
  assert not comp.sharded and split.sharded and split.mesh.shape["fsdp"] == 8
  leaves = jax.tree.leaves(split.state)
  assert sum(not x.sharding.is_fully_replicated for x in leaves) > len(leaves) // 2
  assert split.param_bytes < 0.25 * comp.param_bytes
  for a, b in zip(jax.tree.leaves(comp.state), leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # compiling the split model's sampler for 8 devices: 60-90 s on this CPU
def test_sharded_params_give_the_replicated_composite(ckpts, files, first, tmp_path):
  """The batch still split over the 8 devices, weights gathered where used: the composite is
  the replicated model's."""
  split = _split_compositor(ckpts)
  kw = dict(mask=files["mask"], steps=STEPS, guidance=5.0, seed=3, num_samples=2)
  out = compositing.composite(split, files["obj"], files["bg"], **kw)
  for a, b in zip(out, first["out1"]):
    np.testing.assert_array_equal(a, b)
  # The same through the CLI flag (the compiled sampler of `split` is reused).
  path = tmp_path / "r.png"
  with _traces() as traces:
    assert composite_cli.main(_args("--ckpt", ckpts["stage2"], "--object", files["obj"],
                                    "--background", files["bg"], "--mask", files["mask"],
                                    "--out", path, "--steps", STEPS, "--seed", 3,
                                    "--shard-params", "always")) == 0
  assert not traces
  np.testing.assert_array_equal(np.asarray(Image.open(path)), first["out1"][0])


def test_bfloat16_params_are_cast_once_at_load(ckpts, model, files):
  comp = compositing.Compositor.from_checkpoint(ckpts["stage2"], param_dtype="bfloat16",
                                                encoder_size=E, generator_size=G)
  ref = nnx.to_pure_dict(nnx.state(model))
  got = comp.state
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype("bfloat16")}
  f32 = sum(x.size * 4 for x in jax.tree.leaves(ref))
  assert comp.param_bytes == f32 // 2  # replicated: one device holds all of them
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))
  # From an in-memory model too; a Compositor already has its dtype.
  assert {x.dtype for x in jax.tree.leaves(compositing.Compositor(
      model, encoder_size=E, generator_size=G, param_dtype="bfloat16").state)} == {
          jnp.dtype("bfloat16")}
  with pytest.raises(UserError, match="param dtype 'float16'"):
    compositing.Compositor(model, encoder_size=E, generator_size=G, param_dtype="float16")
  with pytest.raises(UserError, match="shard params 'some'"):
    compositing.Compositor(model, encoder_size=E, generator_size=G, shard_params="some")
  for kw in ({"param_dtype": "bfloat16"}, {"shard_params": "never"}):
    with pytest.raises(UserError, match="to the Compositor, not to composite"):
      compositing.composite(comp, files["obj"], files["bg"], box=(1, 1, 9, 9), **kw)


@pytest.mark.slow  # a compilation for bfloat16 parameters, ~25 s on CPU
def test_bfloat16_params_composite(ckpts, files, first):
  comp = compositing.Compositor.from_checkpoint(ckpts["stage2"], param_dtype="bfloat16",
                                                encoder_size=E, generator_size=G)
  out = compositing.composite(comp, files["obj"], files["bg"], mask=files["mask"],
                              steps=STEPS, guidance=5.0, seed=3, num_samples=2)
  for a, b in zip(out, first["out1"]):
    diff = np.abs(a.astype(int) - b)
    assert diff.mean() < 1.0, diff.mean()  # weights rounded to 8 mantissa bits


def test_merge_status_keeps_manifest_order_and_skips_cut_lines(tmp_path):
  (tmp_path / "status.jsonl").write_text('{"id": "a", "line": 9, "status": "ok"}\n')
  (tmp_path / composite_cli.host_status_file(0)).write_text(
      '{"id": "c", "line": 3, "status": "ok"}\n{"id": "e", "line": 5, "status": "error"}\n')
  (tmp_path / composite_cli.host_status_file(1)).write_text(
      '{"id": "b", "line": 2, "status": "ok"}\n{"id": "d", "li')
  composite_cli.merge_status(tmp_path)
  assert [r["id"] for r in _status(tmp_path)] == ["a", "b", "c", "e"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["status.jsonl"]
  assert [j.line for j in composite_cli.host_share(
      [composite_cli._Job(n, str(n), {}, None) for n in range(1, 8)], 1, 3)] == [2, 5]


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_split_the_manifest_like_one(ckpts, files, first, tmp_path):
  """`composite --manifest` in 2 processes (jax.distributed on 127.0.0.1, 4 CPU devices each)
  writes what 1 process writes: every output, one status.jsonl; and resumes the same way."""
  import os
  import subprocess
  import sys
  manifest = _manifest(files["bg"].parent / "jobs_hosts.jsonl", files)
  one = tmp_path / "one"
  argv = ["--ckpt", ckpts["stage2"], "--manifest", manifest, "--steps", STEPS,
          "--batch-size", 8]
  assert composite_cli.main(_args(*argv, "--out", one)) == 1

  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]))
  work = tmp_path / "cwd"
  work.mkdir()

  def hosts():
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "imprint_jax.cli", "composite", *map(str, argv), "--out", "two",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
         str(pid)], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for pid in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 1, out[-3000:]  # each host has one bad manifest line
    return outs

  for out in hosts():  # each host prints the totals over both
    assert "composite: 2 done, 0 skipped (already done), 2 failed" in out, out[-3000:]
  two = work / "two"
  assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
  for name in ("000001.png", "boxed.png"):
    a = np.asarray(Image.open(one / name)).astype(int)
    b = np.asarray(Image.open(two / name)).astype(int)
    assert np.abs(a - b).max() <= 1, name  # 4 devices per process vs 8: same rows
  key = lambda r: (r["line"], r["id"], r["status"], r.get("output"))  # noqa: E731
  assert [key(r) for r in _status(two)] == sorted(key(r) for r in _status(one))

  stamps = {p.name: p.stat().st_mtime_ns for p in two.glob("*.png")}
  for out in hosts():  # resume: done jobs skipped on both hosts, the failed ones retried
    assert "composite: 0 done, 2 skipped (already done), 2 failed" in out, out[-3000:]
  assert {p.name: p.stat().st_mtime_ns for p in two.glob("*.png")} == stamps
  again = _status(two)[4:]
  assert [(r["id"], r["status"]) for r in again] == [("missing", "error"), ("000004", "error")]
