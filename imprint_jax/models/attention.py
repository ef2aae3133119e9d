"""Softmax attention, in the form each platform runs fastest (`attention`).

* TPU: splash attention, a Pallas flash-attention kernel, run per device in `shard_map` over
  the batch (and heads) split of the ambient mesh;
* GPU: cuDNN flash attention where cuDNN takes the shapes, else XLA's fused path;
* CPU: a layout of batched matmuls with a hand-written backward, over query blocks for long
  sequences (`_attention_cpu`).

The forms agree within float rounding (tests/test_layers.py). The platform is the compile
target of `parallel.compiler`; the mesh axes that split batch and heads come from
`parallel.sharding.activation_axes` (logical names only here).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from imprint_jax.errors import UserError
from imprint_jax.parallel import compiler, sharding


def attention(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *,
              upcast: bool = False) -> jax.Array:
  """Softmax attention, (B, L, H, D) layout, by platform (`compiler.platform()`):

  * TPU: splash attention (`_attention_splash`, a Pallas flash-attention kernel that never
    materialises the (L, S) scores) when both sequence lengths are multiples of 128 - the
    UNet's self-attention at 64x64, 32x32 and 16x16 latents - else XLA's fused path;
  * GPU: cuDNN flash attention (`_attention_cudnn`: keys padded to a multiple of 64, masked)
    where cuDNN takes the shapes (`cudnn_supported`), else XLA's fused path (JAX's default
    for `implementation=None` is XLA, never cuDNN); `gpu_attention("xla")` turns cuDNN off;
  * CPU: `_attention_cpu`, the layout XLA's CPU backend runs fastest.

  `upcast` computes in float32 (SD 2.x's `upcast_attention`), returning the input dtype.
  """
  dtype = q_BLHD.dtype
  if upcast:
    q_BLHD, k_BSHD, v_BSHD = (t.astype(jnp.float32) for t in (q_BLHD, k_BSHD, v_BSHD))
  where = compiler.platform()
  if where == "cpu":
    out = _attention_cpu(q_BLHD, k_BSHD, v_BSHD)
  elif where == "tpu" and splash_supported(q_BLHD.shape[1], k_BSHD.shape[1]):
    out = _attention_splash(q_BLHD, k_BSHD, v_BSHD)
  elif where == "gpu" and _GPU_ATTENTION.get() == "cudnn" and cudnn_supported(
      q_BLHD, v_BSHD):
    try:
      out = _attention_cudnn(q_BLHD, k_BSHD, v_BSHD)
    except NotImplementedError:  # JAX's further checks at trace time (vary by version)
      out = jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD)
  else:
    out = jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD)
  return out.astype(dtype)


# cuDNN's flash attention takes key lengths that are multiples of this (JAX refuses others
# for some versions and masks, e.g. the UNet's cross-attention over 261 DINOv2 tokens).
_CUDNN_KV_MULTIPLE = 64


def _attention_cudnn(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array,
                     implementation: str | None = "cudnn") -> jax.Array:
  """cuDNN flash attention; keys and values padded with zeros to a multiple of
  `_CUDNN_KV_MULTIPLE` and the padding masked out by `key_value_seq_lengths` (cuDNN's padding
  mask, which needs the query lengths too), so the result is that of the unpadded keys.
  `implementation=None` runs the same call through XLA (tests on CPU)."""
  b, l = q_BLHD.shape[:2]
  s = k_BSHD.shape[1]
  pad = -s % _CUDNN_KV_MULTIPLE
  if not pad:
    return jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD, implementation=implementation)
  k_BSHD, v_BSHD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k_BSHD, v_BSHD))
  return jax.nn.dot_product_attention(
      q_BLHD, k_BSHD, v_BSHD, query_seq_lengths=jnp.full((b,), l, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32), implementation=implementation)


_GPU_ATTENTION: contextvars.ContextVar[str] = contextvars.ContextVar("gpu_attention",
                                                                    default="cudnn")


def gpu_attention(implementation: str) -> contextlib.AbstractContextManager[None]:
  """Traces GPU attention with `implementation`: 'cudnn' (the default: cuDNN flash attention
  where `cudnn_supported`) or 'xla' (XLA's fused path everywhere; for comparisons)."""
  if implementation not in ("cudnn", "xla"):
    raise UserError(f"unknown GPU attention {implementation!r}: expected 'cudnn' or 'xla'")
  return _setting(_GPU_ATTENTION, implementation)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value: str) -> Iterator[None]:
  """Sets a tracing setting for the duration of a `with` block."""
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def cudnn_supported(q_BLHD: jax.Array, v_BSHD: jax.Array) -> bool:
  """Whether cuDNN's flash attention takes these inputs (the conditions JAX checks before
  calling it, jax/_src/cudnn/fused_attention_stablehlo.py): bf16/fp16, equal q/v head dims,
  a multiple of 8 and at most 128 (256 on Hopper and later). SD 1.5's UNet heads (40, 80,
  160) and DINOv2's (64) qualify on an H100; the one-head adapter and VAE attention do not
  and take XLA's path."""
  d = q_BLHD.shape[-1]
  if q_BLHD.dtype not in (jnp.bfloat16, jnp.float16) or v_BSHD.shape[-1] != d or d % 8:
    return False
  return d <= (256 if _gpu_compute_capability() >= (9, 0) else 128)


@functools.cache
def _gpu_compute_capability() -> tuple[int, ...]:
  """The first GPU's compute capability; (0,) when there is none (tracing for GPU from a
  CPU host)."""
  try:
    return tuple(int(x) for x in jax.devices("gpu")[0].compute_capability.split("."))
  except (RuntimeError, AttributeError, ValueError):
    return (0,)


_SPLASH_LANES = 128  # the kernel's block sizes are multiples of the TPU's 128 lanes


def splash_supported(q_len: int, kv_len: int) -> bool:
  return q_len % _SPLASH_LANES == 0 and kv_len % _SPLASH_LANES == 0


def _splash_block(n: int) -> int:
  return next(b for b in (512, 256, 128) if n % b == 0)


def _attention_splash(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *,
                      interpret: bool = False) -> jax.Array:
  """Splash attention (jax.experimental.pallas.ops.tpu) with a full (unmasked) mask, one
  kernel call per sample. A Pallas call is not partitioned by XLA, so under a mesh it runs in
  `shard_map` over the mesh axes that split the batch and the heads (`activation_axes` of
  'batch' and 'heads', where they divide), each device on its own samples. `interpret` runs
  the kernel in the Pallas interpreter (tests on CPU)."""
  # Imported on the first TPU trace: the Pallas TPU kernels add ~0.3 s to every import.
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, l, h, d = q_BLHD.shape
  s = k_BSHD.shape[1]
  batch_axes = sharding.activation_axes("batch", b)
  head_axes = sharding.activation_axes("heads", h, exclude=batch_axes)
  mesh = jax.sharding.get_abstract_mesh()
  local_heads = h // math.prod(mesh.shape[a] for a in head_axes)
  bq, bkv = _splash_block(l), _splash_block(s)
  kernel = splash.make_splash_mha(
      masks.MultiHeadMask([masks.FullMask((l, s)) for _ in range(local_heads)]),
      head_shards=1, q_seq_shards=1, interpret=interpret,
      block_sizes=splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                    block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                    block_q_dq=bq, block_kv_dq=bkv))
  scale = jnp.asarray(d ** -0.5, q_BLHD.dtype)

  def local(q, k, v):  # (b', L, h', D) blocks of one device
    q_BHLD, k_BHSD, v_BHSD = (jnp.swapaxes(t, 1, 2) for t in (q * scale, k, v))
    return jnp.swapaxes(jax.vmap(kernel)(q_BHLD, k_BHSD, v_BHSD), 1, 2)

  if not batch_axes and not head_axes:
    return local(q_BLHD, k_BSHD, v_BSHD)
  spec = jax.sharding.PartitionSpec(sharding.spec_entry(batch_axes), None,
                                    sharding.spec_entry(head_axes), None)
  return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BLHD, k_BSHD, v_BSHD)


