"""Explicit two-way weight name tables between PyTorch files and nnx modules.

A converter is a list of `Rule`s: one PyTorch key, one nnx parameter path, one transform kind.
The same table serves import (file -> module) and export (module -> file). Every key is
accounted for in both directions: a key in the file that no rule names, a rule whose key is not
in the file, or a tensor of the wrong shape is a `UserError` naming the key. A module parameter
that no rule names is a bug in the table and raises `ValueError`.

Weights are read from the safetensors files on disk, never from a PyTorch `state_dict()` (in
transformers 5 DINOv2's in-memory names differ from the names in the file), and never from
pickle `.bin` files, which can run code when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from imprint_jax.errors import UserError

Path_ = tuple[str | int, ...]
# The diffusers release the exported config.json files were tested against.
DIFFUSERS_VERSION = "0.42.1"


def _conv_to_jax(w: np.ndarray) -> np.ndarray:  # torch OIHW -> HWIO
  return np.transpose(w, (2, 3, 1, 0))


def _conv_to_torch(w: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
  return np.transpose(w, (3, 2, 0, 1))


def _conv1x1_to_jax(w: np.ndarray) -> np.ndarray:  # torch (O, I, 1, 1) -> dense (I, O)
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    raise UserError(f"expected a 1x1 conv kernel of shape (O, I, 1, 1), got {w.shape}")
  return np.transpose(w[:, :, 0, 0])


def _conv1x1_to_torch(w: np.ndarray) -> np.ndarray:
  return np.transpose(w)[:, :, None, None]


# kind -> (to_jax, to_torch, torch shape from jax shape)
TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "copy": (lambda w: w, lambda w: w, lambda s: s),
    "linear": (np.transpose, np.transpose, lambda s: s[::-1]),
    "conv": (_conv_to_jax, _conv_to_torch, lambda s: (s[3], s[2], s[0], s[1])),
    "conv1x1_linear": (_conv1x1_to_jax, _conv1x1_to_torch, lambda s: (s[1], s[0], 1, 1)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: `torch` key in the file <-> `path` in `nnx.state(module)`, via `kind`."""
  torch: str
  path: Path_
  kind: str = "copy"

  def __post_init__(self):
    if self.kind not in TRANSFORMS:
      raise ValueError(f"unknown transform kind {self.kind!r} for {self.torch}")


def join(*parts: str | int) -> str:
  """Joins non-empty name parts with dots: join('down_blocks', 0, 'resnets') -> ..."""
  return ".".join(str(p) for p in parts if p != "")


def linear(torch_prefix: str, path: Path_, bias: bool = True) -> list[Rule]:
  """Rules for a torch nn.Linear <-> nnx.Linear."""
  rules = [Rule(f"{torch_prefix}.weight", (*path, "kernel"), "linear")]
  if bias:
    rules.append(Rule(f"{torch_prefix}.bias", (*path, "bias")))
  return rules


def conv(torch_prefix: str, path: Path_, bias: bool = True) -> list[Rule]:
  """Rules for a torch nn.Conv2d <-> nnx.Conv."""
  rules = [Rule(f"{torch_prefix}.weight", (*path, "kernel"), "conv")]
  if bias:
    rules.append(Rule(f"{torch_prefix}.bias", (*path, "bias")))
  return rules


def norm(torch_prefix: str, path: Path_) -> list[Rule]:
  """Rules for a torch LayerNorm/GroupNorm (weight, bias) <-> nnx norm (scale, bias)."""
  return [Rule(f"{torch_prefix}.weight", (*path, "scale")),
          Rule(f"{torch_prefix}.bias", (*path, "bias"))]


def _param_leaves(module: nnx.Module) -> dict[Path_, nnx.Variable]:
  return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _check_table(rules: list[Rule], leaves: Mapping[Path_, Any], what: str) -> None:
  seen_keys, seen_paths = set(), set()
  for r in rules:
    if r.torch in seen_keys or r.path in seen_paths:
      raise ValueError(f"{what} table names {r.torch} / {r.path} twice")
    seen_keys.add(r.torch)
    seen_paths.add(r.path)
    if r.path not in leaves:
      raise ValueError(f"{what} table maps {r.torch} to {r.path}, which the module lacks")
  uncovered = [p for p in leaves if p not in seen_paths]
  if uncovered:
    raise ValueError(f"{what} table does not cover module parameters: {uncovered[:5]}")


