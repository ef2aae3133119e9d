"""UNet2DCondition vs diffusers' UNet2DConditionModel: per block, per model, and the converter.

Tiny random-weight diffusers UNets are saved with `save_pretrained` into tmp folders, loaded with
`load_unet` and run on the same inputs (NCHW <-> NHWC converted here). Parity tolerance: max
abs difference <= 1e-4 x the reference output's max abs (float32 on CPU).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as TorchResnet
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer
from flax import nnx
from safetensors.numpy import load_file, save_file

from imprint_jax.convert import common
from imprint_jax.convert.unet import (config_from_diffusers, config_to_diffusers, load_unet,
                                      resnet_rules, save_unet, transformer_rules, unet_rules)
from imprint_jax.errors import UserError
from imprint_jax.models import unet as unet_lib
from imprint_jax.models import unet_blocks
from imprint_jax.parallel import compiler

REL_TOL = 1e-4
CTX_DIM = 32

SD1 = dict(  # SD 1.x style: conv projections, one int head count, CrossAttn + plain ends
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    cross_attention_dim=CTX_DIM, sample_size=8, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD2 = dict(  # SD 2.x style: linear projections, per-block head counts, upcast, deeper mid
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
    cross_attention_dim=CTX_DIM, sample_size=8, attention_head_dim=(2, 4),
    use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=(1, 2),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD3LEVEL = dict(  # SD's layout in miniature: CrossAttn x2 + plain, 2 resnets per block
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
    cross_attention_dim=CTX_DIM, sample_size=8, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


# ----------------------------------------------------------------------------- helpers

def _perturb_norms(module: torch.nn.Module, seed: int) -> None:
  """GroupNorm/LayerNorm start at (1, 0); make them random so the mapping is really tested."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 and ("norm" in name):
        p.add_(0.2 * torch.randn(p.shape, generator=g))


def _torch_unet(seed: int = 0, **kw) -> UNet2DConditionModel:
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**kw).eval()
  _perturb_norms(model, seed)
  return model


def _save(model: torch.nn.Module, folder) -> str:
  model.save_pretrained(folder)  # safetensors by default
  return str(folder)


def _inputs(c: int, h: int, w: int, seed: int = 0, b: int = 2, length: int = 7):
  rs = np.random.RandomState(seed)
  x_BCHW = rs.randn(b, c, h, w).astype(np.float32)
  ctx = rs.randn(b, length, CTX_DIM).astype(np.float32)
  return x_BCHW, ctx


_FWD_CACHE = {}
# XLA:CPU's LLVM optimisations dominate compile time here and do not change the math tested.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}


def _forward(unet: unet_lib.UNet2DCondition, x_BCHW: np.ndarray, t, ctx: np.ndarray
             ) -> np.ndarray:
  """Our UNet on NCHW numpy input, NCHW numpy output; one compile per module structure."""
  graphdef, state = nnx.split(unet)
  if graphdef not in _FWD_CACHE:
    _FWD_CACHE[graphdef] = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c),
                                   compiler_options=_FAST_COMPILE)
  out = _FWD_CACHE[graphdef](state, jnp.asarray(x_BCHW.transpose(0, 2, 3, 1)), jnp.asarray(t),
                             jnp.asarray(ctx))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _reference(model: UNet2DConditionModel, x_BCHW, t, ctx) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x_BCHW), torch.from_numpy(np.asarray(t)),
                 torch.from_numpy(ctx)).sample.numpy()


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
  assert out.shape == ref.shape, (out.shape, ref.shape)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  """The SD1-style model: torch reference, its folder, our loaded UNet, inputs, both outputs."""
  model = _torch_unet(0, **SD1)
  folder = _save(model, tmp_path_factory.mktemp("sd1"))
  x, ctx = _inputs(4, 8, 8)
  t = np.array([10, 999])
  unet = load_unet(folder)
  return dict(folder=folder, model=model, unet=unet, x=x, ctx=ctx, t=t,
              ref=_reference(model, x, t, ctx), out=_forward(unet, x, t, ctx))


# ----------------------------------------------------------------------------- per block