def _attention_cpu(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array) -> jax.Array:
  """Softmax attention as XLA's CPU backend runs it fastest (benchmarks/networks.py):

  * heads moved ahead of the sequence first, so every product is a plain batched matmul over
    contiguous (L, D) / (S, D) tiles;
  * the softmax normalisation deferred to the (L, D) output, so the (L, S) scores are never
    divided, broadcast or copied into another layout (`jax.nn.dot_product_attention`'s XLA
    path does all of these on the scores);
  * a hand-written backward (`_softmax_attention`) whose products all have forms YNNPACK or
    XLA run fast at small head sizes.

  Same result within float rounding."""
  b, l, h, d = q_BLHD.shape
  s = k_BSHD.shape[1]
  scale = jnp.asarray(d ** -0.5, q_BLHD.dtype)
  q_NLD, k_NSD, v_NSD = (jnp.swapaxes(t, 1, 2).reshape(b * h, t.shape[1], d)
                         for t in (q_BLHD * scale, k_BSHD, v_BSHD))
  block = _query_block(l, s)
  if block:
    out_NLD = _blocked_attention(q_NLD, k_NSD, v_NSD, block)
  else:
    out_NLD = _softmax_attention(q_NLD, k_NSD, v_NSD)
  return jnp.swapaxes(out_NLD.reshape(b, h, l, d), 1, 2).astype(q_BLHD.dtype)


