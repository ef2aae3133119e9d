"""`imprint-jax plan`: compile a training step for a mesh and print its per-device memory.

This module imports no JAX at its head: `run` first points JAX at virtual CPU devices (or the
TPU compiler) through its environment, which only applies before JAX starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os

from imprint_jax.errors import UserError


def parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in text.split(","):
    k, sep, v = part.partition("=")
    if not sep:
      raise UserError(f"--mesh {text!r}: expected data=D,fsdp=F,tensor=T")
    try:
      out[k.strip()] = int(v)
    except ValueError:
      raise UserError(f"--mesh {text!r}: {v!r} is not an integer") from None
  return out


def run(args: argparse.Namespace) -> int:
  mesh = parse_mesh(args.mesh)
  if any(v < 1 for v in mesh.values()):
    raise UserError("--mesh sizes must be positive for plan")
  n = math.prod(mesh.values())
  if args.topology:
    if importlib.util.find_spec("libtpu") is None:
      raise UserError("--topology needs the TPU compiler (libtpu): pip install 'imprint-jax[tpu]'")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server to ask
  else:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  # Imported only now: JAX reads the environment set above when it starts.
  from imprint_jax.train import plan
  from imprint_jax.train import run_config
  config = run_config.load(args.config, args.set)
  devices, hbm_gib = None, args.hbm_gib
  if args.topology:
    devices = plan.topology_devices(args.topology)
    if len(devices) != n:
      raise UserError(f"--mesh {args.mesh} has {n} devices but topology {args.topology} has"
                      f" {len(devices)} ({devices[0].device_kind})")
    if hbm_gib is None:
      hbm_gib = plan.hbm_gib(devices[0].device_kind)
  fits = plan.print_plan(plan.plan(config, mesh, devices=devices), hbm_gib=hbm_gib)
  return 0 if fits else 1