def test_resnet_block_parity():
  torch.manual_seed(1)
  ref_block = TorchResnet(in_channels=32, out_channels=48, temb_channels=64, groups=8,
                          eps=1e-5).eval()
  _perturb_norms(ref_block, 1)
  block = unet_blocks.ResnetBlock2D(32, 48, 64, groups=8, eps=1e-5, dtype=jnp.float32,
                                 rngs=nnx.Rngs(0))
  tensors = {k: v.numpy() for k, v in ref_block.state_dict().items()}
  common.load_into(block, resnet_rules("", (), shortcut=True), tensors, source="test",
                   what="ResnetBlock2D")
  rs = np.random.RandomState(0)
  x, temb = rs.randn(2, 32, 6, 5).astype(np.float32), rs.randn(2, 64).astype(np.float32)
  with torch.no_grad():
    ref = ref_block(torch.from_numpy(x), torch.from_numpy(temb)).numpy()
  out = nnx.jit(lambda m, a, b: m(a, b))(block, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                         jnp.asarray(temb))
  assert _rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) <= REL_TOL


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' own deprecation notice
@pytest.mark.parametrize("linear_proj", [False, True])
def test_transformer2d_parity(linear_proj):
  torch.manual_seed(2)
  ref_block = TorchTransformer(4, 8, in_channels=32, num_layers=2, cross_attention_dim=CTX_DIM,
                               norm_num_groups=8, use_linear_projection=linear_proj,
                               upcast_attention=True).eval()
  _perturb_norms(ref_block, 2)
  block = unet_blocks.Transformer2DModel(32, 4, 2, CTX_DIM, groups=8, upcast=True,
                                      dtype=jnp.float32, rngs=nnx.Rngs(0))
  tensors = {k: v.numpy() for k, v in ref_block.state_dict().items()}
  common.load_into(block, transformer_rules("", (), 2, linear_proj), tensors, source="test",
                   what="Transformer2DModel")
  rs = np.random.RandomState(1)
  x, ctx = rs.randn(2, 32, 5, 6).astype(np.float32), rs.randn(2, 7, CTX_DIM).astype(np.float32)
  with torch.no_grad():
    ref = ref_block(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).sample
  out = nnx.jit(lambda m, a, b: m(a, b))(block, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                         jnp.asarray(ctx))
  assert _rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref.numpy()) <= REL_TOL


def test_timestep_embedding_matches_diffusers():
  t = np.array([0, 1, 10.5, 999], np.float32)
  for flip, shift, dim in [(True, 0, 32), (False, 1, 33)]:
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    out = unet_blocks.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip,
                                      freq_shift=shift)
    # Angles reach ~1000 rad at t=999, where one float32 ulp is 6e-5: exp() in XLA and in
    # PyTorch may round the frequencies one ulp apart.
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


# ----------------------------------------------------------------------------- whole model

def test_sd1_style_parity(sd1):
  assert sd1["unet"].cfg.heads == (4, 4) and not sd1["unet"].cfg.use_linear_projection
  assert _rel_err(sd1["out"], sd1["ref"]) <= REL_TOL
  # Every parameter carries one logical axis name (or None) per dimension.
  for path, var in nnx.to_flat_state(nnx.state(sd1["unet"], nnx.Param)):
    assert len(var.get_metadata()["out_sharding"]) == var.get_value().ndim, path


def test_accelerator_forms_match_reference(sd1):
  """Traced for a GPU/TPU (`compiler.compiling_for`), the UNet uses
  `jax.nn.dot_product_attention` and reduction GroupNorm instead of the CPU forms; both match
  diffusers, forward and backward."""
  graphdef, state = nnx.split(sd1["unet"])
  args = (jnp.asarray(sd1["x"].transpose(0, 2, 3, 1)), jnp.asarray(sd1["t"]),
          jnp.asarray(sd1["ctx"]))

  def make_run():  # a new function per platform: JAX caches traces per function object
    def run(s, x, t, c):
      out = nnx.merge(graphdef, s)(x, t, c)
      return out, jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(x, t, c) ** 2))(s)
    return run

  results, jaxprs = {}, {}
  for name in ("cpu", "gpu"):
    run = make_run()
    with compiler.compiling_for(name):
      results[name] = jax.jit(run, compiler_options=_FAST_COMPILE)(state, *args)
      jaxprs[name] = str(jax.make_jaxpr(run)(state, *args))
    assert compiler.platform() == jax.default_backend()
  assert jaxprs["cpu"] != jaxprs["gpu"]  # the two forms really are different code
  out_gpu = np.asarray(results["gpu"][0]).transpose(0, 3, 1, 2)
  assert _rel_err(out_gpu, sd1["ref"]) <= REL_TOL
  for (path, a), (_, b) in zip(nnx.to_flat_state(results["gpu"][1]),
                               nnx.to_flat_state(results["cpu"][1])):
    b = np.asarray(b[...])
    np.testing.assert_allclose(np.asarray(a[...]), b, rtol=0,
                               atol=1e-4 * float(np.abs(b).max()) + 1e-12, err_msg=str(path))


