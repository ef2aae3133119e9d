"""Model FLOPs of IMPRINT's training steps and of a composite, counted from the configs.

Counting rule (the usual one for MFU, as in PaLM's appendix B or torch's FlopCounterMode):

  * only matrix products and convolutions count: a dense layer (N, in) x (in, out) is
    2 N in out, a k x k convolution 2 H_out W_out k^2 C_in C_out (padding taps included, as
    torch counts them), attention's two products 2 B L_q L_k D each; biases, norms,
    activations, softmax and the optimizer update are left out (a few % of XLA's count).
  * training: every such op costs F forward; its backward costs F more for the input gradient
    when its input depends on a trained parameter (a trained norm's scale and bias count),
    and F more for the weight gradient when its weights are trained. So an op inside a trained network costs 3F, the first layer of a
    trained network (its input is data) 2F, a frozen op on the gradient's path (e.g. the
    frozen UNet encoder in stage 1, through which the gradient reaches the image encoder's
    tokens via cross-attention) 2F, and a frozen op off it (the VAE, stage 2's DINOv2) F.
    This is exactly what autograd computes (tests/test_benchmarks.py checks it against torch's
    FlopCounterMode on a real step).
  * recomputation under gradient checkpointing (remat) is not counted: these are model FLOPs,
    not hardware FLOPs.

    .venv/bin/python benchmarks/flops.py            # the real configs: SD 1.5 + ViT-g/14
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imprint_jax.models.adapter import AdapterConfig  # noqa: E402
from imprint_jax.models.dinov2 import Dinov2Config  # noqa: E402
from imprint_jax.models.imprint import ImprintConfig  # noqa: E402
from imprint_jax.models.unet import UNetConfig  # noqa: E402
from imprint_jax.models.vae import VAEConfig  # noqa: E402


class Counter:
  """Accumulates forward and training FLOPs per part; activations carry a `dep` flag (does the
  value depend on a trained parameter?) through the walk of the network."""

  def __init__(self):
    self.forward = collections.Counter()
    self.train = collections.Counter()

  def weighted(self, part: str, flops: float, dep: bool, trained: bool) -> bool:
    """A dense layer or a convolution; returns the output's dep flag."""
    self.forward[part] += flops
    self.train[part] += flops * (1 + dep + trained)
    return dep or trained

  def product(self, part: str, flops: float, dep_a: bool, dep_b: bool) -> bool:
    """A product of two activations (attention scores, attention output)."""
    self.forward[part] += flops
    self.train[part] += flops * (1 + dep_a + dep_b)
    return dep_a or dep_b

  def dense(self, part, n, d_in, d_out, dep, trained):
    return self.weighted(part, 2.0 * n * d_in * d_out, dep, trained)

  def conv(self, part, b, h_out, w_out, k, c_in, c_out, dep, trained):
    return self.weighted(part, 2.0 * b * h_out * w_out * k * k * c_in * c_out, dep, trained)

  @staticmethod
  def norm(dep: bool, trained: bool) -> bool:
    """A LayerNorm/GroupNorm: no FLOPs counted, but a trained scale and bias make its output
    depend on trained parameters (so the next layer needs an input gradient)."""
    return dep or trained

  def attention(self, part, b, l_q, l_k, width, q_dep, k_dep, v_dep):
    """softmax(q k^T) v over all heads: width = heads x head_dim."""
    s_dep = self.product(part, 2.0 * b * l_q * l_k * width, q_dep, k_dep)
    return self.product(part, 2.0 * b * l_q * l_k * width, s_dep, v_dep)

  def total_forward(self) -> float:
    return float(sum(self.forward.values()))

  def total_train(self) -> float:
    return float(sum(self.train.values()))


# ------------------------------------------------------------------------------- the networks

