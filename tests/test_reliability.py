"""Reliability: checkpoint checksums, resume fallback, the workdir lease, full disks.

The faults here are cheap (small orbax trees, tiny tmpfs mounts, a writer that fails part
way); training runs killed with SIGKILL are in test_faults.py (slow) and test_train.py.
"""

import argparse
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

from array_record.python import array_record_module as arm
import jax
import numpy as np
import pytest

from imprint_jax.cli import prepare as prepare_cli
from imprint_jax.cli.flags import prepare as prepare_flags
from imprint_jax.convert import integrity
from imprint_jax.data import pipeline, prepared, records, token_store
from imprint_jax.data_prep import synthetic
from imprint_jax.errors import UserError
from imprint_jax.train import lease as lease_lib
from imprint_jax.train.checkpoints import RunCheckpoints
from imprint_jax.train.steps import TrainState

REPO = Path(__file__).resolve().parents[1]


def flip_byte(path: Path, offset: int | None = None) -> None:
  data = bytearray(path.read_bytes())
  i = len(data) // 2 if offset is None else offset
  data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def biggest_file(folder: Path) -> Path:
  return max((p for p in folder.rglob("*") if p.is_file() and p.name != integrity.CHECKSUMS),
             key=lambda p: p.stat().st_size)


# ------------------------------------------------------------------------------------------
# Checksums


