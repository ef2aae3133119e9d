"""Run paths on Cloud Storage (against fake-gcs-server on 127.0.0.1), relative paths, gcsfuse
atomicity and checkpoint choice (--which).

The emulator is the session's `gcs` fixture (conftest.py). A tiny training run on gs://, killed
and resumed, is tests/test_train.py's SIGTERM test.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from PIL import Image

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax import storage
from imprint_jax import cli
from imprint_jax.errors import UserError
from imprint_jax.train import loop, run_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
BUCKET = "imprint-test"


def _no_gs_folder(*roots) -> None:
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      assert not any(n.lower().startswith(("gs:", "gcs:")) for n in dirnames + filenames), (
          f"a local '{dirpath}/gs:' entry: a gs:// path was written as a local folder")


def test_run_paths_keep_gs_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  p = storage.path("gs://bucket/run")
  assert storage.is_remote(p) and os.fspath(p / "checkpoints") == "gs://bucket/run/checkpoints"
  assert storage.path("runs/x") == epath.Path(tmp_path / "runs" / "x")
  for collapsed in (str(Path("gs://bucket/run")), "gs:/bucket/run", "gs:bucket"):
    with pytest.raises(UserError, match="lost its '//'"):
      storage.path(collapsed)
  with pytest.raises(UserError, match="only local paths and gs://"):
    storage.path("s3://bucket/run")
  with pytest.raises(UserError, match="gcsfuse"):
    storage.local_path("gs://bucket/pairs", "data source")
  assert storage.atomicity_options(epath.Path(tmp_path)) is None
  assert storage.atomicity_options(epath.Path("/gcs/bucket/run")).mode.value == "commit_file"
  with pytest.raises(UserError, match="expected latest, best or a step"):
    ckpt_lib.parse_which("last")
  _no_gs_folder(tmp_path)


@pytest.fixture(scope="module")
def stage2_model():
  from test_composite import _random_model, _tiny_config  # the composite tests' tiny model
  return _random_model(_tiny_config(9), seed=0)


def test_checkpoint_on_a_gcsfuse_mount_uses_a_commit_file(stage2_model, tmp_path, monkeypatch):
  """Under a gcsfuse mount (here a local folder standing in for /gcs/) orbax writes in place
  and marks completion with a commit file instead of renaming a temporary folder."""
  monkeypatch.setattr(storage, "GCSFUSE_PREFIX", str(tmp_path) + "/")
  monkeypatch.chdir(tmp_path)
  model = stage2_model
  saved = ckpt_lib.save_model("ckpt", model, {"stage": 2, "step": 0})  # relative path
  assert saved == epath.Path(tmp_path / "ckpt")
  assert (tmp_path / "ckpt" / "commit_success.txt").is_file()
  loaded, meta = ckpt_lib.load_model("ckpt")
  assert meta["step"] == 0 and loaded.cfg == model.cfg


def test_composite_from_gcs_checkpoint(gcs, stage2_model, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  ckpt = f"{gcs}/imported"
  ckpt_lib.save_model(ckpt, stage2_model, {
      "stage": 2, "step": 0, "config": {"data": {"encoder_size": 56, "generator_size": 32}}})
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 40, 4), np.uint8)).save("obj.png")
  Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save("bg.png")
  code = cli.main(["composite", "--ckpt", ckpt, "--object", "obj.png", "--background",
                   "bg.png", "--box", "10,8,40,36", "--out", "out.png", "--steps", "2"])
  assert code == 0
  assert Image.open("out.png").size == (64, 48)
  err = capsys.readouterr().err
  assert f"using checkpoint {ckpt} (step 0)" in err
  code = cli.main(["composite", "--ckpt", ckpt, "--which", "5", "--object", "obj.png",
                   "--background", "bg.png", "--box", "10,8,40,36", "--out", "o2.png"])
  assert code == 2 and "not a training workdir" in capsys.readouterr().err
  _no_gs_folder(tmp_path)


def test_progress_is_plain_lines_off_a_terminal():
  import io
  from imprint_jax import progress
  out = io.StringIO()  # not a terminal
  bar = progress.bar(total=3, desc="composite", file=out, mininterval=0)
  for _ in range(3):
    bar.update()
  bar.close()
  text = out.getvalue()
  assert "\r" not in text and "3/3" in text.splitlines()[-1], text


def test_jax_cache_dir_makes_a_restart_load_compiled_code(tmp_path):
  """`--set jax_cache_dir=DIR`: compiled programs land in DIR, and a process that starts over
  (in-memory caches cleared) loads them from there instead of compiling again."""
  import jax
  import jax.numpy as jnp
  from jax._src import monitoring
  from jax.experimental.compilation_cache import compilation_cache
  cache = tmp_path / "jax-cache"
  c = run_config.load("stage1:tiny", [f"jax_cache_dir={cache}"])
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  hits = []
  listener = lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
  monitoring.register_event_listener(listener)
  try:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    loop._use_compilation_cache(c)
    assert jax.config.jax_compilation_cache_dir == str(cache)
    step = lambda x: jnp.tanh(x @ x.T).sum()
    x = jnp.ones((16, 16))
    jax.jit(step)(x).block_until_ready()
    assert any(cache.iterdir()) and not hits
    jax.clear_caches()  # what a restarted process starts with
    jax.jit(step)(x).block_until_ready()
    assert hits, "the second compile did not come from the cache"
  finally:
    monitoring.unregister_event_listener(listener)
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()
