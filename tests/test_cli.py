"""The command line's lazy dispatch: building the parser of any command (what `imprint-jax
COMMAND --help` does) loads no JAX, orbax or torch, and the one table drives every command."""

import json
import subprocess
import sys

from imprint_jax import cli, compositing
from imprint_jax.cli.flags import composite as composite_flags

HEAVY = ("jax", "jaxlib", "flax", "orbax", "torch", "diffusers", "transformers", "grain")


def test_every_command_parser_loads_no_jax_or_torch():
  code = ("import json, sys; from imprint_jax import cli; out = {}\n"
          "for name in [None, *cli.COMMANDS]:\n"
          "  cli.build_parser([] if name is None else [name])\n"
          f"  out[str(name)] = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
          "print(json.dumps(out))")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  loaded = json.loads(res.stdout)
  assert set(loaded) == {"None", *cli.COMMANDS}
  assert all(not modules for modules in loaded.values()), loaded


def test_the_table_and_the_full_parser_agree(capsys):
  parser = cli.build_parser()
  names = parser._subparsers._group_actions[0].choices  # pylint: disable=protected-access
  assert list(names) == list(cli.COMMANDS)
  for name, sub in names.items():
    assert sub.format_usage().startswith(f"usage: imprint-jax {name} [-h]"), name
  # A command of a group chosen alone still gets its full parser (its module adds them all).
  for name in ("export", "encode-latents"):
    args = cli.build_parser([name]).parse_args([name, "x", "--out", "y"] if name == "export"
                                               else [name, "--config", "c", "--out", "o"])
    assert callable(args.func)
  assert composite_flags.DEFAULT_BATCH_SIZE == compositing.DEFAULT_BATCH_SIZE
  assert cli.main(["plan", "--config", "stage1:tiny", "--mesh", "data=x"]) == 2
  assert "imprint-jax plan: error: --mesh 'data=x': 'x' is not an integer" in (
      capsys.readouterr().err)