def load_into(module: nnx.Module, rules: list[Rule], tensors: Mapping[str, np.ndarray], *,
              source: str, what: str) -> None:
  """Writes `tensors` (PyTorch names and layout) into `module`'s parameters, in place.

  Raises UserError naming the first unexpected, missing or wrongly-shaped key, before any
  parameter is touched.
  """
  leaves = _param_leaves(module)
  _check_table(rules, leaves, what)
  by_key = {r.torch: r for r in rules}
  unexpected = sorted(k for k in tensors if k not in by_key)
  if unexpected:
    raise UserError(f"{source}: unexpected key {unexpected[0]!r} for a {what} with this config"
                    f" ({len(unexpected)} unexpected keys in all)")
  missing = [r.torch for r in rules if r.torch not in tensors]
  if missing:
    raise UserError(f"{source}: missing key {missing[0]!r} for a {what} with this config"
                    f" ({len(missing)} missing keys in all)")
  new_values = {}
  for r in rules:
    to_jax, _, torch_shape = TRANSFORMS[r.kind]
    leaf = leaves[r.path]
    want = tuple(torch_shape(tuple(leaf.shape)))
    got = tuple(tensors[r.torch].shape)
    if got != want:
      raise UserError(f"{source}: key {r.torch!r} has shape {got}, but a {what} with this"
                      f" config needs {want}")
    value = np.asarray(to_jax(np.asarray(tensors[r.torch])))
    new_values[r.path] = jnp.asarray(value, dtype=leaf.get_value().dtype)
  for path, value in new_values.items():
    leaves[path].set_value(value)


def export_from(module: nnx.Module, rules: list[Rule], *, what: str,
                dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Reads `module`'s parameters into a dict of PyTorch-named, PyTorch-layout numpy arrays."""
  leaves = _param_leaves(module)
  _check_table(rules, leaves, what)
  out = {}
  for r in rules:
    _, to_torch, _ = TRANSFORMS[r.kind]
    value = np.asarray(jax.device_get(leaves[r.path].get_value()))
    out[r.torch] = np.ascontiguousarray(to_torch(value).astype(dtype))
  return out


# ----------------------------------------------------------------------------- files on disk

def find_weight_file(folder: str | os.PathLike, stem: str) -> list[Path]:
  """The safetensors file(s) of a diffusers/transformers folder, or a UserError saying why not.

  `stem` is 'diffusion_pytorch_model' (diffusers) or 'model' (transformers). Sharded weights
  (`<stem>.safetensors.index.json`) and variants (`<stem>.fp16.safetensors`) are accepted.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"{folder}: no such folder")
  single = folder / f"{stem}.safetensors"
  if single.is_file():
    return [single]
  index = folder / f"{stem}.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise UserError(f"{index}: not a safetensors index ({e})") from None
    files = sorted({folder / f for f in weight_map.values()})
    for f in files:
      if not f.is_file():
        raise UserError(f"{index} names {f.name}, which is missing")
    return files
  variants = sorted(folder.glob(f"{stem}.*.safetensors"))
  if len(variants) == 1:
    return variants
  if len(variants) > 1:
    raise UserError(f"{folder}: several weight variants ({', '.join(v.name for v in variants)});"
                    " keep one")
  pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
      p.name for p in folder.glob("*.pt*"))
  if pickles:
    raise UserError(
        f"{folder}: only pickle weights ({pickles[0]}); imprint-jax reads safetensors only, as"
        " pickle files can run code. Convert once with `from_pretrained(DIR)."
        "save_pretrained(DIR, safe_serialization=True)` in PyTorch")
  raise UserError(f"{folder}: no weights ({stem}.safetensors not found)")


def read_safetensors(files: Iterable[Path]) -> dict[str, np.ndarray]:
  """All tensors of the given safetensors files, as numpy arrays (bf16 via ml_dtypes)."""
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="np") as fh:
        for k in fh.keys():
          tensors[k] = fh.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{f}: not a readable safetensors file ({e})") from None
  return tensors


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: missing ({what} needs its config.json)")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  save_file(dict(tensors), str(path), metadata=metadata or {"format": "pt"})


class AtomicDir:
  """Builds a folder under a temporary sibling name and renames it into place on success.

      with AtomicDir(out) as tmp:
        (tmp / "config.json").write_text(...)

  On an exception the temporary folder is removed and `out` is left as it was. An existing
  `out` is replaced only when the new one is complete.
  """

  def __init__(self, out: str | os.PathLike):
    self.out = Path(out)

  def __enter__(self) -> Path:
    self.out.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
    return self.tmp

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return
    if self.out.exists():
      old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
      os.rename(self.out, old)
      os.rename(self.tmp, self.out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(self.tmp, self.out)
