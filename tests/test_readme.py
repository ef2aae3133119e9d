"""The README's command lines, as written (read from README.md, never retyped here).

The "Try it on CPU" block runs line by line through the CLI's entry point, in a temporary
folder that is not the repo, with the relative paths it shows. Every other `imprint-jax`
command line of the README (they need real weights, datasets or a TPU) must parse with the
CLI's own parser, so a renamed or removed flag cannot stay in the README.
"""

import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imprint_jax import cli

README = Path(__file__).resolve().parents[1] / "README.md"
TRY_IT = "Try it on CPU"


def readme_commands() -> list[tuple[str, list[str]]]:
  """(section heading, argv) of every `imprint-jax ...` line in README.md's code blocks
  (```bash fences and indented blocks), backslash continuations joined, comments dropped."""
  out, section, fence, pending = [], "", False, ""
  for raw in README.read_text().splitlines():
    line = raw.rstrip()
    if line.startswith("```"):
      fence = not fence
      continue
    if not fence and line.startswith("#"):
      section = line.lstrip("#").strip()
      continue
    code = fence or raw.startswith("    ")
    if not code and not pending:
      continue
    text = pending + " " + line.strip() if pending else line.strip()
    if text.endswith("\\"):
      pending = text[:-1].strip()
      continue
    pending = ""
    if text.startswith("imprint-jax "):
      out.append((section, shlex.split(text, comments=True)))
  return out


def test_readme_has_a_cpu_block_and_every_other_command_parses():
  commands = readme_commands()
  assert sum(s == TRY_IT for s, _ in commands) >= 4, "no 'Try it on CPU' commands found"
  parser = cli.build_parser()
  checked = 0
  for section, argv in commands:
    if any("|" in a or a.startswith("[") for a in argv):
      continue  # a synopsis (alternatives, optional parts), not a command line
    try:
      parser.parse_args(argv[1:])
    except SystemExit:
      pytest.fail(f"README ({section}): `{shlex.join(argv)}` does not parse")
    checked += 1
  assert checked >= 15, checked


def test_readme_cpu_block_runs_as_written(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # not the repo: configs by name, relative workdirs
  rng = np.random.default_rng(0)
  obj = rng.integers(0, 255, (48, 40, 4), np.uint8)
  obj[..., 3] = 0
  obj[8:40, 8:32, 3] = 255
  Image.fromarray(obj).save("dog.png")
  Image.fromarray(rng.integers(0, 255, (72, 96, 3), np.uint8)).save("park.jpg")
  for section, argv in readme_commands():
    if section != TRY_IT:
      continue
    code = cli.main(argv[1:])
    err = capsys.readouterr().err
    assert code == 0, f"`{shlex.join(argv)}` exited {code}: {err[-2000:]}"
    if argv[1] in ("composite", "export"):
      assert "using checkpoint " in err and "runs/tiny2/checkpoints/8 (step 8)" in err, err
  assert Image.open("dog_in_park.png").size == (96, 72)
  assert (tmp_path / "export" / "model_index.json").is_file()
  assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))
