"""Flags of `imprint-jax plan` (runner: `cli/plan.py`)."""

from __future__ import annotations

from imprint_jax import cli


def add_parser(sub) -> None:
  p = sub.add_parser("plan", help=cli.help_line("plan"),
                     description="Compiles the training step of CONFIG for the given mesh with"
                     " abstract inputs (nothing is allocated) and prints per-device memory:"
                     " parameters, optimizer state, activations (XLA's temporary buffers for"
                     " the step), and whether it fits. Without --topology the step is compiled"
                     " for virtual CPU devices (an upper estimate: the CPU compiler schedules"
                     " for speed, not memory); with --topology it is compiled by the TPU"
                     " compiler for that slice, from this host, with no TPU attached (needs"
                     " libtpu: pip install 'imprint-jax[tpu]'). Exit status 1 when it does not"
                     " fit in --hbm-gib.")
  p.add_argument("--config", required=True)
  p.add_argument("--mesh", required=True, help="data=D,fsdp=F,tensor=T")
  p.add_argument("--topology", default=None, help="TPU slice to compile for, as"
                 " VERSION:SHAPE, e.g. v5e:4x4 (16 chips), v5p:4x4x4 (64 chips), v6e:8x8;"
                 " the mesh must use every device of the slice")
  p.add_argument("--hbm-gib", type=float, default=None, help="memory per chip, e.g. 95 (v5p)"
                 " or 16 (v5e); default with --topology: the HBM of a v5e/v5p/v6e chip")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.set_defaults(func=cli.runner("plan", "run"))