def test_checksums_name_the_bad_file(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(os.urandom(3000))
  (tmp_path / "y.json").write_text("{}")
  assert integrity.verify(tmp_path) is False  # no checksums yet: unverified
  integrity.write(tmp_path)
  assert integrity.verify(tmp_path) is True
  assert json.loads((tmp_path / integrity.CHECKSUMS).read_text())["files"].keys() == {
      "a/x.bin", "y.json"}
  flip_byte(tmp_path / "a" / "x.bin")  # same size, other bytes
  with pytest.raises(integrity.CorruptCheckpoint,
                     match=r"step 7 is corrupt: a/x.bin does not match the SHA-256"):
    integrity.verify(tmp_path, "the checkpoint of step 7")
  (tmp_path / "a" / "x.bin").write_bytes(b"short")
  with pytest.raises(integrity.CorruptCheckpoint, match="a/x.bin differs in size"):
    integrity.verify(tmp_path)
  (tmp_path / "a" / "x.bin").unlink()
  with pytest.raises(integrity.CorruptCheckpoint, match="a/x.bin is missing"):
    integrity.verify(tmp_path)
  (tmp_path / integrity.CHECKSUMS).write_text("{not json")
  with pytest.raises(integrity.CorruptCheckpoint, match="checksums.json is unreadable"):
    integrity.verify(tmp_path)


def _tiny_state(seed: int) -> TrainState:
  rng = np.random.default_rng(seed)
  params = {"adapter": {"w": rng.standard_normal((64, 32)).astype(np.float32)}}
  frozen = {"vae": {"b": rng.standard_normal((128,)).astype(np.float32)}}
  opt = {"mu": {"adapter": {"w": rng.standard_normal((64, 32)).astype(np.float32)}}}
  return jax.device_put(TrainState(step=np.int32(seed), params=params, frozen=frozen,
                                   opt_state=opt), jax.devices()[0])


def _fake_setup(state: TrainState):
  """What RunCheckpoints.restore reads of a Setup: the abstract state and its shardings."""
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return types.SimpleNamespace(
      abstract_state=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
      state_shardings=jax.tree.map(lambda x: dev, state))


def _save(ckpts: RunCheckpoints, step: int) -> TrainState:
  state = _tiny_state(step)
  ckpts.save(state, {"step": step}, force=True)
  return state


@pytest.mark.parametrize("use_async", [True, False])
def test_resume_falls_back_to_newest_intact_step(tmp_path, caplog, use_async):
  ckpts = RunCheckpoints(tmp_path, keep=5, use_async=use_async)
  states = {s: _save(ckpts, s) for s in (1, 2, 3)}
  ckpts.close()
  steps = tmp_path / "checkpoints"
  for s in (1, 2, 3):  # the checksums came with orbax's commit and match
    assert integrity.verify(steps / str(s))
  flip_byte(biggest_file(steps / "3" / "model"))
  (steps / "2" / "opt_state" / "_sharding").unlink()
  ckpts = RunCheckpoints(tmp_path, keep=5, use_async=use_async)
  with caplog.at_level(logging.WARNING, logger="imprint_jax.train"):
    state, meta = ckpts.restore_intact(_fake_setup(states[1]))
  assert meta["step"] == 1
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  text = caplog.text
  assert "the checkpoint of step 3 is corrupt: model/" in text
  assert "the checkpoint of step 2 is corrupt: opt_state/_sharding is missing" in text
  assert "resuming from step 1, the newest intact checkpoint" in text
  # The corrupt steps are set aside, so the resumed run can write those steps again.
  assert sorted(p.name for p in steps.iterdir()) == ["1", "corrupt-2", "corrupt-3"]
  assert ckpts.latest_step() == 1
  _save(ckpts, 2)
  ckpts.close()
  assert integrity.verify(steps / "2")
  # Nothing intact at all: one line.
  flip_byte(biggest_file(steps / "1" / "model"))
  flip_byte(biggest_file(steps / "2" / "model"))
  ckpts = RunCheckpoints(tmp_path, keep=5, use_async=use_async)
  with pytest.raises(UserError, match="no intact checkpoint to resume from"):
    ckpts.restore_intact(_fake_setup(states[1]))
  ckpts.close()


def test_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
  ckpts = RunCheckpoints(tmp_path, keep=5)
  want = _save(ckpts, 4)
  ckpts.close()
  (tmp_path / "checkpoints" / "4" / integrity.CHECKSUMS).unlink()  # e.g. older imprint-jax
  ckpts = RunCheckpoints(tmp_path, keep=5)
  with caplog.at_level(logging.WARNING, logger="imprint_jax.train"):
    _, meta = ckpts.restore_intact(_fake_setup(want))
  ckpts.close()
  assert meta["step"] == 4 and "restoring it unverified" in caplog.text


# ------------------------------------------------------------------------------------------
# Full disk during a checkpoint save


def _no_partial_steps(steps: Path) -> list[str]:
  return [p.name for p in steps.iterdir() if "tmp" in p.name]


def test_failed_checksum_write_fails_the_save_cleanly(tmp_path, monkeypatch):
  """A full disk (ENOSPC) while orbax commits (here: writing checksums.json, in orbax's commit
  callback): one line, the earlier step intact, no partial step."""
  ckpts = RunCheckpoints(tmp_path, keep=5)
  _save(ckpts, 1)
  ckpts.wait()
  real_write = integrity.write

  def full_disk(folder):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

  monkeypatch.setattr(integrity, "write", full_disk)
  _save(ckpts, 2)  # asynchronous: the failure shows at the next save or at close
  with pytest.raises(UserError) as e:
    ckpts.close()
  monkeypatch.setattr(integrity, "write", real_write)
  msg = str(e.value)
  assert "\n" not in msg and "saving the checkpoint of step 2 failed" in msg, msg
  assert "No space left on device" in msg and "the earlier checkpoints are intact" in msg
  steps = tmp_path / "checkpoints"
  assert sorted(p.name for p in steps.iterdir()) == ["1"], list(steps.iterdir())
  assert integrity.verify(steps / "1")


def _mount_tmpfs(path: Path, size: str) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs (root only; skipped elsewhere: the injected-failure tests cover the same
  code everywhere)."""
  mnt = tmp_path / "disk"
  if not _mount_tmpfs(mnt, "1m"):
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_checkpoint_save(small_disk):
  ckpts = RunCheckpoints(small_disk, keep=5)
  _save(ckpts, 1)
  ckpts.wait()
  free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
  (small_disk / "filler").write_bytes(b"\0" * (free - 8192))  # step 2 will not fit
  with pytest.raises(UserError) as e:
    _save(ckpts, 2)
    ckpts.close()
  msg = str(e.value)
  assert "\n" not in msg and "saving the checkpoint of step 2 failed" in msg, msg
  assert "No space left on device" in msg, msg
  steps = small_disk / "checkpoints"
  assert sorted(p.name for p in steps.iterdir()) == ["1"], list(steps.iterdir())
  assert integrity.verify(steps / "1")


# ------------------------------------------------------------------------------------------
# Full disk during `prepare`


@pytest.fixture(scope="module")
def raw_mvimgnet(tmp_path_factory):
  cfg = synthetic.SyntheticConfig(groups=3, frames=5, frame_size=96, objects=2, seed=3)
  return synthetic.generate(tmp_path_factory.mktemp("raw"), cfg,
                            layouts=("mvimgnet",))["mvimgnet"]


PREPARE_ARGS = ["--source", "mvimgnet", "--pairing", "pairs", "--workers", "1", "--no-progress",
                "--encoder-size", "32", "--generator-size", "32", "--min-size", "16",
                "--split", "train"]


def _files(folder: Path) -> list[str]:
  return sorted(os.fspath(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def clean_build(raw_mvimgnet, tmp_path_factory) -> Path:
  args = argparse.ArgumentParser()
  prepare_flags.add_arguments(args)
  out = tmp_path_factory.mktemp("clean") / "pairs"
  prepare_cli.run(args.parse_args(PREPARE_ARGS + ["--root", str(raw_mvimgnet), "--out", str(out)]))
  return out


def _pairs(out: Path) -> int:
  return json.loads((out / "prepare_summary.json").read_text())["splits"]["train"]["pairs"]


@pytest.mark.parametrize("phase", [1, 2])  # work units, then TFDS shards
def test_writer_failing_part_way_in_prepare(raw_mvimgnet, clean_build, tmp_path, monkeypatch,
                                            phase):
  """An ArrayRecord writer that fails part way like a full disk does (riegeli's RuntimeError):
  one line, the partial file removed, finished work units kept for the rerun."""
  real = arm.ArrayRecordWriter
  writes = {"n": 0}
  fail_after = 2 if phase == 1 else _pairs(clean_build) + 2  # each record: unit, then shard

  class FailingWriter:
    def __init__(self, path, options):
      self.path, self.inner = path, real(path, options)

    def write(self, payload):
      writes["n"] += 1
      if writes["n"] > fail_after:
        raise RuntimeError(f"write() failed: No space left on device; writing {self.path}")
      self.inner.write(payload)

    def close(self):
      self.inner.close()

  monkeypatch.setattr(arm, "ArrayRecordWriter", FailingWriter)
  out = tmp_path / "pairs"
  args = argparse.ArgumentParser()
  prepare_flags.add_arguments(args)
  with pytest.raises(UserError) as e:
    prepare_cli.run(args.parse_args(PREPARE_ARGS + ["--root", str(raw_mvimgnet),
                                                 "--out", str(out)]))
  msg = str(e.value)
  assert "\n" not in msg and "writing failed (write() failed: No space left" in msg, msg
  assert "the partial file was removed" in msg
  left = _files(out)
  assert not [f for f in left if ".tmp" in f or "array_record" in f], left
  if phase == 2:  # the work unit was finished before the shard failed: kept
    assert ".prepare/train/unit-00000.ar" in left and ".prepare/train/unit-00000.json" in left
  monkeypatch.setattr(arm, "ArrayRecordWriter", real)
  assert prepare_cli.run(args.parse_args(PREPARE_ARGS + ["--root", str(raw_mvimgnet),
                                                      "--out", str(out)])) == 0


@pytest.mark.parametrize("phase", [1, 2])
def test_full_disk_during_prepare(raw_mvimgnet, clean_build, tmp_path, phase):
  shard = sum(p.stat().st_size for p in clean_build.glob("*.array_record-*"))
  # Phase 2 needs room for the work units and the shards (each about `shard` bytes).
  size = shard // 2 if phase == 1 else shard * 3 // 2 + 16384
  mnt = tmp_path / "disk"
  if not _mount_tmpfs(mnt, f"{size // 4096 * 4096}"):
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    out = subprocess.run([sys.executable, "-m", "imprint_jax.cli", "prepare", *PREPARE_ARGS,
                          "--root", str(raw_mvimgnet), "--out", str(mnt / "pairs")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imprint-jax prepare: error: "), lines
    assert "No space left on device" in lines[0]
    assert ("/final/imprint_pairs-train" if phase == 2 else "/unit-00000.ar") in lines[0]
    left = _files(mnt / "pairs")
    assert not [f for f in left if ".tmp" in f or "array_record" in f], left
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------
# The workdir lease


def test_lease_refuses_a_second_run_and_is_released(tmp_path):
  first = lease_lib.Lease(tmp_path, ttl_s=30).start()
  with pytest.raises(UserError) as e:
    lease_lib.Lease(tmp_path, ttl_s=30).start()
  msg = str(e.value)
  assert f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, started" \
      in msg and "\n" not in msg
  assert first.renew() and first.lost is None
  first.release()
  assert not (tmp_path / lease_lib.LEASE).exists()
  with lease_lib.Lease(tmp_path, ttl_s=30):  # free again
    pass


def _write_holder(workdir: Path, **fields) -> None:
  holder = {"host": "other-host", "pid": 12345, "started": "2026-01-01 00:00:00 UTC",
            "token": "x", "ttl_s": 30.0, "renewed": time.time()}
  holder.update(fields)
  (workdir / lease_lib.LEASE).write_text(json.dumps(holder))


def test_lease_takeover(tmp_path, caplog):
  # A live holder on another host: refused; expired (not renewed for ttl_s): taken over.
  _write_holder(tmp_path)
  with pytest.raises(UserError, match="host other-host, pid 12345, started 2026-01-01"):
    lease_lib.Lease(tmp_path).start()
  _write_holder(tmp_path, renewed=time.time() - 31)
  with caplog.at_level(logging.WARNING, logger="imprint_jax.train"):
    lease_lib.Lease(tmp_path).start().release()
  assert "took over the workdir lease of host other-host" in caplog.text
  assert "not renewed for 31 s" in caplog.text
  # A holder on this host whose process is gone: at once.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_holder(tmp_path, host=socket.gethostname(), pid=dead.pid)
  lease_lib.Lease(tmp_path).start().release()
  # --takeover: at once, and the old holder learns it lost the lease and stops.
  old = lease_lib.Lease(tmp_path, ttl_s=30).start()
  new = lease_lib.Lease(tmp_path, ttl_s=30, takeover=True).start()
  assert not old.renew()
  with pytest.raises(UserError, match="another run took over this workdir"):
    old.check()
  old.release()  # must not delete the new holder's lease
  assert json.loads((tmp_path / lease_lib.LEASE).read_text())["token"] == new.record["token"]
  new.release()


RACER = """
import os, sys, time
from imprint_jax.errors import UserError
from imprint_jax.train import lease
ready = sys.argv[2]
open(os.path.join(ready, sys.argv[3]), "w").close()
while len(os.listdir(ready)) < 4:  # every starter has imported: all race from here
  pass
try:
  held = lease.Lease(sys.argv[1], ttl_s=60).start()
  print("won", flush=True)
  time.sleep(1)
  held.release()
except UserError:
  print("refused", flush=True)
"""


@pytest.mark.parametrize("stale", [False, True])
def test_lease_race_has_one_winner(tmp_path, stale):
  """Starters racing for a free (or an expired) lease: exactly one gets it."""
  if stale:
    _write_holder(tmp_path, renewed=time.time() - 100)
  ready = tmp_path / "ready"
  ready.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(ready), str(i)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(4)]
  results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
  assert results == ["refused"] * 3 + ["won"], results


def test_second_train_on_a_workdir_is_refused(tmp_path):
  """As typed: `imprint-jax train` on a workdir another run holds: one line naming it."""
  held = lease_lib.Lease(tmp_path / "run", ttl_s=30).start()
  try:
    out = subprocess.run([sys.executable, "-m", "imprint_jax.cli", "train", "--config",
                          os.fspath(REPO / "configs/stage1.py:tiny"), "--workdir", "run"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
  finally:
    held.release()
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("imprint-jax train: error: ") and f"pid {os.getpid()}" in last, last
  assert "is in use by another run" in last and "--takeover" in last
  assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------
# Corrupt records in pair shards and object-token files


def _corrupt_copy(clean: Path, dest: Path) -> Path:
  shutil.copytree(clean, dest, ignore=shutil.ignore_patterns(".prepare"))
  shard = next(dest.glob("imprint_pairs-train.array_record-*"))
  # Inside the records (the 64 KiB block headers and the footer hold the file's index: a
  # flip there makes the whole file unreadable, which fails on opening, not per record).
  flip_byte(shard, 20000)
  return shard


def test_corrupt_pair_record_stops_or_is_skipped(clean_build, tmp_path, caplog):
  shard = _corrupt_copy(clean_build, tmp_path / "pairs")
  source, _ = prepared.open_source(str(tmp_path / "pairs"), "train")
  bad = []
  for i in range(len(source)):
    try:
      source[i]
    except records.CorruptRecord as e:
      bad.append((i, str(e)))
  assert len(bad) == 1, bad  # one record per riegeli chunk: one flipped byte, one record
  index, msg = bad[0]
  assert msg.startswith(f"{shard}: record {index} is corrupt (Corrupted Riegeli"), msg
  n = len(source)

  def one_epoch(on_corrupt):
    cfg = pipeline.DataConfig(sources=((str(tmp_path / "pairs"), 1.0),), encoder_size=32,
                              generator_size=32, on_corrupt_record=on_corrupt, read_threads=0)
    it = iter(pipeline.stage1_dataset(cfg, global_batch=1))
    return [next(it) for _ in range(n)]  # every record of the first (shuffled) epoch

  with pytest.raises(UserError) as e:
    one_epoch("stop")
  assert str(e.value) == f"{msg}; set data.on_corrupt_record='skip' to skip such records"
  with caplog.at_level(logging.WARNING, logger="imprint_jax.data"):
    batches = one_epoch("skip")
  assert len(batches) == n
  assert f"{msg}; skipped (1 corrupt records skipped by this process)" in caplog.text
  with pytest.raises(UserError, match="on_corrupt_record='ignore': expected one of"):
    pipeline.DataConfig(on_corrupt_record="ignore")


def test_corrupt_token_record_names_file_and_record(tmp_path):
  folder = tmp_path / "tokens"
  shape = (1, 16, 32)  # 1 KiB per record
  folder.mkdir()
  token_store.write_manifest(folder, encoder_size=32, variants=1, tokens=16, width=32,
                             sources=[{"path": "pairs", "splits": {"train": 5}}])
  path = token_store.source_dir(folder, 0) / token_store.shard_name("train", 0, 1)
  path.parent.mkdir(parents=True)
  rng = np.random.default_rng(0)
  payloads = [token_store.encode_record(i, rng.standard_normal(shape).astype(np.float16))
              for i in range(5)]
  records.write_array_record(path, payloads, tmp_path / "tmp")
  src = token_store.TokenSource(str(folder), 0, "pairs", "train")
  assert [token_store.decode_record(src[i], shape)[0] for i in range(5)] == list(range(5))
  clean = path.read_bytes()

  def bad_records():
    src = token_store.TokenSource(str(folder), 0, "pairs", "train")
    out = []
    for i in range(len(src)):
      try:
        src[i]
      except records.CorruptRecord as e:
        out.append((i, str(e)))
    return out

  for offset in range(1500, 5000, 250):  # inside the records, past the first
    path.write_bytes(clean)
    flip_byte(path, offset)
    bad = bad_records()
    if len(bad) == 1 and bad[0][0] > 0:
      break
  else:
    pytest.fail("no single flipped byte damages exactly one token record")
  index, msg = bad[0]
  assert msg.startswith(f"{path}: record {index} is corrupt (Corrupted Riegeli"), msg
