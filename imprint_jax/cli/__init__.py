"""`imprint-jax` command line: thin argument parsing over library functions.

Each command or group of commands (`COMMANDS`) has two modules: `cli/flags/NAME.py` declares
its flags (`add_parser(subparsers)`; argparse and constants only) and `cli/NAME.py` runs it
(JAX, orbax and the library imported at its head). The top parser is built from the table,
only the chosen command's flags module is imported, and its runner module only once the flags
parsed: `imprint-jax --help` and `imprint-jax COMMAND --help` load no JAX, orbax or torch.
Every command turns a `UserError` (bad input) into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from imprint_jax.errors import UserError
from imprint_jax.parallel import cpu_runtime

# command -> (its modules' name under imprint_jax.cli.flags and imprint_jax.cli, its line in
# `imprint-jax --help`). A module serving several commands adds them all; they stay adjacent.
COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("convert", "import PyTorch weights (SD + DINOv2, or an export) into one"
               " checkpoint"),
    "export": ("convert", "export a checkpoint as a diffusers pipeline folder"),
    "prepare": ("prepare", "prepare training pairs into ArrayRecord shards"),
    "train": ("train", "train stage 1 or stage 2"),
    "encode-objects": ("train", "stage 2: precompute the frozen DINOv2's object tokens of"
                       " every pair (train with --set data.object_tokens=OUT)"),
    "encode-latents": ("train", "stage 2: precompute the frozen VAE's latents of every pair's"
                       " target and masked backgrounds (train with --set data.latents=OUT)"),
    "plan": ("plan", "compile the full-size step for a mesh (virtual CPU devices or a TPU"
             " topology) and print per-device memory"),
    "composite": ("composite", "composite objects into backgrounds (one image, or a JSONL"
                  " manifest in device batches)"),
    "evaluate": ("evaluate", "score a checkpoint (or another method's composites) with the"
                 " paper's metrics: CLIP, DINO, DreamSim, FID"),
}

WHICH_HELP = ("for a training workdir: latest (default), best (lowest validation loss) or a"
              " step number")
DESCRIPTION = ("IMPRINT generative object compositing in JAX: import weights, prepare data,"
               " train, composite, export.")
EPILOG = ("On the CPU every command but plan runs JAX's computations on the calling thread and"
          " keeps freed memory for reuse (imprint_jax/parallel/cpu_runtime.py);"
          " IMPRINT_JAX_CPU_RUNTIME=default keeps JAX's and glibc's defaults.")


def help_line(command: str) -> str:
  """The command's one-line help (for its module's `add_parser`)."""
  return COMMANDS[command][1]


def runner(module: str, name: str) -> Callable[[argparse.Namespace], int]:
  """`imprint_jax.cli.<module>.<name>`, imported when called (for `set_defaults(func=...)`)."""

  def run(args: argparse.Namespace) -> int:
    # The lazy dispatch: the runner's module (and JAX with it) loads once the flags parsed.
    return getattr(importlib.import_module(f"imprint_jax.cli.{module}"), name)(args)

  return run


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
  """The `imprint-jax` parser with the full parsers of `commands` (default: all of them); the
  other commands get a placeholder with their help line."""
  wanted = {COMMANDS[c][0] for c in (COMMANDS if commands is None else commands)}
  parser = argparse.ArgumentParser(prog="imprint-jax", description=DESCRIPTION, epilog=EPILOG)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (module, text) in COMMANDS.items():
    if module not in wanted:
      sub.add_parser(name, help=text, add_help=False)
    elif name == next(c for c, (m, _) in COMMANDS.items() if m == module):
      importlib.import_module(f"imprint_jax.cli.flags.{module}").add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  chosen = [argv[0]] if argv and argv[0] in COMMANDS else []
  args = build_parser(chosen).parse_args(argv)
  try:
    if args.command != "plan":  # plan sets JAX's environment itself and runs no steps
      logging.getLogger(__name__).info("%s", cpu_runtime.configure())  # before JAX starts
    return int(args.func(args) or 0)
  except UserError as e:
    print(f"imprint-jax {args.command}: error: {e}", file=sys.stderr)
    return UserError.exit_code
  except KeyboardInterrupt:
    print(f"imprint-jax {args.command}: interrupted", file=sys.stderr)
    return 130
