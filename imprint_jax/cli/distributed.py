"""Several hosts: `jax.distributed` started from the shared flags (train, encode-*, composite,
evaluate; `flags.add_distributed_arguments`), the rule that splits a list of jobs over the
hosts, and sums over the hosts that also act as a barrier."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from imprint_jax.errors import UserError

T = TypeVar("T")


def requested(args: argparse.Namespace) -> bool:
  return bool(args.distributed or args.coordinator)


def initialize(args: argparse.Namespace) -> None:
  """jax.distributed.initialize() for --distributed / --coordinator; nothing without them."""
  if not requested(args):
    if args.num_processes is not None or args.process_id is not None:
      raise UserError("--num-processes/--process-id need --coordinator HOST:PORT")
    return
  kw = {}
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      raise UserError("--coordinator needs --num-processes and --process-id")
    kw = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
              process_id=args.process_id)
    # Only used by the CPU backend (local multi-process runs and tests); harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)


def host_share(jobs: Sequence[T], pid: int, nproc: int) -> list[T]:
  """The jobs of host `pid` of `nproc`: every nproc-th one. Chosen by position in the full
  list, not among the jobs still to do, so every host agrees on the split whatever the other
  hosts have already written (and a resumed run gives each job to the same host)."""
  return list(jobs[pid::nproc])


def gather_sums(counts: list[int]) -> list[int]:
  """Sums of `counts` over all processes; returns once every process has called it."""
  every = multihost_utils.process_allgather(np.asarray(counts, np.int64))
  return [int(v) for v in np.asarray(every).reshape(-1, len(counts)).sum(axis=0)]