# Above this many scores per head (L x S), the CPU attention runs query block by query block
# (`_blocked_attention`): the whole (N, L, S) score tensor, and in the backward its
# probabilities and gradient, would otherwise be held at once (4096 x 4096 per head at 64x64
# latents), and its passes over memory dominate. Blocks of `_QUERY_BLOCK` rows keep each
# block's scores in cache. One block is faster up to the UNet's 256-token (16x16-latent)
# self-attention, blocks from 512 tokens on (`benchmarks/networks.py --scale cpu32`).
_BLOCKED_MIN_SCORES = 256 * 256
_QUERY_BLOCK = 64


def _query_block(l: int, s: int) -> int:
  """The query block `_attention_cpu` uses for L queries over S keys; 0 for one block."""
  if l * s <= _BLOCKED_MIN_SCORES:
    return 0
  return next((bq for bq in (_QUERY_BLOCK, 32) if l % bq == 0 and bq < l), 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q_NLD: jax.Array, k_NSD: jax.Array, v_NSD: jax.Array,
                       block: int) -> jax.Array:
  """`_softmax_attention` computed over query blocks of `block` rows (L % block == 0): at most
  one block's (N, block, S) scores exist at a time, forward and backward. Each block's
  softmax is exact over all S keys, so no online rescaling is needed; the backward recomputes
  each block's probabilities from the saved log-sum-exp (N, L) instead of storing them, and
  accumulates dk and dv over the blocks."""
  return _blocked_attention_fwd(q_NLD, k_NSD, v_NSD, block)[0]


