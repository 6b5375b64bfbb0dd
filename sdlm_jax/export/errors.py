"""Errors of bad export input: a flag value, a missing run or model directory, a file that is not an export.

Messages are one line naming the flag (or file) and the values it accepts; the command-line
entry points print them as `PROG: error: MESSAGE` with exit status 2.
"""

from sdlm_jax.errors import InputNotFoundError, UserInputError


class ExportInputError(UserInputError):
  """A value given to export or load cannot work; the message says which and what would."""


class ExportNotFoundError(ExportInputError, InputNotFoundError):
  """A directory or file that export or load needs does not exist."""
