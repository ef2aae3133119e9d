"""The one exception type for bad user input.

Library code raises `UserError` for anything the user can fix (a missing file, a wrong shape,
a bad config value, an incompatible checkpoint). The CLI prints its message on one line and
exits with status 2; tests assert on the message. Bugs stay ordinary exceptions with tracebacks.
"""


class UserError(Exception):
  """Bad input: the message is one line that says what is wrong and, where possible, the fix."""

  exit_code = 2
