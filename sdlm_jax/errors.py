"""Errors of bad user input, and the one-line range and choice checks that raise them.

Library code raises a `UserInputError` (or a subclass: `sdlm_jax.config.ConfigError`,
`InputNotFoundError`, `DataFileError`) when what the caller gave (a config field, a flag,
a file, a run directory) cannot work. The command-line entry points print its message as
one line and exit with status 2 (sdlm_jax/cli/common.py); any other exception is a bug and
keeps its traceback. Messages name the field, its value and the values it accepts.
"""

import math


class UserInputError(ValueError):
  """A value given by the user cannot work; the message says which and what would."""


class InputNotFoundError(UserInputError, FileNotFoundError):
  """A file or directory the user named is missing (a --workdir sdlm-train did not write, data.paths)."""


class DataFileError(UserInputError):
  """A data file that cannot be read as the configured data.source."""


def check_choice(name: str, value, allowed, error=UserInputError):
  """Raises `error` unless `value` is one of `allowed`."""
  bool_choice = all(isinstance(a, bool) for a in allowed)
  if value not in allowed or isinstance(value, bool) != bool_choice:
    raise error(f"{name}={value!r} is not supported; allowed values: {', '.join(map(str, allowed))}")


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
  if hi is None:
    return f"{'>' if lo_open else '>='} {lo:g}"
  if lo is None:
    return f"{'<' if hi_open else '<='} {hi:g}"
  return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_number(name: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False, note: str = "", error=UserInputError):
  """Raises `error` unless `value` is a finite number (an int if `integer`) in the interval.

  `lo`/`hi` bound it (None: unbounded), closed unless `lo_open`/`hi_open`; `note` is
  appended to the allowed values, e.g. "(0: off)".
  """
  kind = "an integer" if integer else "a finite number"
  allowed = f"{kind} {_interval(lo, hi, lo_open, hi_open)}" if (lo, hi) != (None, None) else kind
  if integer:
    ok = isinstance(value, int) and not isinstance(value, bool)
  else:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and lo is not None:
    ok = value > lo if lo_open else value >= lo
  if ok and hi is not None:
    ok = value < hi if hi_open else value <= hi
  if not ok:
    raise error(f"{name}={value!r}; allowed values: {allowed}{' ' + note if note else ''}")
