"""`imprint-jax composite --manifest`: the JSONL job list, the per-job status file and, on
several hosts, the merge of the hosts' status files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from imprint_jax import compositing
from imprint_jax.errors import UserError

JOB_KEYS = {"object", "object_mask", "background", "mask", "box", "mask_level", "seed",
            "feather", "id"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATUS_FILE = "status.jsonl"


@dataclasses.dataclass
class Job:
  """A manifest line: its number, output id, the parsed job (None if unparsable), an error."""
  line: int
  id: str
  spec: dict[str, Any] | None
  error: str | None


def read_manifest(path: Path) -> list[Job]:
  """Parses a JSONL manifest; a bad line becomes a job carrying its error (not an abort)."""
  if not path.is_file():
    raise UserError(f"--manifest {path}: no such file")
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--manifest {path}: unreadable ({type(e).__name__})") from None
  base = path.parent
  jobs: list[Job] = []
  seen: set[str] = set()
  for n, text in enumerate(lines, start=1):
    text = text.strip()
    if not text or text.startswith("#"):
      continue
    default_id = f"{n:06d}"
    try:
      spec = json.loads(text)
    except ValueError as e:
      jobs.append(Job(n, default_id, None, f"line {n}: not valid JSON ({e.msg})"))
      continue
    if not isinstance(spec, dict):
      jobs.append(Job(n, default_id, None, f"line {n}: expected a JSON object"))
      continue
    job_id = spec.get("id", default_id)
    error = None
    if not isinstance(job_id, str) or not _ID_RE.match(job_id):
      error, job_id = (f"line {n}: id {job_id!r} is not a plain file name (letters, digits,"
                       " '.', '_', '-')"), default_id
    elif job_id in seen:
      error, job_id = f"line {n}: duplicate id {job_id!r}", f"{default_id}-dup"
    unknown = sorted(set(spec) - JOB_KEYS)
    if error is None and unknown:
      error = f"line {n}: unknown key {unknown[0]!r} (expected {', '.join(sorted(JOB_KEYS))})"
    for key in ("object", "background"):
      if error is None and not isinstance(spec.get(key), str):
        error = f"line {n}: {key!r} (a file path) is required"
    for key in ("object", "object_mask", "background", "mask"):
      if error is None and key in spec:
        if not isinstance(spec[key], str):
          error = f"line {n}: {key!r} must be a file path"
        else:
          spec[key] = str(base / spec[key])
    seen.add(job_id)
    jobs.append(Job(n, job_id, spec, error))
  return jobs


def prepare_job(job: Job, args: argparse.Namespace,
                settings: dict[str, Any]) -> compositing.Prepared:
  """The job's inputs loaded and cropped (`compositing.prepare`); UserError for bad values."""
  s = job.spec
  box = s.get("box")
  if isinstance(box, str):
    box = compositing.parse_box(box)
  elif box is not None and not (isinstance(box, list) and len(box) == 4):
    raise UserError(f"box {box!r}: expected [x0, y0, x1, y1] or \"x0,y0,x1,y1\"")
  for key in ("seed", "mask_level"):
    if key in s and (not isinstance(s[key], int) or isinstance(s[key], bool)):
      raise UserError(f"{key} {s[key]!r}: expected an integer")
  feather = s.get("feather", args.feather)
  if feather is not None and (not isinstance(feather, (int, float)) or isinstance(feather, bool)):
    raise UserError(f"feather {feather!r}: expected a number of pixels")
  return compositing.prepare(
      s["object"], s["background"], object_mask=s.get("object_mask"), mask=s.get("mask"),
      box=box, mask_level=s.get("mask_level"), seed=s.get("seed", args.seed),
      feather=feather, encoder_size=settings["encoder_size"],
      generator_size=settings["generator_size"], context=settings["context"])


class Status:
  """Appends one JSON line per finished or failed job to DIR/status.jsonl (thread-safe)."""

  def __init__(self, path: Path, progress):
    self.path = path
    self.progress = progress
    self.ok = self.failed = 0
    self._lock = threading.Lock()

  def write(self, record: dict[str, Any]) -> None:
    with self._lock:
      if record["status"] == "ok":
        self.ok += 1
      else:
        self.failed += 1
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      self.progress.update(1)


def host_status_file(pid: int) -> str:
  return f"status.process-{pid}.jsonl"


def merge_status(out_dir: Path) -> Path:
  """Appends the records of every DIR/status.process-*.jsonl to DIR/status.jsonl, in manifest
  line order (stable: a job's records keep their order), then removes those files. The new
  status.jsonl is written under a temporary name and renamed; per-host files left by a run
  that stopped early are merged by the next run that finishes."""
  parts = sorted(out_dir.glob("status.process-*.jsonl"))
  if not parts:
    return out_dir / STATUS_FILE
  records = []
  for part in parts:
    for text in part.read_text().splitlines():
      try:
        records.append(json.loads(text))
      except ValueError:  # empty, or a line cut short by a host that was stopped
        continue
  records.sort(key=lambda r: r.get("line", 0))
  path = out_dir / STATUS_FILE
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):
    old += "\n"
  tmp = out_dir / f".{STATUS_FILE}.tmp-{os.getpid()}"
  tmp.write_text(old + "".join(json.dumps(r) + "\n" for r in records))
  os.replace(tmp, path)
  for part in parts:
    part.unlink()
  return path
