"""Where a run's files live: local folders or Cloud Storage (`gs://bucket/...`).

Every path a run writes or reads as a checkpoint (`train --workdir`, `init.checkpoint`,
`init.encoder_from`, `--ckpt`, `encode-objects --out`) goes through `path()`, which returns an
`etils.epath.Path`: a local path made absolute (orbax refuses relative ones), or a `gs://` path
that etils reads and writes through gcsfs and orbax writes through tensorstore, as MaxText does.
`pathlib.Path("gs://b/run")` collapses to the local folder `gs:/b/run`; `path()` refuses such a
string instead of writing a local folder named `gs:`.

Prepared pair shards (ArrayRecord, read by grain) and precomputed object tokens are read with
local file reads: on Cloud TPU, mount the bucket with gcsfuse (`gcsfuse --implicit-dirs -o ro
BUCKET /gcs/BUCKET`) and give `/gcs/BUCKET/...` paths. Checkpoints under a gcsfuse mount are
written with orbax's commit-file atomicity (a marker file when complete), not its default
directory rename, which gcsfuse turns into a copy and a delete of every object.

`STORAGE_EMULATOR_HOST` (a local GCS emulator, as gcsfs and google-cloud-storage honour it) also
points tensorstore at the emulator, with a placeholder token: emulators check none.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Union

from etils import epath

from imprint_jax.errors import UserError

PathLike = Union[str, os.PathLike]

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# A URL whose `//` a pathlib.Path or os.path.normpath collapsed into one slash, or lost.
_COLLAPSED = re.compile(r"^(gs|s3|gcs|https?):(?!//)", re.IGNORECASE)
_REMOTE_SCHEMES = ("gs",)
GCSFUSE_PREFIX = "/gcs/"


def configure_emulator() -> None:
  """Points tensorstore at `STORAGE_EMULATOR_HOST` when it is set (gcsfs and
  google-cloud-storage read it themselves); a no-op otherwise."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  url = host if "://" in host else f"http://{host}"
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  # gcsfs warns on every open that it found no credentials to ask the bucket's type with.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)


def is_remote(p: PathLike) -> bool:
  return bool(_URL.match(os.fspath(p)))


def path(p: PathLike) -> epath.Path:
  """The epath.Path of a run path: `gs://...` as it is, a local path made absolute.

  UserError for another URL scheme or a `gs:/...` whose double slash was lost."""
  text = os.fspath(p)
  m = _URL.match(text)
  if m:
    if m.group(1).lower() not in _REMOTE_SCHEMES:
      raise UserError(f"{text}: only local paths and gs:// are supported")
    configure_emulator()
    return epath.Path(text)
  if _COLLAPSED.match(text):
    raise UserError(f"{text}: looks like a URL that lost its '//' (a pathlib.Path collapses"
                    " 'gs://bucket' into 'gs:/bucket'); write gs://BUCKET/...")
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def local_path(p: PathLike, what: str) -> str:
  """An absolute local path for data read with plain file reads; UserError for a URL."""
  text = os.fspath(p)
  if is_remote(text) or _COLLAPSED.match(text):
    raise UserError(f"{what} {text}: read with local file reads; mount the bucket with gcsfuse"
                    f" (gcsfuse --implicit-dirs -o ro BUCKET {GCSFUSE_PREFIX}BUCKET) and give"
                    f" the {GCSFUSE_PREFIX}BUCKET/... path")
  return os.path.abspath(os.path.expanduser(text))


def _gcsfuse_mounts() -> list[str]:
  try:
    with open("/proc/mounts") as f:
      return [line.split()[1] for line in f if len(line.split()) > 2
              and line.split()[2] == "fuse.gcsfuse"]
  except OSError:
    return []


def on_gcsfuse(p: epath.Path) -> bool:
  """True for a local path under `/gcs/` (where launch_tpu.sh mounts the bucket) or under any
  gcsfuse mount point."""
  if is_remote(p):
    return False
  text = os.path.abspath(os.fspath(p))
  return text.startswith(GCSFUSE_PREFIX) or any(
      text == m or text.startswith(m.rstrip("/") + "/") for m in _gcsfuse_mounts())


def atomicity_options(p: epath.Path):
  """Orbax's atomicity for checkpoints under `p`: commit-file on a gcsfuse mount (still reading
  checkpoints written there with renames), orbax's default (None) elsewhere. On gs:// orbax
  picks commit-file itself."""
  if not on_gcsfuse(p):
    return None
  import orbax.checkpoint as ocp  # only for checkpoints: data tools use this module without it
  return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE,
                                      allow_legacy_atomic_rename=True)


def write_bytes(p: epath.Path, data: bytes) -> None:
  """Writes a whole file so that readers see the old content or the new, never a part: a
  temporary name then a rename locally; one object upload (atomic in itself) on gs://."""
  if is_remote(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_text(p: epath.Path, text: str) -> None:
  write_bytes(p, text.encode())
