"""DINOv2 parity with transformers, converter round trips and bad-input errors.

Tiny random models (hidden 32, 2 layers, native grid 4x4 = image_size 56, patch 14) are built
with transformers, every parameter perturbed (so biases, LayerNorm affines and LayerScale are
all exercised), and saved with save_pretrained into a temporary folder.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from imprint_jax.convert.common import TRANSFORMS
from imprint_jax.convert.dinov2 import (config_from_transformers, config_to_transformers,
                                        dinov2_rules, load_dinov2, save_dinov2)
from imprint_jax.errors import UserError
from imprint_jax.models import dinov2 as dm
from imprint_jax.models import layers

PATCH, NATIVE = 14, 56
# (variant name, registers, swiglu)
VARIANTS = [("mlp", 0, False), ("swiglu", 0, True), ("reg", 4, False), ("reg_swiglu", 4, True)]
# Native size; larger and non-square (grid 5x7, with pixel remainders the conv drops);
# smaller and non-square (grid 3x2: shrinking widens the antialiased kernel's support).
SIZES = [(56, 56), (73, 101), (42, 28)]
PARITY_TOL = 1e-4  # max abs diff relative to the reference's max abs


def _hf_model(registers: int, swiglu: bool, seed: int = 0) -> torch.nn.Module:
  kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=NATIVE,
            patch_size=PATCH, use_swiglu_ffn=swiglu, layerscale_value=0.5)
  if registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 1.0 if "position_embeddings" in name or "token" in name else 0.05
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  """variant -> (torch model, folder it was saved to)."""
  out = {}
  for i, (name, registers, swiglu) in enumerate(VARIANTS):
    model = _hf_model(registers, swiglu, seed=i)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)


# ------------------------------------------------------------------------------ interpolation

@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch(antialias):
  worst = 0.0
  for n_in in (2, 3, 4, 7, 16, 37):
    for n_out in (1, 2, 3, 5, 8, 9, 16, 40, 74):
      # Resizing an identity along H reads the resampling matrix off directly.
      eye = torch.eye(n_in)[None, None]
      ref = torch.nn.functional.interpolate(eye, size=(n_out, n_in), mode="bicubic",
                                            align_corners=False, antialias=antialias)[0, 0]
      worst = max(worst, np.abs(dm.bicubic_matrix(n_in, n_out, antialias) - ref.numpy()).max())
  assert worst < 1e-5, worst  # torch builds its weights in float32, we in float64


@pytest.mark.parametrize("variant", ["mlp", "reg"])
def test_pos_embed_matches_transformers(hf_folders, variant):
  model, folder = hf_folders[variant]
  ours = load_dinov2(folder)
  for h, w in SIZES:
    gh, gw = h // PATCH, w // PATCH
    dummy = torch.zeros(1, 1 + gh * gw, 32)
    with torch.no_grad():
      ref = model.embeddings.interpolate_pos_encoding(dummy, h, w).numpy()
    got = np.asarray(ours.pos_embed(gh, gw))
    assert got.shape == ref.shape
    assert _rel(got, ref) <= 1e-5, (variant, h, w, _rel(got, ref))


# ------------------------------------------------------------------------------------ parity

_forward = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_model_parity(hf_folders, variant):
  model, folder = hf_folders[variant]
  ours = load_dinov2(folder)
  # All sizes for the two interpolation kernels (no registers: plain bicubic; registers:
  # antialiased); the SwiGLU variants at the interpolated non-square size only.
  sizes = SIZES if variant in ("mlp", "reg") else SIZES[1:2]
  for h, w in sizes:
    x = _pixels(h, w)
    with torch.no_grad():
      ref = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    got = np.asarray(_forward(ours, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert got.shape == ref.shape == (2, dm.num_tokens(ours.cfg, h, w), 32)
    assert _rel(got, ref) <= PARITY_TOL, (variant, h, w, _rel(got, ref))


@pytest.mark.parametrize("variant", ["mlp", "swiglu"])
def test_block_parity(hf_folders, variant):
  model, folder = hf_folders[variant]
  ours = load_dinov2(folder)
  x = np.random.default_rng(1).standard_normal((2, 9, 32)).astype(np.float32)
  for i in range(2):
    with torch.no_grad():
      ref = model.encoder.layer[i](torch.from_numpy(x)).numpy()
    got = np.asarray(_forward(ours.layers[i], jnp.asarray(x)))
    assert _rel(got, ref) <= PARITY_TOL, (variant, i, _rel(got, ref))


def test_remat_same_output_and_grads(hf_folders):
  _, folder = hf_folders["reg_swiglu"]
  x = jnp.asarray(_pixels(73, 101).transpose(0, 2, 3, 1))  # already compiled without remat
  np.testing.assert_allclose(_forward(load_dinov2(folder, remat="full"), x),
                             _forward(load_dinov2(folder), x), rtol=1e-6, atol=1e-6)
  # Gradients through one checkpointed block (the model calls every block the same way).
  block = load_dinov2(folder).layers[0]
  h = jnp.asarray(np.random.default_rng(2).standard_normal((1, 7, 32)), jnp.float32)
  grads = []
  for remat in ("none", "full"):
    loss = lambda b: jnp.mean(layers.call_block(b, h, remat=remat) ** 2)
    grads.append(nnx.jit(nnx.grad(loss))(block)["mlp"]["weights_in"]["kernel"][...])
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8)
  # As the train step does it: the block merged from its state inside the gradient's trace.
  graphdef, state = nnx.split(block)
  loss = lambda s: jnp.mean(layers.call_block(nnx.merge(graphdef, s), h, remat="full") ** 2)
  g = jax.jit(jax.grad(loss))(state)
  np.testing.assert_allclose(g["mlp"]["weights_in"]["kernel"][...], grads[0], rtol=1e-5,
                             atol=1e-8)


def test_bfloat16_close_to_float32(hf_folders):
  _, folder = hf_folders["reg_swiglu"]
  x = jnp.asarray(_pixels(73, 101).transpose(0, 2, 3, 1))
  f32 = _forward(load_dinov2(folder), x)
  bf16 = _forward(load_dinov2(folder, dtype="bfloat16"), x)
  assert bf16.dtype == jnp.bfloat16
  # Measured 0.7e-2 to 1.4e-2 relative over all four variants and two seeds (bf16 keeps 8
  # mantissa bits; two layers and the final LN).
  assert _rel(bf16.astype(jnp.float32), f32) <= 4e-2


# ------------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_round_trip_bit_exact_and_loads_in_transformers(hf_folders, tmp_path, variant):
  model, folder = hf_folders[variant]
  out = tmp_path / "export"
  save_dinov2(load_dinov2(folder), out)
  original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert exported[key].tobytes() == value.tobytes(), key

  cls = type(model)
  reloaded, info = cls.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  x = torch.from_numpy(_pixels(73, 101))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(pixel_values=x).last_hidden_state.numpy(),
                                  model(pixel_values=x).last_hidden_state.numpy())
  # The exported config reads back into the same architecture.
  cfg = config_from_transformers(json.loads((out / "config.json").read_text()))
  assert cfg == config_from_transformers(json.loads((folder / "config.json").read_text()))


def test_rules_cover_file_keys_exactly(hf_folders):
  for _, folder in hf_folders.values():
    cfg = config_from_transformers(json.loads((folder / "config.json").read_text()))
    keys = {r.torch for r in dinov2_rules(cfg)}
    assert keys == set(load_file(folder / "model.safetensors"))


@pytest.mark.parametrize("name,registers", [("s", 0), ("b", 4), ("l", 0), ("g", 4)])
def test_presets_match_transformers_shapes(name, registers):
  full = dm.Dinov2Config.preset(name, registers=registers)
  depth = {"s": 12, "b": 12, "l": 24, "g": 40}[name]
  assert (full.num_layers, full.image_size, full.patch_size) == (depth, 518, 14)
  # One layer at full width checks every tensor shape (the other layers repeat it) cheaply.
  cfg = dm.Dinov2Config.preset(name, registers=registers, num_layers=1)
  hf = config_to_transformers(cfg)
  hf_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
  hf_cfg = (transformers.Dinov2WithRegistersConfig if registers
            else transformers.Dinov2Config)(**{k: v for k, v in hf.items() if k != "model_type"})
  with torch.device("meta"):
    ref = hf_cls(hf_cfg)
  want = {k: tuple(s) for k, s in _file_shapes(ref).items()}
  leaves = dict(nnx.to_flat_state(nnx.state(dm.abstract_dinov2(cfg), nnx.Param)))
  got = {r.torch: tuple(TRANSFORMS[r.kind][2](tuple(leaves[r.path].shape)))
         for r in dinov2_rules(cfg)}
  assert got == want
  if name == "g":  # SwiGLU hidden: 2/3 of 4 * 1536, rounded up to a multiple of 8
    assert got["encoder.layer.0.mlp.weights_in.weight"] == (2 * 4096, 1536)
    per_layer = sum(int(np.prod(s)) for k, s in got.items() if k.startswith("encoder."))
    assert 1.1e9 < 40 * per_layer < 1.2e9  # ViT-g/14: ~1.1 B parameters


def _file_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
  """The tensors a transformers DINOv2 writes to its file (SwiGLU gate/up fused, hub names)."""
  out = {}
  for k, v in model.state_dict().items():
    k = (k.replace("attention.q_proj", "attention.attention.query")
         .replace("attention.k_proj", "attention.attention.key")
         .replace("attention.v_proj", "attention.attention.value")
         .replace("attention.o_proj", "attention.output.dense")
         .replace("mlp.down_proj", "mlp.weights_out"))
    if "mlp.gate_proj" in k:
      k = k.replace("mlp.gate_proj", "mlp.weights_in")
      v = torch.empty((2 * v.shape[0], *v.shape[1:]), device="meta")
    elif "mlp.up_proj" in k:
      continue
    out[k] = v.shape
  return out


def test_config_from_hf_rejects_unsupported():
  base = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2}
  with pytest.raises(UserError, match="hidden_act 'relu'"):
    config_from_transformers({**base, "hidden_act": "relu"})
  with pytest.raises(UserError, match="model_type is 'vit'"):
    config_from_transformers({**base, "model_type": "vit"})
  with pytest.raises(UserError, match="image_size"):
    config_from_transformers({**base, "image_size": [224, 112]})
  with pytest.raises(UserError, match="num_hidden_layers"):
    config_from_transformers({k: v for k, v in base.items() if k != "num_hidden_layers"})
  with pytest.raises(UserError, match="unknown DINOv2 preset"):
    dm.Dinov2Config.preset("h")


# ---------------------------------------------------------------------------------- bad input

def test_folder_without_weights(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(UserError, match=f"{tmp_path}: no weights"):
    load_dinov2(tmp_path)
  with pytest.raises(UserError, match="no such folder"):
    load_dinov2(tmp_path / "nope")


def test_pickle_only_folder(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\)"):
    load_dinov2(tmp_path)


def test_config_missing(hf_folders, tmp_path):
  _, folder = hf_folders["mlp"]
  (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
  with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: missing"):
    load_dinov2(tmp_path)


def _copy_with(folder, tmp_path, edit):
  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  return tmp_path


def test_missing_key(hf_folders, tmp_path):
  _, folder = hf_folders["reg"]
  bad = _copy_with(folder, tmp_path, lambda t: t.pop("embeddings.register_tokens"))
  with pytest.raises(UserError, match=f"{bad}: missing key 'embeddings.register_tokens'"):
    load_dinov2(bad)


def test_unexpected_key(hf_folders, tmp_path):
  _, folder = hf_folders["mlp"]
  bad = _copy_with(folder, tmp_path,
                   lambda t: t.update({"encoder.layer.2.norm1.weight": np.ones(32, np.float32)}))
  with pytest.raises(UserError, match="unexpected key 'encoder.layer.2.norm1.weight'"):
    load_dinov2(bad)


def test_wrong_shape(hf_folders, tmp_path):
  _, folder = hf_folders["swiglu"]
  key = "encoder.layer.1.mlp.weights_in.weight"
  bad = _copy_with(folder, tmp_path, lambda t: t.update({key: t[key][:64]}))
  with pytest.raises(UserError, match=rf"key '{key}' has shape \(64, 32\)"):
    load_dinov2(bad)


def test_every_param_has_logical_axes():
  model = dm.abstract_dinov2(dm.Dinov2Config.preset("s", registers=4, num_layers=1))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), (path, names)