def unet(c: Counter, cfg: UNetConfig, b: int, h: int, w: int, ctx_len: int, ctx_dep: bool,
         train_decoder: bool, train_rest: bool, part: str = "unet") -> None:
  """The SD UNet on (b, h, w, in_channels) latents with a (b, ctx_len, cross_dim) context."""
  ch0, t_dim = cfg.block_out_channels[0], cfg.time_embed_dim
  e = cfg.cross_attention_dim

  temb_dep = c.dense(part, b, ch0, t_dim, False, train_rest)
  temb_dep = c.dense(part, b, t_dim, t_dim, temb_dep, train_rest)

  def resnet(x_dep, c_in, c_out, hh, ww, trained):
    d = c.conv(part, b, hh, ww, 3, c_in, c_out, c.norm(x_dep, trained), trained)
    d = c.dense(part, b, t_dim, c_out, temb_dep, trained) or d
    d = c.conv(part, b, hh, ww, 3, c_out, c_out, c.norm(d, trained), trained)
    skip = c.dense(part, b * hh * ww, c_in, c_out, x_dep, trained) if c_in != c_out else x_dep
    return d or skip

  def transformer(x_dep, ch, depth, hh, ww, trained):
    n = b * hh * ww
    t = c.dense(part, n, ch, ch, c.norm(x_dep, trained), trained)       # proj_in
    for _ in range(depth):
      h = c.norm(t, trained)
      q = c.dense(part, n, ch, ch, h, trained)                           # attn1
      k = c.dense(part, n, ch, ch, h, trained)
      v = c.dense(part, n, ch, ch, h, trained)
      o = c.attention(part, b, hh * ww, hh * ww, ch, q, k, v)
      t = c.dense(part, n, ch, ch, o, trained) or t
      q = c.dense(part, n, ch, ch, c.norm(t, trained), trained)         # attn2
      k = c.dense(part, b * ctx_len, e, ch, ctx_dep, trained)
      v = c.dense(part, b * ctx_len, e, ch, ctx_dep, trained)
      o = c.attention(part, b, hh * ww, ctx_len, ch, q, k, v)
      t = c.dense(part, n, ch, ch, o, trained) or t
      f = c.dense(part, n, ch, 8 * ch, c.norm(t, trained), trained)     # GEGLU
      t = c.dense(part, n, 4 * ch, ch, f, trained) or t
    return c.dense(part, n, ch, ch, t, trained) or x_dep                 # proj_out

  boc = cfg.block_out_channels
  x = c.conv(part, b, h, w, 3, cfg.in_channels, ch0, False, train_rest)
  skips = [(x, ch0, h, w)]
  in_ch = ch0
  for i, out_ch in enumerate(boc):
    for j in range(cfg.layers_per_block):
      x = resnet(x, in_ch if j == 0 else out_ch, out_ch, h, w, train_rest)
      if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
        x = transformer(x, out_ch, cfg.transformer_depths[i], h, w, train_rest)
      skips.append((x, out_ch, h, w))
    if i < len(boc) - 1:
      h, w = (h + 1) // 2, (w + 1) // 2
      x = c.conv(part, b, h, w, 3, out_ch, out_ch, x, train_rest)
      skips.append((x, out_ch, h, w))
    in_ch = out_ch
  x = resnet(x, boc[-1], boc[-1], h, w, train_rest)
  x = transformer(x, boc[-1], cfg.transformer_depths[-1], h, w, train_rest)
  x = resnet(x, boc[-1], boc[-1], h, w, train_rest)
  rev = boc[::-1]
  prev = rev[0]
  for i, out_ch in enumerate(rev):
    for j in range(cfg.layers_per_block + 1):
      s_dep, s_ch, _, _ = skips.pop()
      x = resnet(x or s_dep, (prev if j == 0 else out_ch) + s_ch, out_ch, h, w, train_decoder)
      if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
        x = transformer(x, out_ch, cfg.transformer_depths[::-1][i], h, w, train_decoder)
    if i < len(rev) - 1:
      _, _, h, w = skips[-1]
      x = c.conv(part, b, h, w, 3, out_ch, out_ch, x, train_decoder)
    prev = out_ch
  c.conv(part, b, h, w, 3, ch0, cfg.out_channels, c.norm(x, train_decoder), train_decoder)


def dinov2_tokens(cfg: Dinov2Config, image_size: int) -> int:
  g = image_size // cfg.patch_size
  return 1 + cfg.num_register_tokens + g * g


def dinov2(c: Counter, cfg: Dinov2Config, b: int, image_size: int, trained: bool,
           part: str = "dinov2") -> bool:
  """DINOv2 on (b, E, E, 3); returns the dep flag of its tokens."""
  g = image_size // cfg.patch_size
  d, hid = cfg.hidden_size, cfg.mlp_hidden
  n_tok = dinov2_tokens(cfg, image_size)
  n = b * n_tok
  x = c.conv(part, b, g, g, cfg.patch_size, cfg.num_channels, d, False, trained)
  x = c.norm(x, trained)  # cls/register tokens and position embeddings are parameters too
  for _ in range(cfg.num_layers):
    h = c.norm(x, trained)
    q, k, v = (c.dense(part, n, d, d, h, trained) for _ in range(3))
    o = c.attention(part, b, n_tok, n_tok, d, q, k, v)
    x = c.dense(part, n, d, d, o, trained) or x
    f = c.dense(part, n, d, 2 * hid if cfg.use_swiglu_ffn else hid, c.norm(x, trained), trained)
    x = c.dense(part, n, hid, d, f, trained) or x
  return c.norm(x, trained)


