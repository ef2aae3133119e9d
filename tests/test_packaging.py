"""The built wheel as a user installs it: its metadata, its package list, the packaged configs.

`pip install imprint-jax` on a TPU VM must bring no torch, accept Python 3.11 and 3.12, offer
`tpu`/`cuda12` extras, and put nothing under the generic top-level names `data_prep` or
`configs` in site-packages (the repository's `data_prep/` and `configs/` install as
`imprint_jax.data_prep` / `imprint_jax.configs`).
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from imprint_jax.errors import UserError, import_extra
from imprint_jax.train import run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
  src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  for name in ("imprint_jax", "data_prep", "configs"):
    shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", str(src), "-w", str(out)], check=True,
                 capture_output=True, cwd=out)
  (whl,) = out.glob("imprint_jax-*.whl")
  return zipfile.ZipFile(whl)


def _metadata(wheel: zipfile.ZipFile):
  (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
  return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_wheel_metadata_keeps_torch_in_extras_and_allows_python_3_12(wheel):
  meta = _metadata(wheel)
  requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
  base = {r.name.lower() for r in requires if r.marker is None}
  assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= base
  assert not base & {"torch", "diffusers", "transformers", "dreamsim"}, base
  python = SpecifierSet(meta["Requires-Python"])
  assert "3.11.7" in python and "3.12.3" in python and "3.10.12" not in python
  extras = set(meta.get_all("Provides-Extra"))
  assert {"tpu", "cuda12", "torch", "eval", "test"} <= extras

  def extra_reqs(extra):
    return [r for r in requires if r.marker is not None and r.marker.evaluate({"extra": extra})]

  jax_pin = next(r for r in requires if r.name == "jax" and r.marker is None).specifier
  (tpu,) = extra_reqs("tpu")
  (cuda,) = extra_reqs("cuda12")
  assert (tpu.name, tpu.extras, tpu.specifier) == ("jax", {"tpu"}, jax_pin)
  assert (cuda.name, cuda.extras, cuda.specifier) == ("jax", {"cuda12"}, jax_pin)
  assert {r.name for r in extra_reqs("torch")} == {"torch", "diffusers", "transformers"}


def test_wheel_holds_every_package_folder_and_no_generic_top_level_names(wheel):
  names = wheel.namelist()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"imprint_jax", "imprint_jax-0.1.0.dist-info"}, tops
  in_wheel = {str(Path(n).parent) for n in names if n.endswith(".py")}
  # Every folder of Python files in the repository's package trees is in the wheel (the
  # package list in pyproject.toml is explicit because of the folder mapping).
  for tree, prefix in (("imprint_jax", "imprint_jax"), ("data_prep", "imprint_jax/data_prep"),
                       ("configs", "imprint_jax/configs")):
    for folder in {p.parent for p in (REPO / tree).rglob("*.py")} - {None}:
      if "__pycache__" in folder.parts:
        continue
      rel = folder.relative_to(REPO / tree)
      want = prefix if str(rel) == "." else f"{prefix}/{rel}"
      assert want in in_wheel, f"{folder} is not packaged (add it to pyproject's packages)"
  assert "imprint_jax/configs/stage1.py" in names
  assert "imprint_jax/data_prep/readers/mvimgnet.py" in names


def test_config_by_name_from_another_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run_config.packaged_configs() == ["stage1", "stage2"]
  c = run_config.load("stage2:tiny", ["train.num_steps=3"])
  assert (c.stage, c.train.num_steps) == (2, 3)
  with pytest.raises(UserError, match=r"--config configs/stage1.py: no such config file, nor a"
                     r" packaged config \(stage1, stage2\)"):
    run_config.load("configs/stage1.py")
  # A file path still works, relative to the working directory.
  (tmp_path / "mine.py").write_text((REPO / "configs" / "stage1.py").read_text())
  assert run_config.load("mine.py:tiny").stage == 1


def test_a_missing_extra_is_one_line_naming_it():
  with pytest.raises(UserError) as e:
    import_extra("imprint_jax_no_such_module", "torch")
  assert str(e.value) == ("this needs the 'torch' extra (imprint_jax_no_such_module is not"
                          " installed): pip install 'imprint-jax[torch]'")


def test_library_imports_no_torch():
  """The training and compositing paths run without the `torch` extra."""
  code = ("import sys; import imprint_jax.cli, imprint_jax.train.loop, imprint_jax.compositing,"
          " imprint_jax.convert.interop, imprint_jax.evaluation.runner, imprint_jax.data_prep.prepare;"
          " bad = sorted(m for m in sys.modules if m.split('.')[0] in"
          " ('torch', 'diffusers', 'transformers')); print(bad); sys.exit(bool(bad))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=REPO)
  assert res.returncode == 0, res.stdout + res.stderr


def test_the_paint_by_example_baseline_names_the_torch_extra(monkeypatch):
  from imprint_jax.evaluation import baselines
  monkeypatch.setitem(sys.modules, "diffusers", None)  # imports fail as if not installed
  with pytest.raises(UserError, match=r"^this needs the 'torch' extra \(diffusers is not"
                     r" installed\): pip install 'imprint-jax\[torch\]'$"):
    baselines.paint_by_example_generator("weights/paint-by-example")
