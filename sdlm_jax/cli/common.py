"""What the command-line entry points share: common flags, quiet logs, and `run_main`.

`run_main(main, prog)` runs `main` under absl so that bad input reads as one line:
  PROG: error: MESSAGE        (on stderr, exit status 2)
for a library `UserInputError` (a config field out of range, a flag value, a missing run
directory, an unreadable data file), a config file that does not load, an unknown
`--config.*` override, a flag absl cannot parse, and a usage error. `--debug` (or the
environment variable SDLM_DEBUG=1) raises it with its full traceback instead. Any other
exception is a bug and keeps its traceback.

It also makes `--help` list every flag of the command with its default: absl lists the key
flags of the main module, and a console script's main module is its generated wrapper, not
the module that defines the flags.
"""

import argparse
import functools
import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from sdlm_jax import config_files
from sdlm_jax.errors import UserInputError

FLAGS = flags.FLAGS
DEBUG_ENV = "SDLM_DEBUG"

_DEBUG = flags.DEFINE_bool("debug", False, f"Show the full traceback of an input error instead of one line "
                           f"(also {DEBUG_ENV}=1).")
_config_default = None  # set by define_config: the config file used when --config is not given


def define_workdir(default=None, required=False):
  return flags.DEFINE_string("workdir", default, "Run directory: checkpoints, metrics, config.", required=required)


def define_config(default: str | None = None):
  """The --config FILE[:ARG] flag (with --config.a.b=v overrides); `default` is used when it is absent.

  The default is not loaded when the flag is defined (ml_collections would load it, and fail
  on a bad override, while the module is still being imported); run_main passes it on the
  command line instead.
  """
  global _config_default
  holder = config_flags.DEFINE_config_file("config", None, "Config file[:arg]; override fields with "
                                           "--config.a.b=value.", lock_config=True)
  _config_default = default
  FLAGS["config"].default_as_str = None if default is None else repr(default)  # what --help shows
  return holder


def apply_flags(section: ml_collections.ConfigDict, **values):
  """Sets each field of `section` whose flag was given (not None): flags override the run's config."""
  for name, value in values.items():
    if value is not None:
      section[name] = value


def quiet_logs():
  """orbax and grain log every checkpoint operation at INFO; keep the console readable."""
  logging.set_verbosity(logging.WARNING)


def debug_requested(argv=()) -> bool:
  """--debug or SDLM_DEBUG=1 (argv is read too, for errors raised while the flags are parsed)."""
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return True
  if FLAGS.is_parsed():
    return _DEBUG.value
  return any(a in ("--debug", "-debug", "--debug=true", "--debug=1", "--debug=True") for a in argv)


def fail(prog: str, message: str):
  """Prints `PROG: error: MESSAGE` as one line on stderr and exits with status 2."""
  one_line = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  sys.stderr.write(f"{prog}: error: {one_line}\n")
  sys.stderr.flush()
  sys.exit(2)


def _names_config(args) -> bool:
  return any(re.match(r"^--?config(=|$)", a) for a in args)


def _config_argument(argv) -> str | None:
  """The value given to --config on the command line, if any."""
  for i, a in enumerate(argv):
    if re.match(r"^--?config=", a):
      return a.split("=", 1)[1]
    if re.match(r"^--?config$", a) and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(config, argv) -> str | None:
  """A message for the first --config.a.b override that names no field of `config`."""
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    error = config_files.field_error(config, match.group(1))
    if error:
      return f"--config.{match.group(1)}: {error}"
  return None


def _flag_error_message(err: Exception, argv) -> str:
  """One line saying which flag or config file is wrong, for an error raised while parsing flags."""
  config_arg = _config_argument(argv)
  if config_arg is not None:
    path = config_arg.split(":", 1)[0]
    if not os.path.isfile(path):
      return f"--config={config_arg}: no such config file {path!r}"
    try:
      unknown = _unknown_override(ConfigFileFlagParser("config").parse(config_arg), argv)
    except Exception:  # pylint: disable=broad-except  # the file itself does not load: reported below
      unknown = None
    if unknown:
      return unknown
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  if len(lines) == 1:
    return lines[0]
  last = lines[-1] if lines else type(err).__name__  # a config file's traceback ends with its own error
  return last if config_arg is None else f"--config={config_arg}: {last}"


def _parse_flags(prog, argv):
  """absl's flag parsing, with the default config filled in and every failure as one line."""
  if _config_default is not None and not _names_config(argv[1:]):
    argv = [argv[0], f"--config={_config_default}", *argv[1:]]
    sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
  try:
    rest = FLAGS(argv)
    if "config" in FLAGS and FLAGS["config"].value is not None:
      FLAGS["config"].value.keys()  # a file that failed to load raises here rather than at first use
    return rest
  except Exception as err:  # pylint: disable=broad-except  # everything here is the command line's fault
    if debug_requested(argv):
      raise
    fail(prog, _flag_error_message(err, argv))


def _guarded(main, prog, argv):
  try:
    return main(argv)
  except (UserInputError, app.UsageError) as err:
    if debug_requested():
      raise
    fail(prog, str(err))


def _adopt_key_flags(module_name: str):
  """Makes the flags of the defining module and of this one key flags of the running script."""
  for name in (module_name, __name__):
    for flag in FLAGS.get_key_flags_for_module(name):
      FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run_main(main, prog: str):
  """app.run(main) with one-line input errors and a complete --help (see the module docstring)."""
  module = sys.modules[main.__module__]
  _adopt_key_flags(module.__name__)
  script = sys.modules["__main__"]
  if not script.__doc__:  # --help starts with the main module's docstring: the usage examples
    script.__doc__ = module.__doc__
  app.run(functools.partial(_guarded, main, prog), flags_parser=functools.partial(_parse_flags, prog))


class OneLineArgumentParser(argparse.ArgumentParser):
  """argparse for the commands without config flags: a usage error is `PROG: error: MESSAGE`,
  one line on stderr, exit status 2."""

  def error(self, message):
    fail(self.prog, message)