def adapter(c: Counter, cfg: AdapterConfig, b: int, n_tok: int, dep: bool, trained: bool,
            part: str = "adapter") -> bool:
  n, w = b * n_tok, cfg.width
  x = c.dense(part, n, cfg.in_dim, w, dep, trained) if cfg.has_proj_in else dep
  for _ in range(cfg.depth):
    h = c.norm(x, trained)
    q, k, v = (c.dense(part, n, w, w, h, trained) for _ in range(3))
    o = c.attention(part, b, n_tok, n_tok, w, q, k, v)
    x = c.dense(part, n, w, w, o, trained) or x
    f = c.dense(part, n, w, cfg.mlp_hidden, c.norm(x, trained), trained)
    x = c.dense(part, n, cfg.mlp_hidden, w, f, trained) or x
  return c.dense(part, n, w, cfg.out_dim, c.norm(x, trained), trained)


def _vae_resnet(c, part, b, hh, ww, c_in, c_out):
  c.conv(part, b, hh, ww, 3, c_in, c_out, False, False)
  c.conv(part, b, hh, ww, 3, c_out, c_out, False, False)
  if c_in != c_out:
    c.conv(part, b, hh, ww, 1, c_in, c_out, False, False)


def _vae_mid(c, part, cfg, b, hh, ww):
  ch = cfg.block_out_channels[-1]
  _vae_resnet(c, part, b, hh, ww, ch, ch)
  if cfg.mid_block_add_attention:
    n = hh * ww
    for _ in range(4):
      c.dense(part, b * n, ch, ch, False, False)
    c.attention(part, b, n, n, ch, False, False, False)
  _vae_resnet(c, part, b, hh, ww, ch, ch)


def vae_encode(c: Counter, cfg: VAEConfig, b: int, size: int, part: str = "vae_encode") -> None:
  """The frozen VAE encoder on (b, size, size, 3) images (always forward only)."""
  boc = cfg.block_out_channels
  h = size
  c.conv(part, b, h, h, 3, cfg.in_channels, boc[0], False, False)
  for i, out_ch in enumerate(boc):
    for j in range(cfg.layers_per_block):
      _vae_resnet(c, part, b, h, h, boc[max(i - 1, 0)] if j == 0 else out_ch, out_ch)
    if i < len(boc) - 1:
      h //= 2
      c.conv(part, b, h, h, 3, out_ch, out_ch, False, False)
  _vae_mid(c, part, cfg, b, h, h)
  c.conv(part, b, h, h, 3, boc[-1], 2 * cfg.latent_channels, False, False)
  if cfg.use_quant_conv:
    c.conv(part, b, h, h, 1, 2 * cfg.latent_channels, 2 * cfg.latent_channels, False, False)


def vae_decode(c: Counter, cfg: VAEConfig, b: int, size: int, part: str = "vae_decode") -> None:
  """The VAE decoder producing (b, size, size, 3) images."""
  boc, lc = cfg.block_out_channels, cfg.latent_channels
  h = size // cfg.downsample_factor
  if cfg.use_post_quant_conv:
    c.conv(part, b, h, h, 1, lc, lc, False, False)
  c.conv(part, b, h, h, 3, lc, boc[-1], False, False)
  _vae_mid(c, part, cfg, b, h, h)
  rev = boc[::-1]
  for i, out_ch in enumerate(rev):
    for j in range(cfg.layers_per_block + 1):
      _vae_resnet(c, part, b, h, h, rev[max(i - 1, 0)] if j == 0 else out_ch, out_ch)
    if i < len(rev) - 1:
      h *= 2
      c.conv(part, b, h, h, 3, out_ch, out_ch, False, False)
  c.conv(part, b, h, h, 3, boc[0], cfg.out_channels, False, False)


# ------------------------------------------------------------------------------- whole steps

@dataclasses.dataclass
class StepFlops:
  """FLOPs of one step: `total` (what MFU divides), `forward` (the forward pass alone) and
  their split by part (dinov2, adapter, unet, vae_encode, vae_decode)."""
  total: float
  forward: float
  by_part: dict[str, float]


def _result(c: Counter, train: bool) -> StepFlops:
  parts = c.train if train else c.forward
  return StepFlops(total=c.total_train() if train else c.total_forward(),
                   forward=c.total_forward(), by_part={k: float(v) for k, v in parts.items()})


