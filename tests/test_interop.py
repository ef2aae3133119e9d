"""`imprint-jax import` / `export`: PyTorch folders -> one checkpoint -> PyTorch folders.

A tiny SD pipeline folder (diffusers UNet + VAE + model_index.json) and a tiny DINOv2 with
registers are built with diffusers/transformers and saved with `save_pretrained`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from imprint_jax import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  root = tmp_path_factory.mktemp("torch")
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
      attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
  vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                      sample_size=32)
  sd = root / "sd"
  unet.save_pretrained(sd / "unet")
  vae.save_pretrained(sd / "vae")
  (sd / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
       "vae": ["diffusers", "AutoencoderKL"]}))
  dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      image_size=28, patch_size=14, num_register_tokens=4))
  dino.save_pretrained(root / "dinov2")
  return root


def _run(*args) -> int:
  return cli.main([str(a) for a in args])


def test_import_export_round_trip_is_bit_exact(folders, tmp_path):
  ckpt, out = tmp_path / "ckpt", tmp_path / "export"
  assert _run("import", "--sd", folders / "sd", "--dinov2", folders / "dinov2",
              "--out", ckpt) == 0
  assert _run("export", ckpt, "--out", out) == 0
  pairs = [("sd/unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
           ("sd/vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
           ("dinov2/model.safetensors", "image_encoder/model.safetensors")]
  for src, dst in pairs:
    a, b = load_file(folders / src), load_file(out / dst)
    assert a.keys() == b.keys(), src
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (src, k)
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import Dinov2WithRegistersModel
  for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"),
                   (Dinov2WithRegistersModel, "image_encoder")):
    _, info = cls.from_pretrained(out / sub, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
  from imprint_jax.torch_adapter import ContentAdapterTorch
  adapter = ContentAdapterTorch.from_pretrained(out / "adapter")
  tokens = torch.randn(1, 1 + 4 + 4, 32)
  assert adapter(tokens).shape == (1, 9, 32)
  info = json.loads((out / "imprint.json").read_text())
  assert info["stage"] == 0 and info["format"] == "imprint-jax export"
  index = json.loads((out / "model_index.json").read_text())
  assert index["image_encoder"] == ["transformers", "Dinov2WithRegistersModel"]
  # A stage-0/1 export (4-channel UNet) loads as a pipeline, which refuses to composite.
  from diffusers import DiffusionPipeline
  pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
  with pytest.raises(ValueError, match="compositing needs 9"):
    pipe(object_image=np.zeros((8, 8, 3), np.uint8), background_image=np.zeros((8, 8, 3),
         np.uint8), box=(0, 0, 4, 4))


def test_corrupt_import_is_refused(folders, tmp_path, capsys):
  """`import` writes checksums; a command loading the checkpoint refuses it once a byte of
  it changed: one line naming the file, nothing written."""
  from imprint_jax.convert import integrity
  ckpt = tmp_path / "ckpt"
  assert _run("import", "--sd", folders / "sd", "--dinov2", folders / "dinov2",
              "--out", ckpt) == 0
  assert integrity.verify(ckpt)
  victim = max((p for p in (ckpt / "model").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 1
  victim.write_bytes(bytes(data))
  capsys.readouterr()
  assert _run("export", ckpt, "--out", tmp_path / "export") == 2
  err = capsys.readouterr().err.strip().splitlines()
  rel = victim.relative_to(ckpt).as_posix()
  # The command names the checkpoint it picked, then refuses it in one error line.
  assert err[:-1] == [f"using checkpoint {ckpt} (step 0)"], err
  assert err[-1].startswith("imprint-jax export: error: "), err
  assert f"the checkpoint is corrupt: {rel} does not match the SHA-256" in err[-1], err
  assert not (tmp_path / "export").exists()


def test_bad_inputs_exit_2_and_write_nothing(folders, tmp_path, capsys):
  out = tmp_path / "ckpt"
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  pickle_only = tmp_path / "pickle"
  pickle_only.mkdir()
  (pickle_only / "config.json").write_text((folders / "dinov2" / "config.json").read_text())
  (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  bad_block = tmp_path / "bad_block"
  (bad_block / "unet").mkdir(parents=True)
  cfg = json.loads((folders / "sd" / "unet" / "config.json").read_text())
  cfg["down_block_types"] = ["AttnDownBlock2D", "DownBlock2D"]
  (bad_block / "unet" / "config.json").write_text(json.dumps(cfg))
  missing_key = tmp_path / "missing_key"
  (missing_key / "vae").mkdir(parents=True)
  (missing_key / "vae" / "config.json").write_text(
      (folders / "sd" / "vae" / "config.json").read_text())
  tensors = load_file(folders / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
  del tensors["decoder.conv_out.weight"]
  from safetensors.numpy import save_file
  save_file(tensors, missing_key / "vae" / "diffusion_pytorch_model.safetensors")
  cases = [
      (["--sd", folders / "sd", "--dinov2", empty], "no weights"),
      (["--sd", folders / "sd", "--dinov2", pickle_only], "only pickle weights"),
      (["--unet", bad_block / "unet", "--vae", folders / "sd" / "vae", "--dinov2",
        folders / "dinov2"], "AttnDownBlock2D"),
      (["--unet", folders / "sd" / "unet", "--vae", missing_key / "vae", "--dinov2",
        folders / "dinov2"], "missing key 'decoder.conv_out.weight'"),
      (["--sd", tmp_path / "nowhere", "--dinov2", folders / "dinov2"], "model_index.json"),
  ]
  for args, message in cases:
    capsys.readouterr()
    assert _run("import", *args, "--out", out) == 2, message
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imprint-jax import: error:"), err
    assert message in err[0], (message, err[0])
    assert not out.exists(), message
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")], message
  assert _run("export", tmp_path / "no_ckpt", "--out", tmp_path / "export") == 2
  assert not (tmp_path / "export").exists()


def test_cli_entry_point_exit_status(tmp_path):
  """The installed console script: one line on stderr, exit status 2."""
  res = subprocess.run([sys.executable, "-m", "imprint_jax.cli", "export", str(tmp_path / "x"),
                        "--out", str(tmp_path / "y")], capture_output=True, text=True,
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      f"imprint-jax export: error: {tmp_path / 'x'}: no such checkpoint or workdir"]
