"""The flags of every `imprint-jax` command, one module per command or group (argparse and
constants only: building a parser imports no JAX), and the flags several commands share."""

from __future__ import annotations


def add_distributed_arguments(parser) -> None:
  """--distributed, --coordinator, --num-processes, --process-id (train, encode-*, composite,
  evaluate; `imprint_jax.cli.distributed.initialize` acts on them)."""
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (automatic on TPU VMs; elsewhere"
                      " give --coordinator, --num-processes, --process-id)")
  parser.add_argument("--coordinator", help="host:port of process 0")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)


def add_memory_arguments(parser) -> None:
  """--param-dtype and --shard-params (composite and evaluate)."""
  parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                      help="cast the parameters to this dtype once at load (default: as"
                      " stored, float32); bfloat16 halves their memory")
  parser.add_argument("--shard-params", choices=("auto", "always", "never"), default="auto",
                      help="split the parameters over the local devices (fsdp-style) instead"
                      " of a full copy on each: auto = when they take more than half of one"
                      " device's memory (never on CPU); default %(default)s")