def test_sd2_style_parity(tmp_path):
  model = _torch_unet(1, **SD2)
  unet = load_unet(_save(model, tmp_path))
  assert unet.cfg.heads == (2, 4) and unet.cfg.upcast_attention
  x, ctx = _inputs(4, 8, 8, seed=1)
  t = np.array([3.5, 700.25], np.float32)  # fractional timesteps
  assert _rel_err(_forward(unet, x, t, ctx), _reference(model, x, t, ctx)) <= REL_TOL


def test_three_level_parity_odd_size(tmp_path):
  """SD's block pattern; 10x14 latents make diffusers upsample 3->5 to match the skip (odd)."""
  model = _torch_unet(2, **SD3LEVEL)
  unet = load_unet(_save(model, tmp_path))
  x, ctx = _inputs(4, 10, 14, seed=2)
  t = np.array([1, 500])
  assert _rel_err(_forward(unet, x, t, ctx), _reference(model, x, t, ctx)) <= REL_TOL


def test_nine_channel_parity_and_widen_conv_in(sd1, tmp_path):
  model = _torch_unet(3, **SD1, in_channels=9)
  unet9 = load_unet(_save(model, tmp_path))
  x9, ctx = _inputs(9, 8, 8, seed=3)
  t = np.array([10, 999])
  assert _rel_err(_forward(unet9, x9, t, ctx), _reference(model, x9, t, ctx)) <= REL_TOL

  # Widened: the extra input channels have zero weights, so whatever they hold (random here),
  # the output is the 4-channel UNet's.
  widened = unet_lib.widen_conv_in(sd1["unet"], 9)
  assert widened.cfg.in_channels == 9 and sd1["unet"].cfg.in_channels == 4
  kernel = np.asarray(widened.conv_in.kernel[...])
  np.testing.assert_array_equal(kernel[:, :, :4], np.asarray(sd1["unet"].conv_in.kernel[...]))
  assert not kernel[:, :, 4:].any()
  x = np.concatenate([sd1["x"], np.random.RandomState(9).randn(2, 5, 8, 8).astype(np.float32)
                      * 3], axis=1)
  np.testing.assert_allclose(_forward(widened, x, sd1["t"], sd1["ctx"]), sd1["out"],
                             rtol=0, atol=1e-6)
  with pytest.raises(UserError, match="in_channels=3"):
    unet_lib.widen_conv_in(sd1["unet"], 3)