def _blocks(t_NLX: jax.Array, block: int) -> jax.Array:
  """(N, L, X) -> (L // block, N, block, X), the layout `lax.map`/`scan` iterate over."""
  n, l, x = t_NLX.shape
  return jnp.moveaxis(t_NLX.reshape(n, l // block, block, x), 1, 0)


def _unblocks(t_KNBX: jax.Array) -> jax.Array:
  k, n, b, x = t_KNBX.shape
  return jnp.moveaxis(t_KNBX, 0, 1).reshape(n, k * b, x)


def _blocked_attention_fwd(q_NLD, k_NSD, v_NSD, block):
  def one(q_NBD):
    s_NBS = jnp.einsum("nbd,nsd->nbs", q_NBD, k_NSD, preferred_element_type=jnp.float32)
    max_NB1 = s_NBS.max(-1, keepdims=True)
    p_NBS = jnp.exp(s_NBS - max_NB1)
    sum_NB1 = p_NBS.sum(-1, keepdims=True)
    out_NBD = jnp.einsum("nbs,nsd->nbd", p_NBS.astype(v_NSD.dtype), v_NSD,
                         preferred_element_type=jnp.float32) / sum_NB1
    return out_NBD, max_NB1 + jnp.log(sum_NB1)

  out_KNBD, lse_KNB1 = jax.lax.map(one, _blocks(q_NLD, block))
  out_NLD, lse_NL1 = _unblocks(out_KNBD), _unblocks(lse_KNB1)
  return out_NLD, (q_NLD, k_NSD, v_NSD, out_NLD, lse_NL1)


def _blocked_attention_bwd(block, res, dout_NLD):
  q_NLD, k_NSD, v_NSD, out_NLD, lse_NL1 = res
  n, s, d = k_NSD.shape
  delta_NL1 = jnp.sum(dout_NLD * out_NLD, -1, keepdims=True)

  def one(carry, xs):
    dk_NDS, dv_NDS = carry
    q_NBD, dout_NBD, lse_NB1, delta_NB1 = xs
    s_NBS = jnp.einsum("nbd,nsd->nbs", q_NBD, k_NSD, preferred_element_type=jnp.float32)
    p_NBS = jnp.exp(s_NBS - lse_NB1)  # normalised probabilities
    dp_NBS = jnp.einsum("nbd,nsd->nbs", dout_NBD.astype(v_NSD.dtype), v_NSD,
                        preferred_element_type=jnp.float32)
    ds_NBS = p_NBS * (dp_NBS - delta_NB1)
    dq_NBD = jnp.einsum("nbs,nsd->nbd", ds_NBS.astype(k_NSD.dtype), k_NSD,
                        preferred_element_type=jnp.float32)
    # (N, D, S) products, as in `_softmax_attention_bwd`, transposed once after the loop.
    dk_NDS = dk_NDS + jnp.einsum("nbs,nbd->nds", ds_NBS.astype(q_NBD.dtype), q_NBD,
                                 preferred_element_type=jnp.float32)
    dv_NDS = dv_NDS + jnp.einsum("nbs,nbd->nds", p_NBS.astype(v_NSD.dtype),
                                 dout_NBD.astype(v_NSD.dtype),
                                 preferred_element_type=jnp.float32)
    return (dk_NDS, dv_NDS), dq_NBD

  zeros = jnp.zeros((n, d, s), jnp.float32)
  (dk_NDS, dv_NDS), dq_KNBD = jax.lax.scan(
      one, (zeros, zeros), tuple(_blocks(t, block) for t in
                                 (q_NLD, dout_NLD, lse_NL1, delta_NL1)))
  dk_NSD, dv_NSD = (jnp.swapaxes(jax.lax.optimization_barrier(t), 1, 2)
                    for t in (dk_NDS, dv_NDS))
  return (_unblocks(dq_KNBD).astype(q_NLD.dtype), dk_NSD.astype(k_NSD.dtype),
          dv_NSD.astype(v_NSD.dtype))


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


@jax.custom_vjp
def _softmax_attention(q_NLD: jax.Array, k_NSD: jax.Array, v_NSD: jax.Array) -> jax.Array:
  """softmax(q k^T) v over N heads, q pre-scaled; float32 out.

  The backward is written out because the one autodiff derives computes dv = p^T do (and
  dk = ds^T q) as a (N, S, D) product contracting the scores' major axis, a form YNNPACK does
  not take and XLA's own dot runs an order of magnitude slower when D is a few channels than
  the (N, D, S) product transposed afterwards that this backward computes. An optimisation
  barrier keeps XLA from folding that transpose back into the dot."""
  return _softmax_attention_fwd(q_NLD, k_NSD, v_NSD)[0]


def _softmax_attention_fwd(q_NLD, k_NSD, v_NSD):
  s_NLS = jnp.einsum("nld,nsd->nls", q_NLD, k_NSD, preferred_element_type=jnp.float32)
  p_NLS = jnp.exp(s_NLS - s_NLS.max(-1, keepdims=True))
  sum_NL1 = p_NLS.sum(-1, keepdims=True)
  out_NLD = jnp.einsum("nls,nsd->nld", p_NLS.astype(v_NSD.dtype), v_NSD,
                       preferred_element_type=jnp.float32) / sum_NL1
  return out_NLD, (q_NLD, k_NSD, v_NSD, out_NLD, p_NLS, sum_NL1)


def _softmax_attention_bwd(res, dout_NLD):
  q_NLD, k_NSD, v_NSD, out_NLD, p_NLS, sum_NL1 = res
  # softmax backward with the normalisation folded in: ds = (p / sum) * (dp - <dout, out>)
  dp_NLS = jnp.einsum("nld,nsd->nls", dout_NLD.astype(v_NSD.dtype), v_NSD,
                      preferred_element_type=jnp.float32)
  delta_NL1 = jnp.sum(dout_NLD * out_NLD, -1, keepdims=True)
  ds_NLS = p_NLS * ((dp_NLS - delta_NL1) / sum_NL1)
  dq_NLD = jnp.einsum("nls,nsd->nld", ds_NLS.astype(k_NSD.dtype), k_NSD,
                      preferred_element_type=jnp.float32)
  dk_NDS = jnp.einsum("nls,nld->nds", ds_NLS.astype(q_NLD.dtype), q_NLD,
                      preferred_element_type=jnp.float32)
  dv_NDS = jnp.einsum("nls,nld->nds", p_NLS.astype(v_NSD.dtype),
                      (dout_NLD / sum_NL1).astype(v_NSD.dtype),
                      preferred_element_type=jnp.float32)
  dk_NSD, dv_NSD = (jnp.swapaxes(jax.lax.optimization_barrier(t), 1, 2)
                    for t in (dk_NDS, dv_NDS))
  return (dq_NLD.astype(q_NLD.dtype), dk_NSD.astype(k_NSD.dtype), dv_NSD.astype(v_NSD.dtype))


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
