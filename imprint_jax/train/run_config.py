"""Loading `configs/<name>.py[:arg]` files and applying `--set key=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from imprint_jax.errors import UserError


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> its `get_config(arg)`, with overrides applied.

  Overrides are `dotted.key=value`; the value is a Python literal (number, tuple, None, ...)
  or, failing that, a plain string.
  """
  path, _, arg = spec.partition(":")
  file = Path(path)
  if not file.is_file():
    raise UserError(f"--config {path}: no such config file")
  module_spec = importlib.util.spec_from_file_location(f"_imprint_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"--config {path}: {e}") from None
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
