"""Building blocks shared by the models: layers with logical axis names, attention, remat.

Every parameter carries logical axis names (its `out_sharding` metadata). The training config
maps them to mesh axes (`configs/*.py: logical_axis_rules`), so the models never name a mesh.
The logical axes used across the project:

  embed      residual-stream features of a linear layer's input (ViT width, UNet channels)
  heads      attention projection features (q/k/v outputs, the output projection's input)
  mlp        feed-forward hidden features
  cross      cross-attention context features (the adapter's output width)
  conv_in    input channels of a conv kernel (kernels are HWIO)
  conv_out   output channels of a conv kernel
  norm       scales and biases of normalisation layers
  time       timestep-embedding features

Parameters are always float32 (the master copy); `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str) -> Any:
  """Maps a config string ('float32' | 'bfloat16' | 'float16') to a jnp dtype."""
  if name not in DTYPES:
    raise UserError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


# Initialisers that draw a flat vector and reshape it: identical in distribution to flax's, but
# XLA compiles a rank-1 threefry draw several times faster than a rank-4 one on CPU, which
# dominates the start-up of small models (tests, the quickstart).
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def truncated_normal(stddev: float) -> Callable:
  """N(0, stddev^2) truncated to +-2 stddev (like nnx.initializers.truncated_normal)."""

  def init(key, shape, dtype=jnp.float32):
    n = math.prod(shape)
    return (jax.random.truncated_normal(key, -2.0, 2.0, (n,), jnp.float32) * stddev
            ).reshape(shape).astype(dtype)

  return init


def lecun_normal() -> Callable:
  """flax's default kernel init (variance scaling 1/fan_in, truncated normal), flat draw.
  fan_in is every kernel dimension but the last (HWI of an HWIO conv kernel)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1])
    return truncated_normal(math.sqrt(1.0 / fan_in) / _TRUNC_STD)(key, shape, dtype)

  return init


class InitRngs:
  """Parameter-initialisation keys: `params()` returns fold_in(key, 0), fold_in(key, 1), ...

  The same keys, in the same order, as `nnx.Rngs(seed).params()`, so models initialise to
  the same values; but the counter is a Python int. nnx.Rngs keeps it in a Variable, and
  under tracing (jit, eval_shape) every increment makes flax probe `tracer.sharding`, whose
  error message JAX builds by walking the whole trace: model construction became quadratic
  in the number of parameters (6 s for the tiny test model, minutes at full size; 1 s now).
  Duck-types what flax's layers use of nnx.Rngs (`params()`, `default()`, calling it).
  """

  def __init__(self, seed: int | jax.Array = 0):
    self.key = jax.random.key(seed) if isinstance(seed, int) else seed
    self._count = 0

  def __call__(self) -> jax.Array:
    key = jax.random.fold_in(self.key, self._count)
    self._count += 1
    return key

  params = default = __call__


def init_rngs(seed: int = 0) -> "nnx.Rngs":
  """Keys for building a model (see InitRngs); pass as `rngs=` to any model constructor."""
  return InitRngs(seed)  # type: ignore[return-value]


def abstract(build: Callable[[Any], Any]) -> Any:
  """`build(rngs)` as a shape-only module (parameters are ShapeDtypeStructs), fast."""
  return nnx.eval_shape(lambda: build(init_rngs(0)))


