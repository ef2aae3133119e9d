"""Any model of `imprint_jax.models` as a pure function of plain parameter dicts.

    apply, params = pure(unet)                  # params: nested dicts of jax.Arrays
    eps = jax.jit(apply)(params, x_BHWC, t_B, ctx_BLD)

Calling an NNX module under `nnx.jit` (or jitting a function that closes over it) flattens
and rebuilds every `nnx.Variable` in Python on each call; a jitted function of plain dicts
does that in C++, which is what the training steps and the compositor do. `params` is the
module's parameters as `nnx.to_pure_dict` gives them; other state (none in our models) is
carried along unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def pure(module: nnx.Module, method: str | None = None) -> tuple[Callable[..., Any], dict]:
  """`(apply, params)`: `apply(params, *args, **kw)` equals `module(*args, **kw)`, or
  `module.<method>(*args, **kw)` (e.g. `pure(vae, "encode")`).

  `apply` is pure (jit it, vmap it, differentiate it with respect to `params`); the module is
  not changed by calling it."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(params)

  def apply(params: dict, *args: Any, **kw: Any) -> Any:
    merged = nnx.merge(graphdef, params, rest, copy=True)
    return (merged if method is None else getattr(merged, method))(*args, **kw)

  return apply, params
