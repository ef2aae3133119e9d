"""Device feeding: host batches -> global jax.Arrays, prefetched, with checkpointable state.

Where a batch goes is the caller's sharding (the trainer passes the batch sharding of
`imprint_jax.parallel.sharding`); nothing here names a mesh axis.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from imprint_jax.errors import UserError


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
              ) -> dict[str, jax.Array]:
  """Assembles each host's batch into global jax.Arrays.

  Args:
    batch: this host's arrays, leading dimension b (the per-host batch).
    sharding: the global arrays' sharding, splitting the batch dimension over the devices
      (e.g. `parallel.sharding.batch_sharding(mesh)`).

  Returns:
    The same dict of jax.Arrays with leading dimension b * process_count.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


_END = object()


class Prefetcher:
  """Keeps `size` batches in flight on the devices, with exact checkpoint state.

  A background thread calls next() on the host iterator and `to_global` (or `transfer`).
  `get_state()` is the host iterator's state right after the last batch the caller took, so a
  checkpoint saved after step n resumes at batch n + 1 whatever was prefetched.
  """

  def __init__(self, iterator: Iterator, sharding: jax.sharding.Sharding | None = None, *,
               size: int = 2, transfer: Callable[[Any], Any] | None = None):
    """Starts the background thread.

    Args:
      iterator: a grain DatasetIterator (anything with next/get_state/set_state).
      sharding: where to place batches (`to_global`); None keeps the numpy batches (unless
        `transfer`).
      size: batches in flight.
      transfer: optional callable replacing `to_global(batch, sharding)`.
    """
    if size < 1:
      raise UserError(f"Prefetcher size {size}: must be at least 1")
    self._it = iterator
    self._size = size
    if transfer is None and sharding is not None:
      transfer = lambda b: to_global(b, sharding)  # noqa: E731
    self._transfer = transfer
    self._state = copy.deepcopy(iterator.get_state())
    self._thread = None
    self._start()

  def _start(self):
    self._queue = queue.Queue(maxsize=self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="imprint-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      while not self._stop.is_set():
        try:
          batch = next(self._it)
        except StopIteration:
          self._put((_END, None))
          return
        state = copy.deepcopy(self._it.get_state())
        if self._transfer is not None:
          batch = self._transfer(batch)
        if not self._put((batch, state)):
          return
    except BaseException as e:  # surfaced to the caller by __next__
      self._put((e, None))

  def _halt(self):
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      raise RuntimeError("Prefetcher is closed")
    item, state = self._queue.get()
    if item is _END or isinstance(item, BaseException):
      self._queue.put((item, None))  # the thread has ended: keep answering the same way
      if item is _END:
        raise StopIteration
      raise item
    self._state = state
    return item

  def get_state(self) -> dict[str, Any]:
    """The host iterator state after the last batch returned by `__next__` (JSON-able)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Drops the batches in flight and resumes the host iterator from `state`."""
    self._halt()
    self._it.set_state(copy.deepcopy(dict(state)))
    self._state = copy.deepcopy(dict(state))
    self._start()

  def close(self) -> None:
    """Stops the thread and closes the host iterator (ends grain's worker processes)."""
    self._halt()
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
