"""Loading a run config and applying `--set key=value` overrides.

A config is named (`stage1`, `stage2[:tiny]`: the modules of the installed
`imprint_jax.configs`, i.e. the repository's `configs/` folder) or given as a file
(`configs/stage1.py[:tiny]`, `my_config.py`); either defines `get_config(arg)`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from imprint_jax import configs
from imprint_jax.errors import UserError


def packaged_configs() -> list[str]:
  """The names `--config` accepts besides file paths (`imprint_jax.configs`' modules)."""
  return sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                if hasattr(importlib.import_module(f"imprint_jax.configs.{m.name}"),
                           "get_config"))


def _config_module(path: str):
  file = Path(path)
  if file.is_file():
    module_spec = importlib.util.spec_from_file_location(f"_imprint_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
      module_spec.loader.exec_module(module)
    except SyntaxError as e:
      raise UserError(f"--config {path}: {e}") from None
    return module
  names = packaged_configs()
  if re.fullmatch(r"\w+", path) and path in names:
    return importlib.import_module(f"imprint_jax.configs.{path}")
  raise UserError(f"--config {path}: no such config file, nor a packaged config"
                  f" ({', '.join(names)})")


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`name[:arg]` or `path/to/config.py[:arg]` -> its `get_config(arg)`, with overrides applied.

  Overrides are `dotted.key=value`; the value is a Python literal (number, tuple, None, ...)
  or, failing that, a plain string.
  """
  path, _, arg = spec.partition(":")
  module = _config_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config {path}: defines no get_config(arg)")
  try:
    config = module.get_config(arg)
  except ValueError as e:
    raise UserError(str(e)) from None
  for item in overrides:
    apply_override(config, item)
  return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  key, sep, raw = item.partition("=")
  if not sep:
    raise UserError(f"--set {item!r}: expected key=value")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or p not in node:
      raise UserError(f"--set {key}: the config has no {p!r}")
    node = node[p]
  if leaf not in node:
    raise UserError(f"--set {key}: the config has no {leaf!r}")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UserError(f"--set {key}={raw}: {e}") from None