def test_remat_same_output(sd1):
  unet = load_unet(sd1["folder"], remat="full")
  assert unet.cfg.remat == "full"
  out = _forward(unet, sd1["x"], sd1["t"], sd1["ctx"])
  np.testing.assert_allclose(out, sd1["out"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_remat_same_gradients(sd1):
  """Gradients through the checkpointed blocks equal the plain ones (two ~10 s compiles)."""
  def loss(m, x, t, c):
    return jnp.mean(m(x, t, c) ** 2)
  args = (jnp.asarray(sd1["x"].transpose(0, 2, 3, 1)), jnp.asarray(sd1["t"]),
          jnp.asarray(sd1["ctx"]))
  grads = {}
  for remat in ("none", "full", "dots"):
    unet = load_unet(sd1["folder"], remat=remat)
    grads[remat] = nnx.to_flat_state(nnx.jit(nnx.grad(loss))(unet, *args))
  for remat in ("full", "dots"):
    for (path, a), (_, b) in zip(grads[remat], grads["none"]):
      b = np.asarray(b[...])
      np.testing.assert_allclose(np.asarray(a[...]), b, rtol=0,
                                 atol=1e-5 * float(np.abs(b).max()) + 1e-12, err_msg=str(path))


def test_bfloat16_compute_close_to_float32(sd1):
  """Measured: max abs diff ~1e-2 of the output's max abs (bf16 has 8 mantissa bits)."""
  unet = load_unet(sd1["folder"], dtype="bfloat16")
  params = nnx.state(unet, nnx.Param)
  assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(params))
  out = _forward(unet, sd1["x"], sd1["t"], sd1["ctx"])
  assert out.dtype == np.float32
  err = _rel_err(out, sd1["out"])
  print(f"bfloat16 vs float32: max abs diff / max abs = {err:.2e}")
  assert err <= 3e-2


# ----------------------------------------------------------------------------- converter

def _normalise(config: dict) -> dict:
  out = {}
  for k, v in config.items():
    if not k.startswith("_"):
      out[k] = list(v) if isinstance(v, tuple) else v
  return out


@pytest.mark.parametrize("name, kw", [("sd1", SD1), ("sd2", SD2),
                                      ("nine", dict(SD1, in_channels=9))])
def test_round_trip_bit_identical(tmp_path, name, kw):
  src = _save(_torch_unet(4, **kw), tmp_path / "src")
  out = tmp_path / "out"
  save_unet(load_unet(src), out)
  a = load_file(f"{src}/diffusion_pytorch_model.safetensors")
  b = load_file(str(out / "diffusion_pytorch_model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k

  model, info = UNet2DConditionModel.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"] and not info["error_msgs"], info
  # Our config.json describes the same model as the original one, key for key.
  original = UNet2DConditionModel.from_pretrained(src)
  assert _normalise(dict(model.config)) == _normalise(dict(original.config))


def test_pipeline_folder_uses_unet_subfolder(sd1, tmp_path):
  (tmp_path / "model_index.json").write_text("{}")
  save_unet(sd1["unet"], tmp_path / "unet")
  unet = load_unet(tmp_path)
  assert unet.cfg == sd1["unet"].cfg


def test_config_round_trip_and_presets():
  for cfg in (unet_lib.UNetConfig.sd15(), unet_lib.UNetConfig.sd21()):
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
  sd21 = unet_lib.UNetConfig.sd21()
  assert sd21.heads == (5, 10, 20, 20)  # head width 64 everywhere
  assert [c // h for c, h in zip(sd21.block_out_channels, sd21.heads)] == [64] * 4
  assert unet_lib.UNetConfig.sd15().heads == (8,) * 4
  # Every key the table names exists in a real-size diffusers UNet with the same shapes.
  for cfg in (unet_lib.UNetConfig.sd15(), sd21):
    with torch.device("meta"):
      model = UNet2DConditionModel(**config_to_diffusers(cfg))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rules = unet_rules(cfg)
    assert {r.torch for r in rules} == set(want)


@pytest.mark.slow
def test_real_size_shapes_match_diffusers():
  """Every rule's shape (through its transform) matches a real-size SD 1.5 / 2.1 UNet."""
  for cfg in (unet_lib.UNetConfig.sd15(), unet_lib.UNetConfig.sd21()):
    with torch.device("meta"):
      model = UNet2DConditionModel(**config_to_diffusers(cfg))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    abstract = unet_lib.abstract_unet(cfg)
    leaves = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    for r in unet_rules(cfg):
      shape = tuple(common.TRANSFORMS[r.kind][2](tuple(leaves[r.path].shape)))
      assert shape == want[r.torch], r


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs(sd1, tmp_path):
  cfg_text = (  # a config.json from the good folder
      open(f"{sd1['folder']}/config.json").read())

  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(cfg_text)
  with pytest.raises(UserError, match="no weights"):
    load_unet(no_weights)

  pickled = tmp_path / "pickled"
  sd1["model"].save_pretrained(pickled, safe_serialization=False)
  with pytest.raises(UserError, match=r"diffusion_pytorch_model\.bin"):
    load_unet(pickled)

  with pytest.raises(UserError, match="no such folder"):
    load_unet(tmp_path / "absent")

  # (key, value, what the message must name)
  for key, value, named in [
      ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"], "'AttnDownBlock2D'"),
      ("down_block_types", ["CrossAttnDownBlock3D", "DownBlock2D"], "'CrossAttnDownBlock3D'"),
      ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "'AttnUpBlock2D'"),
      ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'UNetMidBlock2DSimpleCrossAttn'"),
      ("class_embed_type", "timestep", "class_embed_type='timestep'"),
      ("addition_embed_type", "text", "addition_embed_type='text'"),
      ("time_cond_proj_dim", 8, "time_cond_proj_dim=8"),
      ("encoder_hid_dim", 16, "encoder_hid_dim=16"),
      ("dual_cross_attention", True, "dual_cross_attention=True"),
      ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
      ("conv_in_kernel", 7, "conv_in_kernel=7"),
      ("only_cross_attention", True, "only_cross_attention=True"),
      ("num_attention_heads", 4, "num_attention_heads=4"),
      ("block_out_channels", [32, 60], "block_out_channels\\[1\\]=60"),
  ]:
    config = json.loads(cfg_text)
    config[key] = value
    with pytest.raises(UserError, match=named):
      config_from_diffusers(config)

  good = load_file(f"{sd1['folder']}/diffusion_pytorch_model.safetensors")
  broken = tmp_path / "broken"

  def write(tensors):
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text(cfg_text)
    save_file(tensors, str(broken / "diffusion_pytorch_model.safetensors"))

  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  write({k: v for k, v in good.items() if k != key})
  with pytest.raises(UserError, match=f"missing key '{key}'"):
    load_unet(broken)

  write({**good, key: np.zeros((3, 3), np.float32)})
  with pytest.raises(UserError, match=rf"'{key}' has shape \(3, 3\)"):
    load_unet(broken)

  write({**good, "extra.weight": np.zeros(2, np.float32)})
  with pytest.raises(UserError, match="unexpected key 'extra.weight'"):
    load_unet(broken)

  (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match="not a readable safetensors"):
    load_unet(broken)