def axes(*names: str | None) -> dict[str, Any]:
  """Variable metadata carrying logical axis names; sharding is applied later, not eagerly."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
          dtype: Any, rngs: nnx.Rngs, use_bias: bool = True,
          kernel_init: Callable | None = None) -> nnx.Linear:
  """A Linear layer; `names` are the logical axes of its (in, out) kernel."""
  kw = {"kernel_init": kernel_init or lecun_normal()}
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs, kernel_metadata=axes(*names),
                    bias_metadata=axes(names[1]), **kw)


def conv(in_features: int, out_features: int, kernel_size: int, *, dtype: Any,
         rngs: nnx.Rngs, stride: int = 1, padding: Any = None, use_bias: bool = True,
         kernel_init: Callable | None = None) -> nnx.Conv:
  """A 2-D NHWC convolution with an HWIO kernel; 'SAME'-style symmetric padding by default."""
  if padding is None:
    padding = ((kernel_size // 2, kernel_size // 2),) * 2
  kw = {"kernel_init": kernel_init or lecun_normal()}
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                  padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  rngs=rngs, kernel_metadata=axes(None, None, "conv_in", "conv_out"),
                  bias_metadata=axes("conv_out"), **kw)


def layer_norm(num_features: int, *, eps: float, dtype: Any, rngs: nnx.Rngs,
               use_affine: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(num_features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                       use_bias=use_affine, use_scale=use_affine, rngs=rngs,
                       scale_metadata=axes("norm"), bias_metadata=axes("norm"))


def group_norm(num_features: int, num_groups: int, *, eps: float, dtype: Any,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-E[x]^2, which loses
  # precision on the large activations of pretrained UNets/VAEs.
  return nnx.GroupNorm(num_features, num_groups=num_groups, epsilon=eps, dtype=dtype,
                       param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs,
                       scale_metadata=axes("norm"), bias_metadata=axes("norm"))


def attention(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *,
              upcast: bool = False) -> jax.Array:
  """Softmax attention, (B, L, H, D) layout.

  On GPU/TPU through `jax.nn.dot_product_attention`: XLA picks the implementation (cuDNN flash
  attention on GPUs when the dtype is bf16/fp16 and the head dim allows it, otherwise its fused
  path). On CPU through `_attention_cpu`, 1.4x faster there (forward + backward). `upcast`
  computes in float32 (SD 2.x's `upcast_attention`), returning the input dtype.
  """
  dtype = q_BLHD.dtype
  if upcast:
    q_BLHD, k_BSHD, v_BSHD = (t.astype(jnp.float32) for t in (q_BLHD, k_BSHD, v_BSHD))
  if jax.default_backend() == "cpu":
    out = _attention_cpu(q_BLHD, k_BSHD, v_BSHD)
  else:
    out = jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD)
  return out.astype(dtype)


def _attention_cpu(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array) -> jax.Array:
  """Attention with the softmax normalisation deferred to the output: exp(s - max) @ v, then
  divided by the row sums, so the (B, H, L, S) scores are never divided, broadcast or copied
  into another layout (the XLA path of `jax.nn.dot_product_attention` does all three, and on
  CPU those passes over the scores cost more than the two matrix products). Measured by
  benchmarks/train_step.py --profile; same result within float rounding."""
  scale = q_BLHD.shape[-1] ** -0.5
  s_BHLS = jnp.einsum("blhd,bshd->bhls", q_BLHD * jnp.asarray(scale, q_BLHD.dtype), k_BSHD,
                      preferred_element_type=jnp.float32)
  p_BHLS = jnp.exp(s_BHLS - jax.lax.stop_gradient(s_BHLS.max(-1, keepdims=True)))
  out_BLHD = jnp.einsum("bhls,bshd->blhd", p_BHLS.astype(v_BSHD.dtype), v_BSHD,
                        preferred_element_type=jnp.float32)
  denom_BLH = jnp.swapaxes(p_BHLS.sum(-1), 1, 2)
  return (out_BLHD / denom_BLH[..., None]).astype(q_BLHD.dtype)


BATCH_AXES = ("data", "fsdp")


def shard_batch(x: jax.Array) -> jax.Array:
  """Constrains an activation to be split over the batch axes of the ambient mesh and
  replicated along its other dimensions; a no-op outside `jax.set_mesh` or when the batch
  does not divide.

  Used at block boundaries. Besides documenting the intended layout, it stops the SPMD
  partitioner from choosing layouts that mix batch, fsdp and tensor sharding inside the
  backward pass: without it, XLA (0.10.2, CPU) computed wrong UNet gradients on a
  data=2 x fsdp=2 x tensor=2 mesh (tests/test_train.py checks the sharded step).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not hasattr(x, "shape") or x.ndim == 0:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
  return jax.lax.with_sharding_constraint(x, spec)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat_policy_check(name: str) -> str:
  if name not in REMAT_POLICIES:
    raise UserError(f"unknown remat policy {name!r}: expected one of {sorted(REMAT_POLICIES)}")
  return name


def call_block(block: nnx.Module, *args: Any, remat: str = "none") -> Any:
  """Calls `block(*args)`, under gradient checkpointing with the named policy unless 'none';
  the outputs are constrained to the batch sharding (`shard_batch`)."""
  if remat == "none":
    out = block(*args)
  else:
    policy = REMAT_POLICIES[remat_policy_check(remat)]
    # Functional checkpoint over the block's state: `nnx.remat` writes the state back into the
    # module's variables, which fails when the module was merged inside the step's grad trace
    # ("Cannot mutate Param from a different trace level"). Blocks hold no mutable state.
    graphdef, state = nnx.split(block)
    out = jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a), policy=policy)(state, *args)
  return jax.tree.map(shard_batch, out)
