"""AutoencoderKL parity with diffusers, converter round trips (both attention spellings) and
bad-input errors.

Tiny random VAEs (block_out_channels (32, 64), layers_per_block 1, 8 groups) are built with
diffusers, every parameter perturbed (so GroupNorm affines and biases are exercised), and saved
with save_pretrained. The old attention spelling (query/key/value/proj_attn, as in the SD 1.x/2.x
hub files) is made by renaming the keys of the saved file.
"""

from __future__ import annotations

import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from imprint_jax.diffusion import schedules
from imprint_jax.convert.common import TRANSFORMS
from imprint_jax.convert.vae import (config_from_diffusers, config_to_diffusers, detect_style,
                                     load_vae, save_vae, vae_rules)
from imprint_jax.errors import UserError
from imprint_jax.models import vae as vm

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Max abs diff relative to the reference's max abs. Measured: float32 1.4e-6..2.5e-6; bfloat16
# compute (float32 params) against the float32 reference 1.2e-2..1.8e-2.
PARITY_TOL = 1e-4
BF16_TOL = 5e-2
NEW_TO_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
VARIANTS = {
    "sd_like": {},
    "no_attn_no_quant": {"mid_block_add_attention": False, "use_quant_conv": False,
                         "use_post_quant_conv": False},
}


