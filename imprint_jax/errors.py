"""The one exception type for bad user input.

Library code raises `UserError` for anything the user can fix (a missing file, a wrong shape,
a bad config value, an incompatible checkpoint). The CLI prints its message on one line and
exits with status 2; tests assert on the message. Bugs stay ordinary exceptions with tracebacks.
"""

import importlib


class UserError(Exception):
  """Bad input: the message is one line that says what is wrong and, where possible, the fix."""

  exit_code = 2


def import_extra(module: str, extra: str):
  """`importlib.import_module(module)`, or a UserError naming the pip extra that installs it.

  torch, diffusers, transformers and dreamsim are optional (`pip install 'imprint-jax[torch]'`,
  `[eval]`): a command that needs one says which extra in one line instead of a traceback.
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise UserError(f"this needs the '{extra}' extra ({e.name or module} is not installed):"
                    f" pip install 'imprint-jax[{extra}]'") from None
