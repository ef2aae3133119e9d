"""ArrayRecord files (pair shards, object tokens, latents): atomic writing, and corrupt records
named, then stop or skip.

`write_array_record` writes a file under a temporary name and renames it once closed, so a
reader never sees a half-written file (`imprint-jax prepare` and the `encode-*` commands use it).

ArrayRecord files are riegeli files: every chunk (here one record, `group_size:1`) carries a
64-bit HighwayHash of its data, checked on every read. A damaged record therefore fails to read
("chunk data hash mismatch") instead of decoding into garbage. `Checked` turns that failure
into one line naming the file and the record's index in it, and `Skipping` applies
`data.on_corrupt_record`:

  "stop"  the run stops with that line (default: a damaged dataset is worth knowing about);
  "skip"  the record is replaced by the next intact one of the same source (so batches keep
          their size and a resumed run reads the same elements), logged with a running count.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from array_record.python import array_record_module

from imprint_jax.errors import UserError

ON_CORRUPT = ("stop", "skip")

log = logging.getLogger("imprint_jax.data")


class CorruptRecord(UserError):
  """A record that fails its checksum: names the file and the record's index in it."""


class Checked:
  """Random access to the records of `files` (in order) through `source` (any object with
  len() and [i] over their concatenation, e.g. grain's ArrayRecordDataSource); a read that
  fails raises CorruptRecord. Picklable if `source` is."""

  def __init__(self, source, files: Sequence[str], lengths: Sequence[int]):
    self.source = source
    self.files = [os.fspath(f) for f in files]
    self.starts = [0]
    for n in lengths:
      self.starts.append(self.starts[-1] + int(n))

  def __len__(self) -> int:
    return len(self.source)

  def where(self, i: int) -> str:
    k = max(0, bisect.bisect_right(self.starts, i) - 1)
    k = min(k, len(self.files) - 1)
    return f"{self.files[k]}: record {i - self.starts[k]}"

  def __getitem__(self, i: int):
    try:
      return self.source[i]
    except RuntimeError as e:  # riegeli: hash mismatch, truncated or unreadable chunk
      first = next((l.strip() for l in str(e).splitlines() if l.strip()), "unreadable")
      raise CorruptRecord(f"{self.where(i)} is corrupt ({first[:200]})") from None


def array_record_lengths(files: Sequence[str]) -> list[int]:
  """The number of records of each file."""
  out = []
  for f in files:
    reader = array_record_module.ArrayRecordReader(os.fspath(f))
    try:
      out.append(reader.num_records())
    finally:
      reader.close()
  return out


class Skipping:
  """Wraps a source whose reads may raise CorruptRecord, applying `on_corrupt` (see the
  module docstring). Picklable if `source` is."""

  def __init__(self, source, on_corrupt: str):
    if on_corrupt not in ON_CORRUPT:
      raise UserError(f"data.on_corrupt_record={on_corrupt!r}: expected one of {ON_CORRUPT}")
    self.source, self.on_corrupt = source, on_corrupt
    self.skipped = 0

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int):
    n = len(self.source)
    for k in range(n):
      try:
        return self.source[(i + k) % n]
      except CorruptRecord as e:
        if self.on_corrupt == "stop":
          raise CorruptRecord(f"{e}; set data.on_corrupt_record='skip' to skip such"
                              " records") from None
        self.skipped += 1
        log.warning("%s; skipped (%d corrupt records skipped by this process)", e,
                    self.skipped)
    raise UserError(f"every record of a data source is corrupt ({n} records)")


def write_array_record(path, payloads: Iterable[bytes], tmp_dir) -> tuple[int, int]:
  """Writes `payloads` to an ArrayRecord file at `path` atomically.

  The file is written under `tmp_dir` (on the same file system as `path`) and renamed to
  `path` once closed, so `path` only ever names a complete file. A storage failure (full
  disk, quota, permissions) is one UserError line; the partial file is removed.
  Returns (number of records, file size in bytes).
  """
  path, tmp_dir = Path(path), Path(tmp_dir)
  tmp_dir.mkdir(parents=True, exist_ok=True)
  tmp = tmp_dir / f"{path.name}.tmp{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
  count = 0
  try:
    for payload in payloads:
      try:
        writer.write(payload)
      except (RuntimeError, OSError) as e:
        raise _write_failed(path, e) from None
      count += 1
  except BaseException:
    try:
      writer.close()
    except (RuntimeError, OSError):
      pass  # the first failure is the one to report
    tmp.unlink(missing_ok=True)
    raise
  try:
    writer.close()  # flushes the last chunk: a full disk often shows only here
    os.replace(tmp, path)
  except (RuntimeError, OSError) as e:
    tmp.unlink(missing_ok=True)
    raise _write_failed(path, e) from None
  return count, path.stat().st_size


def _write_failed(path: Path, e: BaseException) -> UserError:
  first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
  return UserError(f"{path}: writing failed ({first[:300]}); the partial file was removed")