def _torch_vae(seed: int = 0, **kw) -> diffusers.AutoencoderKL:
  model = diffusers.AutoencoderKL(
      block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
      latent_channels=4, sample_size=32, **kw)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _to_old(key: str) -> str:
  for new, old in NEW_TO_OLD.items():
    key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
  return key


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{variant: (torch model, new-spelling folder)} plus 'old' (old spelling of sd_like)."""
  root = tmp_path_factory.mktemp("vae")
  out = {}
  for name, kw in VARIANTS.items():
    model = _torch_vae(**kw)
    model.save_pretrained(root / name)
    out[name] = (model, root / name)
  old = root / "old"
  shutil.copytree(root / "sd_like", old)
  tensors = load_file(str(old / WEIGHTS))
  save_file({_to_old(k): v for k, v in tensors.items()}, str(old / WEIGHTS),
            metadata={"format": "pt"})
  out["old"] = (out["sd_like"][0], old)
  return out


@pytest.fixture(scope="module")
def vae(folders):
  """The sd_like VAE, loaded once for the tests that do not modify it."""
  return load_vae(folders["sd_like"][1])


# Jitted once per (config, shape): far cheaper than eager op-by-op dispatch on CPU.
_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


def _nhwc(x: torch.Tensor | np.ndarray) -> np.ndarray:
  return np.asarray(x).transpose(0, 2, 3, 1)


def _rel(ours, ref) -> float:
  ref = np.asarray(ref)
  return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def _images(shape=(2, 3, 32, 24), seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("variant", ["sd_like", "no_attn_no_quant", "old"])
def test_encode_decode_parity(folders, variant):
  model, folder = folders[variant]
  vae = load_vae(folder)
  x = _images()
  z = np.random.RandomState(1).randn(2, 4, 16, 12).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x)).latent_dist
    ref_img = model.decode(torch.from_numpy(z)).sample
  mean, logvar = _encode(vae, jnp.asarray(_nhwc(x)))
  assert mean.shape == (2, 16, 12, 4) and mean.dtype == jnp.float32
  assert _rel(mean, _nhwc(dist.mean)) <= PARITY_TOL
  assert _rel(logvar, _nhwc(dist.logvar)) <= PARITY_TOL
  img = _decode(vae, jnp.asarray(_nhwc(z)))
  assert img.shape == (2, 32, 24, 3)
  assert _rel(img, _nhwc(ref_img)) <= PARITY_TOL


def test_odd_size_encode_uses_asymmetric_padding(folders, vae):
  # Odd sizes: diffusers pads only bottom/right before the stride-2 conv; symmetric padding
  # would shift every latent pixel.
  model = folders["sd_like"][0]
  x = _images((1, 3, 25, 31), seed=2)
  with torch.no_grad():
    ref = model.encode(torch.from_numpy(x)).latent_dist.mean
  mean, _ = _encode(vae, jnp.asarray(_nhwc(x)))
  assert mean.shape == (1, 12, 15, 4)
  assert _rel(mean, _nhwc(ref)) <= PARITY_TOL


def test_latent_helpers(vae):
  x = jnp.asarray(_nhwc(_images()))
  sf = vae.cfg.scaling_factor

  @nnx.jit
  def run(m, x, rng):
    mean, logvar = m.encode(x)
    return mean, logvar, m.encode_latents(x), m.encode_latents(x, rng), m.decode_latents(mean * sf)

  rng = jax.random.key(3)
  mean, logvar, z_mean, drawn, dec_scaled = run(vae, x, rng)
  np.testing.assert_allclose(z_mean, mean * sf, rtol=1e-6, atol=0)
  # gaussian_noise(rng, shape) == jax.random.normal(rng, shape) (test_diffusion.py).
  want = (mean + jnp.exp(0.5 * logvar) * schedules.gaussian_noise(rng, mean.shape)) * sf
  np.testing.assert_allclose(drawn, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(drawn, run(vae, x, rng)[3])  # same key, same draw
  assert not np.allclose(drawn, run(vae, x, jax.random.key(4))[3])
  np.testing.assert_allclose(dec_scaled, _decode(vae, mean), rtol=1e-5, atol=1e-5)


def test_logvar_is_clipped_like_diffusers(folders):
  _, folder = folders["sd_like"]
  vae = load_vae(folder)
  # Drive the log-variance half of quant_conv far out of range through its bias.
  bias = vae.quant_conv.bias
  bias.set_value(bias.get_value().at[4:].set(jnp.array([100.0, -100.0, 100.0, -100.0])))
  _, logvar = _encode(vae, jnp.asarray(_nhwc(_images())))
  assert float(logvar[..., 0].min()) == vm.LOGVAR_MAX
  assert float(logvar[..., 1].max()) == vm.LOGVAR_MIN


def test_pipeline_folder(folders, tmp_path):
  model, folder = folders["sd_like"]
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion"}))
  shutil.copytree(folder, tmp_path / "vae")
  vae = load_vae(tmp_path)
  x = _images()
  with torch.no_grad():
    ref = model.encode(torch.from_numpy(x)).latent_dist.mean
  assert _rel(_encode(vae, jnp.asarray(_nhwc(x)))[0], _nhwc(ref)) <= PARITY_TOL


def test_detect_style(folders):
  assert detect_style(load_file(str(folders["sd_like"][1] / WEIGHTS))) == "new"
  assert detect_style(load_file(str(folders["old"][1] / WEIGHTS))) == "old"
  mixed = ["encoder.mid_block.attentions.0.to_q.weight",
           "decoder.mid_block.attentions.0.query.weight"]
  with pytest.raises(UserError, match="mixes"):
    detect_style(mixed)


def test_round_trip_new_is_bit_exact(folders, tmp_path):
  _, folder = folders["sd_like"]
  out = save_vae(load_vae(folder), tmp_path / "export")
  src, dst = load_file(str(folder / WEIGHTS)), load_file(str(out / WEIGHTS))
  assert sorted(src) == sorted(dst)
  for k in src:
    np.testing.assert_array_equal(dst[k], src[k], err_msg=k)


def test_round_trip_old_writes_new_spelling(folders, tmp_path):
  _, folder = folders["old"]
  out = save_vae(load_vae(folder), tmp_path / "export")
  src, dst = load_file(str(folder / WEIGHTS)), load_file(str(out / WEIGHTS))
  assert not any(".query." in k or "proj_attn" in k for k in dst)
  assert sorted(_to_old(k) for k in dst) == sorted(src)
  for k in dst:
    np.testing.assert_array_equal(dst[k], src[_to_old(k)], err_msg=k)


def test_old_spelling_also_loads_in_diffusers(folders):
  # Guards the renaming itself: diffusers maps query/key/value/proj_attn the same way.
  model, folder = folders["old"]
  ref = diffusers.AutoencoderKL.from_pretrained(folder).eval()
  x = torch.from_numpy(_images())
  with torch.no_grad():
    torch.testing.assert_close(ref.encode(x).latent_dist.mean, model.encode(x).latent_dist.mean,
                               rtol=0, atol=0)


def test_old_spelling_with_1x1_conv_kernels(folders, tmp_path):
  model, folder = folders["old"]
  shutil.copytree(folder, tmp_path / "conv")
  tensors = load_file(str(tmp_path / "conv" / WEIGHTS))
  attn = [k for k in tensors if ".attentions.0." in k and k.endswith(".weight")
          and "group_norm" not in k]
  assert len(attn) == 8
  for k in attn:
    tensors[k] = tensors[k][:, :, None, None]
  save_file(tensors, str(tmp_path / "conv" / WEIGHTS), metadata={"format": "pt"})
  vae = load_vae(tmp_path / "conv")
  x = _images()
  with torch.no_grad():
    ref = model.encode(torch.from_numpy(x)).latent_dist.mean
  assert _rel(_encode(vae, jnp.asarray(_nhwc(x)))[0], _nhwc(ref)) <= PARITY_TOL


@pytest.mark.parametrize("variant", ["sd_like", "no_attn_no_quant"])
def test_export_loads_in_diffusers_without_missing_keys(folders, tmp_path, variant):
  model, folder = folders[variant]
  out = save_vae(load_vae(folder), tmp_path / "export")
  back, info = diffusers.AutoencoderKL.from_pretrained(out, output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  assert info["mismatched_keys"] == [] and info["error_msgs"] == []
  x = torch.from_numpy(_images())
  with torch.no_grad():
    torch.testing.assert_close(back.eval()(x).sample, model(x).sample, rtol=0, atol=0)


def test_config_round_trip(folders):
  _, folder = folders["sd_like"]
  raw = json.loads((folder / "config.json").read_text())
  cfg = config_from_diffusers(raw)
  assert cfg.block_out_channels == (32, 64) and cfg.layers_per_block == 1
  assert cfg.norm_num_groups == 8 and cfg.sample_size == 32
  assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
  for k, v in config_to_diffusers(cfg).items():
    if k in raw:
      assert raw[k] == v, k


def test_sd_preset_matches_diffusers_key_for_key():
  # The full-size SD VAE, built on torch's meta device and abstractly here: no memory, no time.
  sd = vm.VAEConfig.sd()
  assert sd.block_out_channels == (128, 256, 512, 512) and sd.downsample_factor == 8
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL.from_config(config_to_diffusers(sd))
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  abstract = nnx.eval_shape(lambda: vm.AutoencoderKL(sd, rngs=nnx.Rngs(0)))
  leaves = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  got = {r.torch: tuple(TRANSFORMS[r.kind][2](tuple(leaves[r.path].shape)))
         for r in vae_rules(sd, "new")}
  assert got == want
  assert sum(int(np.prod(s)) for s in got.values()) == 83_653_863


def test_params_carry_logical_axes(vae):
  for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == v.get_value().ndim, path
  assert vae.decoder.mid_block.attentions[0].to_q.kernel.get_metadata()["out_sharding"] == (
      "embed", "heads")


def test_bf16_compute_close_to_f32(folders):
  model, folder = folders["sd_like"]
  vae = load_vae(folder, dtype="bfloat16")
  assert vae.encoder.conv_in.kernel.get_value().dtype == jnp.float32  # params stay float32
  x = _images()
  z = np.random.RandomState(1).randn(2, 4, 16, 12).astype(np.float32)
  with torch.no_grad():
    ref_mean = model.encode(torch.from_numpy(x)).latent_dist.mean
    ref_img = model.decode(torch.from_numpy(z)).sample
  mean, _ = _encode(vae, jnp.asarray(_nhwc(x)))
  img = _decode(vae, jnp.asarray(_nhwc(z)))
  assert mean.dtype == img.dtype == jnp.float32
  assert _rel(mean, _nhwc(ref_mean)) <= BF16_TOL
  assert _rel(img, _nhwc(ref_img)) <= BF16_TOL


def test_remat_forward_matches(folders, vae):
  remat = load_vae(folders["sd_like"][1], remat="full")
  z = jnp.asarray(np.random.RandomState(1).randn(1, 8, 8, 4).astype(np.float32))
  np.testing.assert_allclose(_decode(remat, z), _decode(vae, z), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

def _copy(folders, tmp_path, variant="sd_like"):
  dst = tmp_path / "bad"
  shutil.copytree(folders[variant][1], dst)
  return dst


def test_no_weights(folders, tmp_path):
  d = _copy(folders, tmp_path)
  (d / WEIGHTS).unlink()
  with pytest.raises(UserError, match="no weights"):
    load_vae(d)


def test_pickle_only(folders, tmp_path):
  d = _copy(folders, tmp_path)
  (d / WEIGHTS).unlink()
  (d / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(UserError, match="diffusion_pytorch_model.bin"):
    load_vae(d)


def test_missing_config(folders, tmp_path):
  d = _copy(folders, tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(UserError, match="config.json"):
    load_vae(d)


def test_no_such_folder(tmp_path):
  with pytest.raises(UserError, match="no such folder"):
    load_vae(tmp_path / "nope")


def test_pipeline_without_vae(tmp_path):
  (tmp_path / "model_index.json").write_text("{}")
  with pytest.raises(UserError, match="vae/"):
    load_vae(tmp_path)


@pytest.mark.parametrize("key,value,needle", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
     "AttnDownEncoderBlock2D"),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "AttnUpDecoderBlock2D"),
    ("act_fn", "gelu", "gelu"),
    ("shift_factor", 0.0609, "shift_factor"),
    ("_class_name", "AutoencoderTiny", "AutoencoderTiny"),
    ("norm_num_groups", 7, "norm_num_groups"),
])
def test_unsupported_config(folders, tmp_path, key, value, needle):
  d = _copy(folders, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg[key] = value
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UserError, match=needle):
    load_vae(d)


def test_missing_key(folders, tmp_path):
  d = _copy(folders, tmp_path)
  tensors = load_file(str(d / WEIGHTS))
  del tensors["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
  save_file(tensors, str(d / WEIGHTS))
  with pytest.raises(UserError, match=r"missing key 'decoder\.up_blocks\.1\.resnets\.0\."
                                      r"conv_shortcut\.weight'"):
    load_vae(d)


def test_unexpected_key(folders, tmp_path):
  d = _copy(folders, tmp_path, "no_attn_no_quant")
  tensors = load_file(str(d / WEIGHTS))
  tensors["quant_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  save_file(tensors, str(d / WEIGHTS))
  with pytest.raises(UserError, match="unexpected key 'quant_conv.weight'"):
    load_vae(d)


def test_wrong_shape(folders, tmp_path):
  d = _copy(folders, tmp_path)
  tensors = load_file(str(d / WEIGHTS))
  tensors["encoder.conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)
  save_file(tensors, str(d / WEIGHTS))
  with pytest.raises(UserError, match=r"'encoder\.conv_in\.weight' has shape \(32, 4, 3, 3\)"):
    load_vae(d)


def test_bad_rank_input(vae):
  with pytest.raises(UserError, match="rank 4"):
    vae.encode(jnp.zeros((3, 32, 32)))
