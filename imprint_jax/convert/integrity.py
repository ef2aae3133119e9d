"""Content checksums of checkpoint folders: written at save, verified before a restore.

A checkpoint folder (an `import` output, a stage-0 source, a training step) carries
`checksums.json`: the size and SHA-256 of every file below it, written by the primary host
once every file of the checkpoint is on storage. For training steps it is written inside
orbax's commit (`post_finalization_callback` runs before the temporary folder is renamed), so
a step folder either has a complete checksums file or was never committed; synchronous saves
and `save_model` write it just after orbax returns (a kill in between leaves a complete step
without checksums: it restores with a warning, "unverified").

Orbax rewrites `_CHECKPOINT_METADATA` (its commit timestamp) after the commit; that one file
is not covered (orbax parses it as JSON and fails loudly if it is damaged).

Cost: reading every byte once. SHA-256 runs at about 1 GB/s per core (OpenSSL), files are
hashed on a pool of threads (hashlib releases the GIL), and in a multi-process run each
process hashes every n-th file and the verdicts are gathered, so a 10 GB training checkpoint
costs about 10 GB / (n_processes x min(8, cores) x 1 GB/s) plus the read from storage.

Paths go through etils.epath, so the same code runs on a local disk, gcsfuse and gs://.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from typing import Any

from etils import epath

from imprint_jax.errors import UserError

CHECKSUMS = "checksums.json"
FORMAT = 1
# Rewritten by orbax after its commit (commit timestamp): not covered.
_SKIP = frozenset({CHECKSUMS, "_CHECKPOINT_METADATA"})
_CHUNK = 8 << 20
_THREADS = 8
_REASONS = ("", "is missing", "differs in size from the one written at save",
            "does not match the SHA-256 written at save")

log = logging.getLogger("imprint_jax.convert.integrity")


class CorruptCheckpoint(UserError):
  """A checkpoint file is missing or its content differs from the checksum written at save."""


def _no_scheme(path) -> str:
  return os.fspath(path).split("://", 1)[-1]


def _files(folder: epath.Path) -> list[str]:
  out = []
  for dirpath, _, filenames in folder.walk():
    for name in filenames:
      # Not os.path.relpath: it reads "gs://b/x" as a local path ("gs:/b/x"); and on gs://
      # the walk may give folders without the scheme.
      rel = _no_scheme(dirpath / name)[len(_no_scheme(folder).rstrip("/")) + 1:]
      if rel not in _SKIP and not name.startswith(CHECKSUMS):
        out.append(rel)
  return sorted(out)


def file_digest(path: epath.Path) -> tuple[int, str]:
  """(size in bytes, hex SHA-256) of one file, read in 8 MiB chunks."""
  h = hashlib.sha256()
  size = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def _digests(folder: epath.Path, names: list[str]) -> list[tuple[int, str] | None]:
  def one(name):
    path = folder / name
    return file_digest(path) if path.exists() else None
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    return list(pool.map(one, names))


def write(folder: str | os.PathLike) -> epath.Path:
  """Writes `folder`/checksums.json covering every file below `folder` (but itself)."""
  folder = epath.Path(folder)
  names = _files(folder)
  files = {n: {"size": s, "sha256": d} for n, (s, d) in zip(names, _digests(folder, names))}
  text = json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n"
  path = folder / CHECKSUMS
  if os.fspath(folder).startswith("gs://"):
    path.write_text(text)  # a GCS object appears whole or not at all
  else:
    tmp = folder / (CHECKSUMS + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)
  return path


def read(folder: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
  """The checksums file's entries, None if the folder has none; CorruptCheckpoint if it is
  unreadable."""
  path = epath.Path(folder) / CHECKSUMS
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
      raise ValueError(f"format {manifest.get('format')!r}")
    return {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])}
            for k, v in manifest["files"].items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CorruptCheckpoint(f"{folder}: {CHECKSUMS} is unreadable ({e})") from None


def first_problem(folder: str | os.PathLike, files: dict[str, dict[str, Any]], *,
                  part: int = 0, parts: int = 1) -> tuple[int, int] | None:
  """(index into sorted `files`, reason code) of the first bad file among those this part
  checks (every `parts`-th file from `part`), or None."""
  folder = epath.Path(folder)
  names = sorted(files)[part::parts]
  for k, (name, got) in enumerate(zip(names, _digests(folder, names))):
    want = files[name]
    reason = (1 if got is None else 2 if got[0] != want["size"] else
              3 if got[1] != want["sha256"] else 0)
    if reason:
      return part + k * parts, reason
  return None


def _gathered_first_problem(folder, files) -> tuple[int, int] | None:
  # JAX only here: checksums are written and read by data tools that run without it.
  import jax
  n = jax.process_count()
  if n == 1:
    return first_problem(folder, files)
  import numpy as np
  from jax.experimental import multihost_utils
  mine = first_problem(folder, files, part=jax.process_index(), parts=n)
  mine = np.array(mine if mine is not None else (len(files), 0), np.int64)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(n, 2)
  best = every[np.argmin(every[:, 0])]
  return None if best[1] == 0 else (int(best[0]), int(best[1]))


def verify(folder: str | os.PathLike, what: str | None = None) -> bool:
  """Checks every file of a checkpoint folder against its checksums.

  Returns True if verified, False if the folder has no checksums file (written by an older
  imprint-jax, or a run killed between orbax's commit and the checksums); raises
  CorruptCheckpoint naming `what` (e.g. "the checkpoint of step 46") and the first bad file.
  In a multi-process run every process must call it (the work is split between them).
  """
  files = read(folder)
  if files is None:
    return False
  bad = _gathered_first_problem(folder, files)
  if bad is not None:
    name = sorted(files)[bad[0]]
    raise CorruptCheckpoint(f"{folder}: {what or 'checkpoint'} is corrupt: {name}"
                            f" {_REASONS[bad[1]]}")
  return True
