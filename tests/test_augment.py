"""Object augmentation: shapes, identity at zero probability, joint geometry, LUTs, seeding."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from imprint_jax.data import augment, schema
from imprint_jax.errors import UserError
from imprint_jax.train import data as train_data
from imprint_jax.train import run_config

E = 64
COLOUR = np.array([200, 30, 60], np.uint8)
OFF = augment.AugmentConfig(affine_prob=0.0, perspective_prob=0.0, hflip_prob=0.0,
                            colour_prob=0.0, lut_prob=0.0)


def _object(rng, textured=True):
  """A segmented elliptic object, background OBJECT_FILL: (E, E, 3) u8, (E, E, 1) u8."""
  yy, xx = np.mgrid[:E, :E]
  cx, cy = rng.uniform(0.4, 0.6, 2) * E
  a, b = rng.uniform(0.15, 0.3, 2) * E
  m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
  img = np.full((E, E, 3), schema.OBJECT_FILL, np.uint8)
  img[m] = rng.integers(0, 200, (m.sum(), 3)) if textured else COLOUR
  return img, (m * 255).astype(np.uint8)[..., None]


def test_shapes_dtypes_and_background():
  cfg = augment.AugmentConfig().perturb()
  for seed in range(8):
    rng = np.random.default_rng(seed)
    img, mask = _object(rng)
    out, out_mask = augment.augment_object(img, mask, cfg, rng)
    assert out.shape == (E, E, 3) and out.dtype == np.uint8
    assert out_mask.shape == (E, E, 1) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 255} and out_mask.any()
    assert (out[out_mask[..., 0] == 0] == schema.OBJECT_FILL).all()


def test_zero_probabilities_leave_the_object_unchanged():
  rng = np.random.default_rng(0)
  img, mask = _object(rng)
  out, out_mask = augment.augment_object(img, mask, OFF, np.random.default_rng(1))
  np.testing.assert_array_equal(out, img)
  np.testing.assert_array_equal(out_mask, mask)


def test_flip_alone_is_exact():
  img, mask = _object(np.random.default_rng(0))
  cfg = dataclasses.replace(OFF, hflip_prob=1.0)
  out, out_mask = augment.augment_object(img, mask, cfg, np.random.default_rng(1))
  np.testing.assert_array_equal(out, img[:, ::-1])
  np.testing.assert_array_equal(out_mask, mask[:, ::-1])


@pytest.mark.parametrize("seed", range(6))
def test_geometry_moves_image_and_mask_together(seed):
  rng = np.random.default_rng(seed)
  img, mask = _object(rng, textured=False)
  cfg = dataclasses.replace(OFF, affine_prob=1.0, perspective_prob=0.5, hflip_prob=0.5,
                            rotation_deg=40.0, shear_deg=15.0, scale=(0.7, 1.4),
                            perspective=0.15)
  out, out_mask = augment.random_geometry(img, mask, cfg, rng)
  m = out_mask[..., 0] > 0
  assert not np.array_equal(out_mask, mask)  # something moved
  assert (out[~m] == schema.OBJECT_FILL).all()  # re-segmented
  # Every mask pixel holds (at least half) object colour, never bare background: a mask
  # warped differently from the image would show fill colour inside.
  assert (out[m][:, 1] < 160).all()
  # Away from the outline, the object colour is exact (bilinear between object pixels).
  inner = ndimage.binary_erosion(m, iterations=2)
  assert inner.sum() > 50
  assert np.abs(out[inner].astype(int) - COLOUR).max() <= 1
  # The object is kept whole: shrunk if needed, never cut by the canvas border.
  assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_colour_touches_only_the_object():
  rng = np.random.default_rng(3)
  img, mask = _object(rng)
  cfg = dataclasses.replace(OFF, colour_prob=1.0, lut_prob=1.0, lut_strength=0.1)
  out = augment.random_colour(img, mask, cfg, rng)
  m = mask[..., 0] > 0
  np.testing.assert_array_equal(out[~m], img[~m])
  assert np.abs(out[m].astype(int) - img[m]).mean() > 2.0


def test_zero_strength_lut_is_identity_and_lut_is_smooth():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (E, E, 3), dtype=np.uint8)
  ident = augment.random_lut(rng, 17, strength=0.0)
  np.testing.assert_array_equal(augment.apply_lut(img, ident), img)
  lut = augment.random_lut(np.random.default_rng(1), 33, strength=0.1)
  assert lut.shape == (33, 33, 33, 3) and lut.dtype == np.float32
  assert lut.min() >= 0.0 and lut.max() <= 1.0
  offsets = lut - augment.random_lut(rng, 33, strength=0.0)
  assert np.abs(offsets).max() > 0.05
  # Low frequency: between neighbouring grid points the offsets change by a small fraction of
  # their range (measured ~0.17-0.21 with 4 knots per axis; white noise would give ~2).
  step = max(np.abs(np.diff(offsets, axis=a)).max() for a in range(3))
  assert step < 0.3 * np.abs(offsets).max()
  out = augment.apply_lut(img, lut)
  assert out.dtype == np.uint8 and np.abs(out.astype(int) - img).mean() > 2.0


def test_deterministic_for_a_seed():
  img, mask = _object(np.random.default_rng(0))
  cfg = augment.AugmentConfig().perturb()
  a = augment.augment_object(img, mask, cfg, np.random.default_rng(7))
  b = augment.augment_object(img, mask, cfg, np.random.default_rng(7))
  c = augment.augment_object(img, mask, cfg, np.random.default_rng(8))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_bad_config_is_a_user_error():
  with pytest.raises(UserError, match="hflip_prob"):
    augment.AugmentConfig(hflip_prob=1.5)
  with pytest.raises(UserError, match="scale"):
    augment.AugmentConfig(scale=(1.2, 0.8))


def _write_cube(path, size, fn, header=""):
  """A .cube file whose output colour at input (r, g, b) is fn(r, g, b), red fastest."""
  grid = np.linspace(0.0, 1.0, size)
  rows = [" ".join(f"{v:.6f}" for v in fn(r, g, b)) for b in grid for g in grid for r in grid]
  path.write_text(f'# test LUT\nTITLE "t"\n{header}LUT_3D_SIZE {size}\n'
                  "DOMAIN_MIN 0 0 0\nDOMAIN_MAX 1.0 1.0 1.0\n\n" + "\n".join(rows) + "\n")
  return path


def test_cube_files_identity_and_colour_swap(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (E, E, 3), dtype=np.uint8)
  ident = augment.read_cube(_write_cube(tmp_path / "ident.cube", 5, lambda r, g, b: (r, g, b)))
  assert ident.shape == (5, 5, 5, 3) and ident.dtype == np.float32
  assert np.abs(augment.apply_lut(img, ident).astype(int) - img).max() <= 1
  # Red and blue swapped: linear in the input, so trilinear interpolation reproduces it.
  (tmp_path / "sub").mkdir()
  swap = augment.read_cube(_write_cube(tmp_path / "sub" / "swap.CUBE", 3,
                                       lambda r, g, b: (b, g, r)))
  assert np.abs(augment.apply_lut(img, swap).astype(int) - img[..., ::-1]).max() <= 1
  # From a folder (recursive): each object gets one of the two tables, background untouched.
  obj, mask = _object(rng)
  cfg = dataclasses.replace(OFF, lut_prob=1.0, lut_dir=str(tmp_path))
  assert len(augment.load_lut_dir(str(tmp_path))) == 2
  m = mask[..., 0] > 0
  seen = set()
  for seed in range(12):
    out = augment.random_colour(obj, mask, cfg, np.random.default_rng(seed))
    np.testing.assert_array_equal(out[~m], obj[~m])
    if np.abs(out[m].astype(int) - obj[m]).max() <= 1:
      seen.add("ident")
    else:
      assert np.abs(out[m].astype(int) - obj[m][:, ::-1]).max() <= 1
      seen.add("swap")
  assert seen == {"ident", "swap"}


def test_bad_cube_files_are_one_line_errors(tmp_path):
  ok = lambda r, g, b: (r, g, b)  # noqa: E731
  with pytest.raises(UserError, match="1-D LUT"):
    augment.read_cube(_write_cube(tmp_path / "a.cube", 2, ok, header="LUT_1D_SIZE 4\n"))
  short = _write_cube(tmp_path / "b.cube", 3, ok)
  short.write_text("\n".join(short.read_text().splitlines()[:-2]) + "\n")
  with pytest.raises(UserError, match=r"b.cube: 25 rows, LUT_3D_SIZE 3 needs 27"):
    augment.read_cube(short)
  bad = _write_cube(tmp_path / "c.cube", 2, ok)
  bad.write_text(bad.read_text().replace("DOMAIN_MAX 1.0 1.0 1.0", "DOMAIN_MAX 4 4 4"))
  with pytest.raises(UserError, match="only the domain 0..1"):
    augment.read_cube(bad)
  with pytest.raises(UserError, match="no such folder"):
    augment.AugmentConfig(lut_dir=str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="holds no .cube files"):
    augment.AugmentConfig(lut_dir=str(tmp_path / "empty"))


def test_run_config_lut_dir_reaches_the_pipeline(tmp_path):
  _write_cube(tmp_path / "x.cube", 2, lambda r, g, b: (r, g, b))
  c = run_config.load("configs/stage2.py:tiny")
  assert train_data.data_config(c, [], "train").augment.lut_dir == ""  # synthetic by default
  c = run_config.load("configs/stage2.py:tiny", [f"data.lut_dir={tmp_path}"])
  assert train_data.data_config(c, [], "train").augment.lut_dir == str(tmp_path)
