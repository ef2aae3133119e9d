"""Metric networks vs their PyTorch references on tiny random weights; FID maths; missing
weights.

  CLIP       transformers CLIPVisionModelWithProjection (and a full CLIPModel folder).
  DINO ViT   transformers ViTModel; the score uses last_hidden_state[:, 0].
  Inception  a tiny-width copy of pytorch-fid's FID InceptionV3 written here in plain torch
             (torchvision is not installed): torchvision's Inception3 blocks with pytorch-fid's
             patches (avg pools with count_include_pad=False, max pool in Mixed_7c), every
             channel count divided by 16, saved to safetensors under torchvision's names.

Parity: max |ours - theirs| <= PARITY_TOL x max |theirs|.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from imprint_jax.evaluation import metrics
from imprint_jax.errors import UserError
from imprint_jax.evaluation.metrics import convert, fid
from imprint_jax.evaluation.metrics.clip import CLIP_MEAN, CLIP_STD, clip_preprocess
from imprint_jax.evaluation.metrics.vit import IMAGENET_MEAN, IMAGENET_STD, dino_preprocess

PARITY_TOL = 1e-4
DIVISOR = 16


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def _pixels(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------ CLIP

CLIP_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               image_size=28, patch_size=14, projection_dim=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  model = _perturb(transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**CLIP_KW)), seed=1)
  folder = tmp_path_factory.mktemp("clip")
  model.save_pretrained(folder)
  return model, folder


def test_clip_parity(clip_folder):
  torch_model, folder = clip_folder
  x = _pixels((3, 28, 28, 3))
  with torch.no_grad():
    ref = torch_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).image_embeds.numpy()
  ours = convert.load_clip(folder)(x)
  assert ours.shape == (3, 16)
  assert _rel_err(ours, ref) <= PARITY_TOL


def test_clip_full_model_folder_ignores_text_tower(tmp_path):
  """The hub's openai/clip-* folders are whole CLIPModels: text keys are skipped by name and
  the projection width is the top-level projection_dim."""
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2),
      vision_config={k: v for k, v in CLIP_KW.items() if k != "projection_dim"},
      projection_dim=24)
  model = _perturb(transformers.CLIPModel(cfg), seed=2)
  model.save_pretrained(tmp_path)
  x = _pixels((2, 28, 28, 3), seed=1)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
    ref = getattr(ref, "pooler_output", ref).numpy()
  ours = convert.load_clip(tmp_path)(x)
  assert ours.shape == (2, 24)
  assert _rel_err(ours, ref) <= PARITY_TOL


def test_clip_preprocess_matches_transformers():
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 224},
                                                  crop_size={"height": 224, "width": 224})
  for seed, shape in enumerate([(180, 300, 3), (301, 233, 3), (64, 64, 3)]):
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = clip_preprocess(224)([image])[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_dino_preprocess_is_resize256_crop224_imagenet():
  # The same semantics as a CLIP processor with DINO's sizes and ImageNet statistics.
  processor = transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
  image = np.random.default_rng(3).integers(0, 256, (200, 310, 3), dtype=np.uint8)
  ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = dino_preprocess(224)([image])[0]
  assert ours.shape == (224, 224, 3)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert CLIP_MEAN != IMAGENET_MEAN and CLIP_STD != IMAGENET_STD


# ------------------------------------------------------------------------------------ DINO

def test_vit_parity_uses_cls_after_layernorm(tmp_path):
  cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=16)
  model = _perturb(transformers.ViTModel(cfg), seed=3)
  model.save_pretrained(tmp_path)
  x = _pixels((3, 32, 32, 3), seed=2)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
  ref = out.last_hidden_state[:, 0].numpy()
  ours = convert.load_vit(tmp_path)(x)
  assert _rel_err(ours, ref) <= PARITY_TOL
  # Not the pooler (dense + tanh over the same token).
  assert np.abs(ours - out.pooler_output.numpy()).max() > 1e-2


# ------------------------------------------------------------------------------- Inception

class TConv(nn.Module):
  def __init__(self, cin, cout, k, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _c(n):
  return n // DIVISOR


def _avg(x):
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class TA(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = TConv(cin, _c(64), 1)
    self.branch5x5_1, self.branch5x5_2 = TConv(cin, _c(48), 1), TConv(_c(48), _c(64), 5, padding=2)
    self.branch3x3dbl_1 = TConv(cin, _c(64), 1)
    self.branch3x3dbl_2 = TConv(_c(64), _c(96), 3, padding=1)
    self.branch3x3dbl_3 = TConv(_c(96), _c(96), 3, padding=1)
    self.branch_pool = TConv(cin, _c(pool), 1)
    self.out = _c(64) * 2 + _c(96) + _c(pool)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class TB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TConv(cin, _c(384), 3, stride=2)
    self.branch3x3dbl_1 = TConv(cin, _c(64), 1)
    self.branch3x3dbl_2 = TConv(_c(64), _c(96), 3, padding=1)
    self.branch3x3dbl_3 = TConv(_c(96), _c(96), 3, stride=2)
    self.out = _c(384) + _c(96) + cin

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, 2)], 1)


class TC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    c7 = _c(c7)
    self.branch1x1 = TConv(cin, _c(192), 1)
    self.branch7x7_1 = TConv(cin, c7, 1)
    self.branch7x7_2 = TConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = TConv(c7, _c(192), (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TConv(cin, c7, 1)
    self.branch7x7dbl_2 = TConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TConv(c7, _c(192), (1, 7), padding=(0, 3))
    self.branch_pool = TConv(cin, _c(192), 1)
    self.out = 4 * _c(192)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = self.branch7x7dbl_1(x)
    for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = m(d)
    return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class TD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TConv(cin, _c(192), 1)
    self.branch3x3_2 = TConv(_c(192), _c(320), 3, stride=2)
    self.branch7x7x3_1 = TConv(cin, _c(192), 1)
    self.branch7x7x3_2 = TConv(_c(192), _c(192), (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TConv(_c(192), _c(192), (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TConv(_c(192), _c(192), 3, stride=2)
    self.out = _c(320) + _c(192) + cin

  def forward(self, x):
    b = self.branch7x7x3_1(x)
    for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b = m(b)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, 2)], 1)


class TE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = TConv(cin, _c(320), 1)
    self.branch3x3_1 = TConv(cin, _c(384), 1)
    self.branch3x3_2a = TConv(_c(384), _c(384), (1, 3), padding=(0, 1))
    self.branch3x3_2b = TConv(_c(384), _c(384), (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TConv(cin, _c(448), 1)
    self.branch3x3dbl_2 = TConv(_c(448), _c(384), 3, padding=1)
    self.branch3x3dbl_3a = TConv(_c(384), _c(384), (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TConv(_c(384), _c(384), (3, 1), padding=(1, 0))
    self.branch_pool = TConv(cin, _c(192), 1)
    self.out = _c(320) + 4 * _c(384) + _c(192)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)],
                     1)


class TinyFIDInception(nn.Module):
  """pytorch-fid's fid_inception_v3 + InceptionV3.forward (blocks 0..3), widths / 16."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TConv(3, _c(32), 3, stride=2)
    self.Conv2d_2a_3x3 = TConv(_c(32), _c(32), 3)
    self.Conv2d_2b_3x3 = TConv(_c(32), _c(64), 3, padding=1)
    self.Conv2d_3b_1x1 = TConv(_c(64), _c(80), 1)
    self.Conv2d_4a_3x3 = TConv(_c(80), _c(192), 3)
    self.Mixed_5b = TA(_c(192), 32)
    self.Mixed_5c = TA(self.Mixed_5b.out, 64)
    self.Mixed_5d = TA(self.Mixed_5c.out, 64)
    self.Mixed_6a = TB(self.Mixed_5d.out)
    self.Mixed_6b = TC(self.Mixed_6a.out, 128)
    self.Mixed_6c = TC(self.Mixed_6b.out, 160)
    self.Mixed_6d = TC(self.Mixed_6c.out, 160)
    self.Mixed_6e = TC(self.Mixed_6d.out, 192)
    self.Mixed_7a = TD(self.Mixed_6e.out)
    self.Mixed_7b = TE(self.Mixed_7a.out, max_pool=False)
    self.Mixed_7c = TE(self.Mixed_7b.out, max_pool=True)
    self.fc = nn.Linear(self.Mixed_7c.out, 1008)

  def forward(self, x):  # x in [-1, 1], NCHW
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
    x = F.max_pool2d(x, 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, 1)[:, :, 0, 0]


