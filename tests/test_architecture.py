"""The dependency rules of `.importlinter` hold, checked over the package as it installs.

`data_prep/` and `configs/` install inside the package (pyproject's `package-dir`), which an
editable install maps with an import hook that import-linter's graph builder does not follow.
So the package is assembled as the wheel lays it out, in a temporary folder, and `lint-imports`
runs there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = REPO / ".importlinter"


def _assemble(dest: Path) -> Path:
  """imprint_jax as installed, under dest; returns dest."""
  setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(REPO / "imprint_jax", dest / "imprint_jax", ignore=ignore)
  for package, folder in setup["package-dir"].items():
    shutil.copytree(REPO / folder, dest.joinpath(*package.split(".")), ignore=ignore)
  return dest


def _lint(root: Path) -> subprocess.CompletedProcess:
  code = ("import sys; from importlinter.cli import lint_imports;"
          f" sys.exit(lint_imports(config_filename={str(CONTRACTS)!r}, no_cache=True))")
  env = {**os.environ, "PYTHONPATH": str(root)}
  return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                        text=True, timeout=120)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
  return _assemble(tmp_path_factory.mktemp("installed"))


def test_contracts_hold(package):
  r = _lint(package)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    # a model reaching into training: below-to-above across the layers
    ("models/unet.py", "from imprint_jax.train import optim", "Parts depend downwards"),
    # the library running data preparation
    ("train/loop.py", "from imprint_jax.data_prep import prepare", "Parts depend downwards"),
    # data preparation pulling in JAX
    ("data_prep/shards.py", "import jax", "Data preparation uses only"),
    # the file shipped to PyTorch users needing the package
    ("convert/pipeline_imprint.py", "from imprint_jax import errors", "The PyTorch-side files"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
  root = _assemble(tmp_path)
  path = root / "imprint_jax" / module
  path.write_text(f"{path.read_text()}\n{line}\n")
  r = _lint(root)
  assert r.returncode != 0, r.stdout
  broken = r.stdout[r.stdout.index("Broken contracts"):]
  assert contract in broken, r.stdout