def train_step(cfg: ImprintConfig, stage: int, batch: int, encoder_size: int,
               generator_size: int, object_tokens: bool = False,
               latents: bool = False) -> StepFlops:
  """Model FLOPs of one training step on `batch` pairs.

  stage 1 trains DINOv2, the adapter and the UNet decoder (up blocks, conv_norm_out,
  conv_out) and encodes the target with the VAE; stage 2 trains the adapter and the whole
  UNet (DINOv2 frozen) and encodes the target and the masked target; with `object_tokens`
  (stage 2 on precomputed tokens) it does not run DINOv2, with `latents` (stage 2 on
  precomputed VAE posteriors) not the VAE encoder.
  """
  c = Counter()
  for _ in range(0 if latents else stage):  # stage 2 also encodes the masked background
    vae_encode(c, cfg.vae, batch, generator_size)
  tok = False if object_tokens else dinov2(c, cfg.dinov2, batch, encoder_size,
                                           trained=stage == 1)
  ctx = adapter(c, cfg.adapter, batch, dinov2_tokens(cfg.dinov2, encoder_size), tok,
                trained=True)
  lat = generator_size // cfg.vae.downsample_factor
  unet(c, cfg.unet, batch, lat, lat, dinov2_tokens(cfg.dinov2, encoder_size), ctx,
       train_decoder=True, train_rest=stage == 2)
  return _result(c, train=True)


def composite(cfg: ImprintConfig, batch: int, encoder_size: int, generator_size: int,
              steps: int, guidance: bool = True) -> StepFlops:
  """Model FLOPs of compositing `batch` images: encode the object and both backgrounds once,
  `steps` UNet calls on the doubled batch (classifier-free guidance), one VAE decode."""
  c = Counter()
  dinov2(c, cfg.dinov2, batch, encoder_size, trained=False)
  n_tok = dinov2_tokens(cfg.dinov2, encoder_size)
  adapter(c, cfg.adapter, batch, n_tok, False, trained=False)
  vae_encode(c, cfg.vae, 2 * batch, generator_size)
  lat = generator_size // cfg.vae.downsample_factor
  one = Counter()
  unet(one, cfg.unet, batch * (2 if guidance else 1), lat, lat, n_tok, False, False, False)
  c.forward["unet"] += steps * one.total_forward()
  vae_decode(c, cfg.vae, batch, generator_size)
  return _result(c, train=False)


def unet_forward(cfg: UNetConfig, batch: int, latent_hw: int, ctx_len: int) -> float:
  """Forward FLOPs of one UNet call."""
  c = Counter()
  unet(c, cfg, batch, latent_hw, latent_hw, ctx_len, False, False, False)
  return c.total_forward()


def main(argv=None) -> None:
  import argparse
  p = argparse.ArgumentParser(description="FLOPs of the real IMPRINT configs")
  p.add_argument("--batch", type=int, default=1)
  args = p.parse_args(argv)
  cfg = ImprintConfig(
      dinov2=Dinov2Config.preset("g", registers=4),
      adapter=AdapterConfig(in_dim=1536, depth=5, num_heads=1, out_dim=768),
      unet=UNetConfig.sd15(), vae=VAEConfig.sd())
  print(f"SD 1.5 UNet forward, 64x64 latents, 261 context tokens:"
        f" {unet_forward(cfg.unet, 1, 64, 261) / 1e9:.1f} GFLOP per image")
  for stage in (1, 2):
    s = train_step(cfg if stage == 1 else dataclasses.replace(
        cfg, unet=cfg.unet.replace(in_channels=9)), stage, args.batch, 224, 512)
    parts = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in s.by_part.items())
    print(f"stage {stage} training step, batch {args.batch}: {s.total / 1e12:.2f} TFLOP"
          f" ({parts})")
  s = train_step(dataclasses.replace(cfg, unet=cfg.unet.replace(in_channels=9)), 2, args.batch,
                 224, 512, object_tokens=True, latents=True)
  parts = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in s.by_part.items())
  print(f"stage 2 training step on cached latents and tokens, batch {args.batch}:"
        f" {s.total / 1e12:.2f} TFLOP ({parts})")
  s = composite(dataclasses.replace(cfg, unet=cfg.unet.replace(in_channels=9)), args.batch,
                224, 512, 50)
  print(f"composite, batch {args.batch}, 50 DDIM steps with CFG: {s.total / 1e12:.2f} TFLOP")


if __name__ == "__main__":
  main()
