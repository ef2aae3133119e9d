"""Mask levels: exact nesting precise <= L2 <= L3 <= box, the box, borders, errors."""

import numpy as np
import pytest

from imprint_jax.data import masks
from imprint_jax.errors import UserError

G = 96


def _blobs(rng, border=False):
  """1-3 random ellipses plus a thin line: (G, G, 1) uint8 in {0, 255}."""
  yy, xx = np.mgrid[:G, :G]
  m = np.zeros((G, G), bool)
  for _ in range(rng.integers(1, 4)):
    cx, cy = rng.uniform(0.0 if border else 0.2, 1.0 if border else 0.8, 2) * G
    a, b = rng.uniform(0.05, 0.25, 2) * G
    m |= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
  r = rng.integers(5, G - 5)
  m[r, rng.integers(0, G // 3):rng.integers(G // 2, G)] = True  # thin structure
  if border:
    m[:, 0] |= m[:, 1]
    m[0, :] |= m[1, :]
  return (m * 255).astype(np.uint8)[..., None]


def _box(mask):
  m = mask[..., 0] > 0
  ys, xs = np.nonzero(m)
  box = np.zeros_like(m)
  box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
  return box[..., None]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("border", [False, True])
def test_levels_are_nested_from_precise_to_box(seed, border):
  mask = _blobs(np.random.default_rng(seed), border)
  levels = [masks.coarse_mask(mask, lvl, np.random.default_rng(100 + seed)) for lvl in masks.LEVELS]
  for lvl in levels:
    assert lvl.shape == mask.shape and lvl.dtype == bool
  np.testing.assert_array_equal(levels[0], mask > 0)
  for finer, coarser in zip(levels, levels[1:]):
    assert not (finer & ~coarser).any()  # subset, pixel for pixel
  np.testing.assert_array_equal(levels[3], _box(mask))
  # Coarser levels do coarsen (on these shapes: thin lines and gaps get filled).
  areas = [int(lvl.sum()) for lvl in levels]
  assert areas[0] < areas[1] < areas[3] and areas[1] <= areas[2]


def test_mask_levels_agrees_with_coarse_mask():
  mask = _blobs(np.random.default_rng(1))
  chain = masks.mask_levels(mask, np.random.default_rng(5))
  assert len(chain) == 4
  for lvl, m in zip(masks.LEVELS, chain):
    np.testing.assert_array_equal(m, masks.coarse_mask(mask, lvl, np.random.default_rng(5)))


def test_single_pixel_and_full_image_masks():
  one = np.zeros((G, G), np.uint8)
  one[0, G - 1] = 1
  for lvl in masks.mask_levels(one, np.random.default_rng(0)):
    np.testing.assert_array_equal(lvl, one > 0)  # the box of one pixel is that pixel
  full = np.ones((G, G, 1), bool)
  for lvl in masks.mask_levels(full, np.random.default_rng(0)):
    assert lvl.all()


def test_levels_depend_on_the_rng():
  mask = _blobs(np.random.default_rng(2))
  a = masks.coarse_mask(mask, 2, np.random.default_rng(0))
  b = masks.coarse_mask(mask, 2, np.random.default_rng(1))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, masks.coarse_mask(mask, 2, np.random.default_rng(0)))


def test_empty_mask_is_a_user_error():
  with pytest.raises(UserError, match="empty object mask"):
    masks.coarse_mask(np.zeros((G, G, 1), np.uint8), 3, np.random.default_rng(0))
  with pytest.raises(UserError, match="mask level 5"):
    masks.coarse_mask(_blobs(np.random.default_rng(0)), 5, np.random.default_rng(0))


def test_sample_level_follows_probs():
  rng = np.random.default_rng(0)
  draws = np.array([masks.sample_level((0.1, 0.2, 0.3, 0.4), rng) for _ in range(4000)])
  freq = np.bincount(draws, minlength=5)[1:] / draws.size
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)
  assert {masks.sample_level((0, 0, 1, 0), rng) for _ in range(20)} == {3}
  with pytest.raises(UserError, match="mask_level_probs"):
    masks.sample_level((0.5, 0.5), rng)
  with pytest.raises(UserError, match="mask_level_probs"):
    masks.sample_level((0, 0, 0, 0), rng)