def tiny_inception(seed: int = 0) -> TinyFIDInception:
  """Random weights and running statistics chosen to keep activations O(1) through 20 layers."""
  torch.manual_seed(seed)
  model = TinyFIDInception()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.8, 1.2)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return model.eval()


def save_tiny_inception(path, seed: int = 0) -> TinyFIDInception:
  model = tiny_inception(seed)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert any(k.endswith("num_batches_tracked") for k in state)  # ignored by name
  save_file(state, str(path))
  return model


def test_inception_parity(tmp_path):
  path = tmp_path / "tiny_inception.safetensors"
  torch_model = save_tiny_inception(path)
  ours_model = convert.load_inception(path)
  assert ours_model.cfg.width_divisor == DIVISOR and ours_model.cfg.feature_dim == 128
  x = np.random.default_rng(5).uniform(-1, 1, (2, 139, 131, 3)).astype(np.float32)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  ours = metrics.apply(ours_model, x)
  assert ref.shape == (2, 128) and np.abs(ref).max() > 1e-2
  assert _rel_err(ours, ref) <= PARITY_TOL


def test_documented_pth_conversion_one_liner_works(tmp_path):
  """The command the missing-weights message prints turns a pytorch-fid .pth (a pickled
  state dict) into the safetensors file `load_inception` reads."""
  model = tiny_inception(2)
  torch.save(model.state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
  argv = shlex.split(fid.CONVERT_INCEPTION)
  assert argv[0] == "python"
  subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True)
  ours = convert.load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.safetensors")
  x = np.random.default_rng(9).uniform(-1, 1, (2, 139, 131, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert _rel_err(metrics.apply(ours, x), ref) <= PARITY_TOL  # same shape: compiled once


def test_inception_pooling_quirks_matter(tmp_path):
  """Replacing the FID quirks by the plain torchvision ops changes the features: the parity
  test above would catch a model that lacked them."""
  torch_model = tiny_inception(1)
  x = torch.from_numpy(np.random.default_rng(6).uniform(-1, 1, (1, 3, 139, 139)).astype(np.float32))
  with torch.no_grad():
    ref = torch_model(x)
    torch_model.Mixed_7c.max_pool = False
    changed = torch_model(x)
  assert (ref - changed).abs().max() > 1e-3 * ref.abs().max()


def test_fid_resize_torch_bilinear_matches_interpolate():
  image = np.random.default_rng(7).integers(0, 256, (512, 384, 3), dtype=np.uint8)
  ours = fid.preprocess([image], "torch-bilinear")[0]
  t = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
  ref = F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
  ref = (2 * ref - 1)[0].permute(1, 2, 0).numpy()
  # torch computes source coordinates in float32 (~6e-5 px near x = 511); ours in float64.
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  up = fid.preprocess([image[:100, :150]], "torch-bilinear")[0]  # upsampling too
  t = torch.from_numpy(image[:100, :150].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
  ref = F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(up, (2 * ref - 1)[0].permute(1, 2, 0).numpy(), atol=1e-4)


def test_fid_resize_pil_bicubic():
  image = np.random.default_rng(8).integers(0, 256, (512, 512, 3), dtype=np.uint8)
  from PIL import Image
  ref = np.asarray(Image.fromarray(image).resize((299, 299), Image.Resampling.BICUBIC))
  ours = fid.preprocess([image])[0]
  np.testing.assert_allclose(ours, ref / 127.5 - 1.0, atol=1e-6)
  with pytest.raises(UserError, match="resize method"):
    fid.preprocess([image], "nearest")


# ------------------------------------------------------------------------------------ FID maths

def _reference_fid(mu1, s1, mu2, s2):
  """pytorch-fid's calculate_frechet_distance, via scipy.linalg.sqrtm."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = covmean.real
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy_on_known_gaussians():
  rng = np.random.default_rng(0)
  d = 24
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  ours = fid.frechet_distance(mu1, s1, mu2, s2)
  ref = _reference_fid(mu1, s1, mu2, s2)
  assert abs(ours - ref) <= 1e-9 * abs(ref)
  # Closed form for commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 + |dmu|^2.
  da, db = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
  closed = np.sum((np.sqrt(da) - np.sqrt(db)) ** 2) + np.sum((mu1 - mu2) ** 2)
  assert abs(fid.frechet_distance(mu1, np.diag(da), mu2, np.diag(db)) - closed) < 1e-10


def test_fid_of_identical_sets_is_zero_and_of_samples_matches_scipy():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(40, 16)) * rng.uniform(0.5, 3, 16) + 5.0
  assert abs(fid.fid_from_features(feats, feats)) < 1e-6
  # Rank-deficient covariances (fewer samples than dimensions), as with small test sets.
  a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.3
  ours = fid.fid_from_features(a, b)
  ref = _reference_fid(*fid.statistics(a), *fid.statistics(b))
  assert abs(ours - ref) <= 1e-6 * abs(ref)
  with pytest.raises(UserError, match="at least 2 images"):
    fid.statistics(a[:1])


def test_cosine_x100():
  a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
  b = np.array([[3.0, 0.0], [-1.0, -1.0], [0.0, 5.0]])
  np.testing.assert_allclose(metrics.cosine_x100(a, b), [100.0, -100.0, 0.0], atol=1e-12)


# ----------------------------------------------------------------------------- missing weights

def test_missing_weights_are_skipped_with_one_clear_line(tmp_path):
  suite = metrics.load_suite(clip=tmp_path / "nope_clip", dino=None,
                             inception=tmp_path / "nope.safetensors", dreamsim_dir=None)
  assert suite.clip is None and suite.dino is None and suite.inception is None
  clip_msg = suite.skipped["clip"]
  assert clip_msg.startswith(f"CLIP weights not found at {tmp_path / 'nope_clip'}")
  assert "`hf download openai/clip-vit-large-patch14 config.json model.safetensors" in clip_msg
  assert "--clip DIR" in clip_msg
  assert "facebook/dino-vits16" in suite.skipped["dino"] and "--dino" in suite.skipped["dino"]
  fid_msg = suite.skipped["fid"]
  assert "pt_inception-2015-12-05-6726825d.pth" in fid_msg and "--inception" in fid_msg
  assert "torch.load" in fid_msg and "save_file" in fid_msg  # the one-line conversion
  assert suite.skipped["dreamsim"].startswith(metrics.DREAMSIM_SKIPPED)
  for msg in suite.skipped.values():
    assert "\n" not in msg


def test_present_metrics_load_while_others_are_skipped(clip_folder, tmp_path):
  _, folder = clip_folder
  suite = metrics.load_suite(clip=folder, dino=tmp_path / "none", batch_size=2)
  assert suite.clip is not None and "clip" not in suite.skipped and "dino" in suite.skipped
  images = [np.random.default_rng(i).integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
            for i in range(3)]  # 3 images, batch 2: the padded last batch
  emb = suite.clip(images)
  assert emb.shape == (3, 16)
  np.testing.assert_allclose(suite.clip(images[2:]), emb[2:], rtol=1e-5, atol=1e-6)


def test_bad_weight_files_raise(tmp_path, clip_folder):
  pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  pth.write_bytes(b"not really")
  with pytest.raises(UserError, match="pickle file; imprint-jax reads safetensors only"):
    convert.load_inception(pth)
  # An unknown key is named.
  path = tmp_path / "extra.safetensors"
  state = {k: v.contiguous() for k, v in tiny_inception().state_dict().items()}
  state["Mixed_5b.branch_extra.conv.weight"] = torch.zeros(1)
  save_file(state, str(path))
  with pytest.raises(UserError, match="Mixed_5b.branch_extra.conv.weight"):
    convert.load_inception(path)
  # A ViT folder given as CLIP: wrong model_type, one line.
  _, clip_dir = clip_folder
  with pytest.raises(UserError, match="model_type is 'clip_vision_model'"):
    convert.load_vit(clip_dir)


def test_dreamsim_missing_package_is_skipped(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "dreamsim", None)  # import fails like an absent package
  suite = metrics.load_suite(dreamsim_dir=tmp_path)
  assert suite.dreamsim is None
  assert suite.skipped["dreamsim"].startswith(
      "DreamSim skipped: pip install 'imprint-jax[eval]' and pass --dreamsim-dir")


def test_dreamsim_plumbing_with_a_stand_in_package(tmp_path, monkeypatch):
  """The wrapper's calls follow the dreamsim package API: dreamsim(pretrained, device,
  cache_dir) -> (model, preprocess); preprocess(PIL) -> (1, 3, 224, 224); model(a, b) -> (B,)."""
  calls = {}

  def dreamsim(pretrained, device, cache_dir):
    calls.update(pretrained=pretrained, cache_dir=cache_dir)

    def preprocess(img):
      x = np.asarray(img.resize((8, 8)), np.float32) / 255
      return torch.from_numpy(x).permute(2, 0, 1)[None]

    return (lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))), preprocess

  monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=dreamsim))
  suite = metrics.load_suite(dreamsim_dir=tmp_path)
  assert calls == {"pretrained": True, "cache_dir": str(tmp_path)}
  white = np.full((20, 20, 3), 255, np.uint8)
  black = np.zeros((20, 20, 3), np.uint8)
  d = suite.dreamsim([white, white], [white, black])
  np.testing.assert_allclose(d, [0.0, 1.0], atol=1e-6)
