"""Fault injection on real `imprint-jax train` processes: SIGKILL at chosen points, then
`--resume` must reproduce the uninterrupted run's losses step for step.

Slow (each case is two or three CLI training runs): `pytest -m slow tests/test_faults.py`.
The default run covers the same code more cheaply: test_train.py (SIGTERM then resume, a
corrupt newest step then resume) and test_reliability.py (checksums inside orbax's commit,
resume fallback, the lease taken over from a dead process, failed saves).

The child process installs its fault by patching imprint-jax functions before running the
CLI (see CHILD): nothing in the library knows about these tests.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imprint_jax.convert import integrity
from imprint_jax.data_prep import sources
from imprint_jax.train import run_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4

CHILD = r"""
import os, signal, sys
point, at, only_process = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv = sys.argv[4:]
from imprint_jax import cli
from imprint_jax.convert import integrity
from imprint_jax.train import checkpoints, loop

def die():
  import jax
  if only_process < 0 or jax.process_index() == only_process:
    print(f"FAULT: SIGKILL at {point} {at}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

if point == "step":  # while step `at` runs: its update dispatched, not finished
  real_compile = loop.compile_steps
  def compile_steps(setup):
    compiled, eval_fn = real_compile(setup)
    count = [0]
    def step(state, batch, rng):
      count[0] += 1
      out = compiled(state, batch, rng)
      if count[0] == at:
        die()
      return out
    return step, eval_fn
  loop.compile_steps = compile_steps
elif point == "save":  # orbax writing step `at` in the background (asynchronous save)
  real_save = checkpoints.RunCheckpoints.save
  def save(self, state, meta, **kw):
    real_save(self, state, meta, **kw)
    if int(meta["step"]) == at:
      die()
  checkpoints.RunCheckpoints.save = save
elif point == "commit":  # every file of step `at` written, orbax's rename not yet done
  real_write = integrity.write
  def write(folder):
    if os.path.basename(os.fspath(folder)).startswith(f"{at}."):
      die()
    return real_write(folder)
  integrity.write = write
sys.exit(cli.main(argv))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data") / "mvimgnet"
  sources.prepare_synthetic("mvimgnet", folder, run_config.load("configs/stage1.py:tiny"))
  return str(folder)


def _env(devices: int = 8) -> dict:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
  if "IMPRINT_JAX_TEST_CACHE" in os.environ:  # share compiled steps between the runs
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["IMPRINT_JAX_TEST_CACHE"]
  return env


def _train_cmd(source: str, workdir: Path, *extra: str) -> list[str]:
  cmd = ["train", "--config", "configs/stage1.py:tiny", "--workdir", str(workdir)]
  for s in (f"data.sources=(({source!r}, 1.0),)", f"train.num_steps={STEPS}", "log_every=1",
            "eval_every=0", "sample_every=0", f"checkpoint_every={EVERY}"):
    cmd += ["--set", s]
  return cmd + list(extra)


def _run(args: list[str], fault: tuple[str, int, int] | None = None, env=None,
         **popen) -> subprocess.Popen:
  if fault is None:
    cmd = [sys.executable, "-m", "imprint_jax.cli", *args]
  else:
    cmd = [sys.executable, "-c", CHILD, *map(str, fault), *args]
  return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _losses(workdir: Path) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  p = _run(_train_cmd(source, workdir))
  out = p.communicate(timeout=900)[0]
  assert p.returncode == 0, out[-3000:]
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  return got


@pytest.mark.parametrize("point,at", [
    ("step", 10),       # during a step (step 8's asynchronous save may still be running)
    ("save", 8),        # during an asynchronous save
    ("commit", 8),      # inside orbax's commit: files and checksums written, not renamed
    ("save", STEPS),    # during the last save
])
def test_sigkill_then_resume_reproduces_the_run(source, reference, tmp_path, point, at):
  workdir = tmp_path / "run"
  p = _run(_train_cmd(source, workdir), fault=(point, at, -1))
  out = p.communicate(timeout=900)[0]
  assert p.returncode == -signal.SIGKILL and f"FAULT: SIGKILL at {point} {at}" in out, out[-3000:]
  steps = workdir / "checkpoints"
  # What the kill left: whole committed steps with their checksums; the step being saved
  # (if any) only as orbax's temporary folder.
  committed = sorted(int(p.name) for p in steps.iterdir() if p.name.isdigit())
  assert committed and committed[-1] < at, committed
  for s in committed:
    assert integrity.verify(steps / str(s)), s
  if point != "step":
    assert list(steps.glob(f"{at}.orbax-checkpoint-tmp*")), list(steps.iterdir())
  assert (workdir / "lease.json").exists()  # left by the killed run
  p = _run(_train_cmd(source, workdir, "--resume"))
  out = p.communicate(timeout=900)[0]
  assert p.returncode == 0, out[-3000:]
  assert f"resumed from step {committed[-1]}" in out, out[-3000:]
  assert "took over the workdir lease" in out and "its process is gone" in out
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert got[s] == reference[s], (s, got[s], reference[s])
  assert not list(steps.glob("*tmp*"))
  for s in (STEPS - EVERY, STEPS):
    assert integrity.verify(steps / str(s))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(source, workdir, *extra, fault=None):
  port = _free_port()
  procs = []
  for pid in range(2):
    args = _train_cmd(source, workdir, "--coordinator", f"127.0.0.1:{port}",
                      "--num-processes", "2", "--process-id", str(pid), *extra)
    procs.append(_run(args, fault=fault, env=_env(4)))
  return procs


def test_two_processes_one_dies_during_a_save_then_both_resume(source, reference, tmp_path):
  """Process 1 of a two-process run is killed while step 8 is being saved; process 0, stuck
  in the save's barrier, is killed too (a TPU slice loses all its workers). Both resume from
  step 4, the last committed step, and reproduce the run."""
  workdir = tmp_path / "run"
  procs = _two_processes(source, workdir, fault=("save", 8, 1))
  deadline = time.time() + 900
  while procs[1].poll() is None and time.time() < deadline:
    time.sleep(0.2)
  time.sleep(2)
  procs[0].kill()
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert procs[1].returncode == -signal.SIGKILL and "FAULT: SIGKILL at save 8" in outs[1], \
      outs[1][-3000:]
  steps = workdir / "checkpoints"
  assert not (steps / "8").exists() and integrity.verify(steps / "4")
  procs = _two_processes(source, workdir, "--resume")
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert "resumed from step 4" in out, out[-3000:]
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):  # as test_train's two-process test: float32 rounding
    np.testing.assert_allclose(got[s], reference[s], rtol=1e-5, err_msg=f"step {s}")
  assert integrity.verify(steps / str(STEPS))
