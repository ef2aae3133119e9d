"""One run per workdir: a lease file that the live run holds and renews.

`<workdir>/lease.json` names the holder (host, pid, start time) and when it last renewed the
lease. `train` takes the lease before touching the workdir and renews it every `ttl_s / 4`
seconds from a background thread; a second `train` on the same workdir refuses with one line
naming the holder. A lease is free to take over when

  - it expired (not renewed for `ttl_s` seconds: the holder was killed or its host is gone),
  - its holder ran on this host and its pid no longer exists (a killed local run), or
  - the user passes `--takeover` (they know the holder is dead).

Every write is a compare-and-swap through tensorstore's key-value store: "create if absent"
and "replace if the generation is still the one read". On a local disk (and gcsfuse) that is
the `file` driver's lock-file protocol, on `gs://` GCS's `ifGenerationMatch` precondition, so
of two starters racing for the same workdir exactly one gets the lease. A run that finds its
lease replaced (someone took it over) stops at its next logging boundary without saving.

Expiry compares the holder's clock (the `renewed` time it wrote) with ours: hosts must keep
their clocks within a small fraction of `ttl_s` (NTP does; TPU VMs run it).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorstore as ts

from imprint_jax.errors import UserError

LEASE = "lease.json"

log = logging.getLogger("imprint_jax.train")


def _kvstore(workdir: str):
  workdir = os.fspath(workdir).rstrip("/") + "/"
  if workdir.startswith("gs://"):
    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    spec = {"driver": "gcs", "bucket": bucket, "path": prefix}
  else:
    spec = {"driver": "file", "path": os.path.abspath(workdir) + "/"}
  return ts.KvStore.open(spec).result()


def _alive_here(holder: dict[str, Any]) -> bool | None:
  """Whether the holder's process exists, if it ran on this host; None if elsewhere."""
  if holder.get("host") != socket.gethostname():
    return None
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):
    return True
  return True


def describe(holder: dict[str, Any]) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started"
          f" {holder.get('started', '?')}")


class Lease:
  """The workdir's lease (see the module docstring). Use as a context manager around the run."""

  def __init__(self, workdir: str | os.PathLike, *, ttl_s: float = 60.0,
               takeover: bool = False):
    self.workdir = os.fspath(workdir)
    self.ttl_s = float(ttl_s)
    self.takeover = takeover
    self.lost: dict[str, Any] | None = None  # the new holder, once someone took it over
    self._kv = _kvstore(self.workdir)
    self._generation: bytes | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                       "%Y-%m-%d %H:%M:%S UTC"),
                   "token": uuid.uuid4().hex, "ttl_s": self.ttl_s}

  def _read(self) -> tuple[dict[str, Any] | None, bytes]:
    r = self._kv.read(LEASE).result()
    if r.state != "value":
      return None, r.stamp.generation
    try:
      holder = json.loads(r.value)
      if not isinstance(holder, dict):
        raise ValueError
    except ValueError:
      holder = {"host": "?", "pid": "?", "started": "?", "renewed": 0.0}  # unreadable: stale
    return holder, r.stamp.generation

  def _write(self, if_equal: bytes) -> bool:
    body = json.dumps(dict(self.record, renewed=time.time())).encode()
    generation = self._kv.write(LEASE, body, if_equal=if_equal).result().generation
    if generation:
      self._generation = generation
    return bool(generation)

  def acquire(self) -> None:
    """Takes the lease or raises UserError naming the holder. Logs a takeover."""
    for _ in range(5):  # retried only when another starter changed the file in between
      holder, generation = self._read()
      if holder is None:
        if self._write(generation):
          return
        continue
      age = time.time() - float(holder.get("renewed", 0.0))
      alive = _alive_here(holder)
      if self.takeover:
        why = "--takeover"
      elif alive is False:
        why = "its process is gone"
      elif age > float(holder.get("ttl_s", self.ttl_s)):
        why = f"not renewed for {age:.0f} s"
      else:
        raise UserError(f"{self.workdir} is in use by another run ({describe(holder)}, lease"
                        f" renewed {max(age, 0):.0f} s ago); stop it, wait for its lease to"
                        " expire, or pass --takeover if it is dead")
      if self._write(generation):
        log.warning("took over the workdir lease of %s (%s)", describe(holder), why)
        return
    raise UserError(f"{self.workdir}: could not take the workdir lease (other runs keep"
                    " starting on it)")

  def renew(self) -> bool:
    """Renews the lease; False (and `lost` set) if another run took it over."""
    if self.lost is not None:
      return False
    if self._write(self._generation):
      return True
    holder, _ = self._read()
    self.lost = holder or {}
    log.error("the workdir lease was taken over by %s", describe(self.lost))
    return False

  def _renew_loop(self):
    while not self._stop.wait(self.ttl_s / 4):
      try:
        if not self.renew():
          return
      except Exception as e:  # storage hiccup: keep trying until the lease expires
        log.warning("could not renew the workdir lease: %s", e)

  def check(self) -> None:
    """UserError if another run took the lease over (this run must stop, without saving)."""
    if self.lost is not None:
      raise UserError(f"{self.workdir}: another run took over this workdir"
                      f" ({describe(self.lost)}); stopping without saving")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self.lost is None and self._generation:
      self._kv.write(LEASE, None, if_equal=self._generation).result()  # only if still ours

  def start(self) -> "Lease":
    """Takes the lease (see `acquire`) and renews it from a background thread."""
    if self._thread is None:
      self.acquire()
      self._thread = threading.Thread(target=self._renew_loop, name="workdir-lease",
                                      daemon=True)
      self._thread.start()
    return self

  def __enter__(self) -> "Lease":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.release()


class NoLease:
  """Processes other than 0 of a multi-process run: process 0 holds the lease for all."""

  lost = None

  def check(self) -> None:
    pass

  def __enter__(self) -> "NoLease":
    return self

  def __exit__(self, *exc) -> None:
    pass


def hold(workdir, *, ttl_s: float, takeover: bool):
  """The run's lease, taken (use it as a context manager to release it): by process 0; in a
  multi-process run the others learn whether process 0 got it (a collective) and fail with it."""
  if jax.process_count() == 1:
    return Lease(workdir, ttl_s=ttl_s, takeover=takeover).start()
  lease, error = NoLease(), None
  if jax.process_index() == 0:
    try:
      lease = Lease(workdir, ttl_s=ttl_s, takeover=takeover).start()
    except UserError as e:
      error = e
  ok = multihost_utils.process_allgather(np.array([error is None], np.int32))
  if error is not None:
    raise error
  if not np.asarray(ok).all():
    raise UserError(f"{workdir}: process 0 could not take the workdir lease (see its error)")
  return lease
