"""Content adapter: JAX <-> PyTorch parity through the exported folder, round trips, errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from imprint_jax.convert.adapter import adapter_rules, config_to_json, load_adapter, save_adapter
from imprint_jax.errors import UserError
from imprint_jax.models.adapter import AdapterConfig, ContentAdapter, abstract_adapter
from imprint_jax.torch_adapter import ContentAdapterTorch

PARITY_TOL = 1e-5  # max abs diff relative to the reference's max abs

CONFIGS = {
    # width != in_dim: with the input projection; two heads
    "proj": AdapterConfig(in_dim=32, width=48, depth=2, num_heads=2, out_dim=24),
    # width == in_dim (no projection), single-head blocks as in ObjectStitch
    "plain": AdapterConfig(in_dim=32, depth=2, num_heads=1, mlp_ratio=2.0, out_dim=40),
}


def _random_adapter(cfg: AdapterConfig, seed: int = 0) -> ContentAdapter:
  """An adapter with random values in every parameter (LN affines, biases, null context).

  Filled from numpy into an abstract module: eager JAX init would compile every op on CPU.
  """
  adapter = abstract_adapter(cfg)
  leaves, treedef = jax.tree.flatten(nnx.state(adapter, nnx.Param))
  rng = np.random.default_rng(seed)
  values = [jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)
                        / np.sqrt(x.shape[0] if x.ndim == 2 else 10.0)) for x in leaves]
  nnx.update(adapter, jax.tree.unflatten(treedef, values))
  return adapter


_forward = nnx.jit(lambda m, t: m(t))


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
  """(adapter, folder it was saved to)."""
  adapter = _random_adapter(CONFIGS[request.param])
  folder = tmp_path_factory.mktemp(request.param)
  save_adapter(adapter, folder)
  return adapter, folder


def test_config_defaults():
  cfg = AdapterConfig(in_dim=1536)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.out_dim) == (1536, 5, 1, 768)
  assert not cfg.has_proj_in
  assert AdapterConfig(in_dim=1536, width=1024).has_proj_in
  with pytest.raises(UserError, match="not divisible by num_heads"):
    AdapterConfig(in_dim=32, num_heads=3)


def test_torch_parity(saved):
  adapter, folder = saved
  torch_adapter = ContentAdapterTorch.from_pretrained(folder)
  x = np.random.default_rng(0).standard_normal((2, 13, 32)).astype(np.float32)
  with torch.no_grad():
    ref = torch_adapter(torch.from_numpy(x)).numpy()
  got = np.asarray(_forward(adapter, jnp.asarray(x)))
  assert got.shape == ref.shape == (2, 13, adapter.cfg.out_dim)
  assert _rel(got, ref) <= PARITY_TOL, _rel(got, ref)
  with torch.no_grad():
    np.testing.assert_array_equal(torch_adapter.null(3, 5).numpy(), np.asarray(adapter.null(3, 5)))


def test_load_round_trip_bit_exact(saved, tmp_path):
  adapter, folder = saved
  loaded = load_adapter(folder)
  assert loaded.cfg == adapter.cfg
  save_adapter(loaded, tmp_path / "again")
  first, second = load_file(folder / "diffusion_pytorch_model.safetensors"), load_file(
      tmp_path / "again" / "diffusion_pytorch_model.safetensors")
  assert sorted(first) == sorted(second)
  assert sorted(first) == sorted(r.torch for r in adapter_rules(adapter.cfg))
  for key in first:
    assert first[key].tobytes() == second[key].tobytes(), key
  assert (folder / "config.json").read_text() == (tmp_path / "again" / "config.json").read_text()
  x = jnp.ones((1, 4, 32))
  np.testing.assert_array_equal(np.asarray(_forward(loaded, x)), np.asarray(_forward(adapter, x)))


def test_legacy_folder_loads(saved, tmp_path):
  """Folders of earlier releases (model.safetensors) still load, bit for bit."""
  adapter, folder = saved
  (tmp_path / "model.safetensors").write_bytes(
      (folder / "diffusion_pytorch_model.safetensors").read_bytes())
  (tmp_path / "config.json").write_text(json.dumps(config_to_json(adapter.cfg)))
  x = jnp.ones((1, 4, 32))
  np.testing.assert_array_equal(np.asarray(_forward(load_adapter(tmp_path), x)),
                                np.asarray(_forward(adapter, x)))


def test_null_shape_and_value(saved):
  adapter, _ = saved
  null = adapter.null(3, 7)
  assert null.shape == (3, 7, adapter.cfg.out_dim)
  np.testing.assert_array_equal(np.asarray(null[2, 6]), np.asarray(adapter.null_context[...]))
  assert adapter.null(2).shape == (2, 1, adapter.cfg.out_dim)
  # Attention over L identical context tokens equals attention over one (why one vector is
  # enough at any length): softmax weights are uniform over copies of the same value.
  q, k, v = np.random.default_rng(0).standard_normal((3, 4)), np.ones((9, 4)), np.ones((9, 4))
  k[:], v[:] = np.arange(4), np.arange(4) * 2.0
  w = np.exp(q @ k.T)
  np.testing.assert_allclose((w / w.sum(1, keepdims=True)) @ v, np.broadcast_to(v[0], (3, 4)))


def test_bfloat16_compute(tmp_path):
  adapter = _random_adapter(CONFIGS["proj"])
  save_adapter(adapter, tmp_path)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 32)), jnp.float32)
  bf16 = load_adapter(tmp_path, dtype="bfloat16")
  out = _forward(bf16, x)
  assert out.dtype == jnp.bfloat16 and bf16.null(1, 2).dtype == jnp.bfloat16
  # Measured 0.4e-2 to 0.7e-2 relative over both configs and three seeds.
  assert _rel(out.astype(jnp.float32), _forward(adapter, x)) <= 3e-2


# ---------------------------------------------------------------------------------- bad input

def test_folder_without_weights(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(config_to_json(CONFIGS["plain"])))
  with pytest.raises(UserError, match=f"{tmp_path}: no weights"):
    load_adapter(tmp_path)
  with pytest.raises(ValueError, match=f"{tmp_path}: no weights"):
    ContentAdapterTorch.from_pretrained(tmp_path)


def test_pickle_only_folder(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(config_to_json(CONFIGS["plain"])))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\)"):
    load_adapter(tmp_path)


def test_config_missing_or_bad(saved, tmp_path):
  _, folder = saved
  weights = "diffusion_pytorch_model.safetensors"
  (tmp_path / weights).write_bytes((folder / weights).read_bytes())
  with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: missing"):
    load_adapter(tmp_path)
  with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: missing"):
    ContentAdapterTorch.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"in_dim": 32, "hidden": 3}))
  with pytest.raises(UserError, match="unknown adapter config key 'hidden'"):
    load_adapter(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"depth": 3}))
  with pytest.raises(UserError, match="missing 'in_dim'"):
    load_adapter(tmp_path)


def _copy_with(folder, tmp_path, edit):
  tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
  edit(tensors)
  save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  return tmp_path


def test_missing_key(saved, tmp_path):
  _, folder = saved
  bad = _copy_with(folder, tmp_path, lambda t: t.pop("null_context"))
  with pytest.raises(UserError, match=f"{bad}: missing key 'null_context'"):
    load_adapter(bad)
  with pytest.raises(ValueError, match="missing key 'null_context'"):
    ContentAdapterTorch.from_pretrained(bad)


def test_wrong_shape(saved, tmp_path):
  _, folder = saved
  key = "blocks.1.mlp.fc1.weight"
  bad = _copy_with(folder, tmp_path, lambda t: t.update({key: t[key][:, :16]}))
  with pytest.raises(UserError, match=rf"key '{key}' has shape \(\d+, 16\)"):
    load_adapter(bad)
  with pytest.raises(ValueError, match=rf"key '{key}' has shape \(\d+, 16\)"):
    ContentAdapterTorch.from_pretrained(bad)


def test_config_mismatch_is_a_key_error(saved, tmp_path):
  """A config whose depth disagrees with the weights names the first extra/missing key."""
  adapter, folder = saved
  bad = _copy_with(folder, tmp_path, lambda t: None)
  cfg = dataclasses.replace(adapter.cfg, depth=1)
  (bad / "config.json").write_text(json.dumps(config_to_json(cfg)))
  with pytest.raises(UserError, match="unexpected key 'blocks.1."):
    load_adapter(bad)


def test_every_param_has_logical_axes():
  adapter = abstract_adapter(CONFIGS["proj"])
  for path, var in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), (path, names)
