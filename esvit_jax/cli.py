"""What the command-line tools share: a user's mistake ends them with its message and exit code 2.

    if __name__ == "__main__":                        # an argparse tool: main(argv) parses argv itself
      cli.run(main)
    if __name__ == "__main__":                        # an absl tool
      app.run(cli.exit_on_user_error(main), flags_parser=cli.parse_flags)

esvit_jax.errors.UserError (a bad config value, an unknown name, a missing dataset or checkpoint) is printed
alone on stderr, without a traceback, since the traceback would only point into our code while the fix is
in the user's command. Every other exception is a bug and keeps its traceback. Exit code 2 is the one
argparse and absl already use for a bad command line.
"""

from collections.abc import Callable, Sequence
import functools
import sys
from typing import NoReturn, TypeVar

from absl import flags

from esvit_jax import errors

USER_ERROR_EXIT_CODE = 2
R = TypeVar("R")


def fail(message: object) -> NoReturn:
  """Ends the process as a user's mistake: the message alone on stderr, exit code 2.

  Args:
    message: what went wrong and what to change (an exception prints its message).

  Raises:
    SystemExit: always, with USER_ERROR_EXIT_CODE.
  """
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


def exit_on_user_error(main: Callable[..., R]) -> Callable[..., R]:
  """Wraps a tool's main function so that a UserError ends the process through `fail`.

  Args:
    main: the tool's entry point; any arguments are passed through.

  Returns:
    The wrapped function; other exceptions propagate unchanged, with their tracebacks.
  """

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> R:
    try:
      return main(*args, **kwargs)
    except errors.UserError as e:
      fail(e)

  return wrapped


def run(main: Callable[[Sequence[str] | None], R], argv: Sequence[str] | None = None) -> R:
  """Runs an argparse tool's `main(argv)` with user errors ending the process cleanly.

  Args:
    main: the tool's entry point, which parses `argv` (None: sys.argv[1:]).
    argv: the command-line arguments.

  Returns:
    What main returns.
  """
  return exit_on_user_error(main)(argv)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for app.run(flags_parser=...): a bad flag or config file is a user error.

  absl's default parser exits with 1; this one exits with 2 like every other user error. A UserError raised
  by a config file's get_config reaches here wrapped twice (by ml_collections, with a formatted traceback,
  then by absl): its own message is printed instead. An override of a field the config lacks
  (--config.no_such_field=1) surfaces from ml_collections as a bare AttributeError or KeyError naming the
  field; it is a user error only when that name is part of an override on the command line.

  Args:
    argv: the full command line, program name first.

  Returns:
    The arguments left after the flags, program name first.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    user_error, link = None, e
    while link is not None:  # The innermost UserError of the chain is the one the config file raised.
      user_error = link if isinstance(link, errors.UserError) else user_error
      link = link.__cause__ or link.__context__
    fail(user_error or f"{e}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:
    override = unknown_config_override(argv, e)
    if override is None:
      raise
    fail(f"--{override}: the config has no field {missing_name(e)!r}; check its spelling in the config file.")


def missing_name(error: AttributeError | KeyError) -> str:
  """The field name of ml_collections' AttributeError / KeyError, whose message is the quoted name.

  Args:
    error: what ml_collections raised for a missing field.

  Returns:
    The name without its quotes ('' when the error has no arguments).
  """
  return str(error.args[0] if error.args else "").strip("'\"")


def unknown_config_override(argv: Sequence[str], error: AttributeError | KeyError) -> str | None:
  """The `--config.a.b=v` override of argv whose path holds the field that `error` says is missing.

  Args:
    argv: the full command line, program name first.
    error: what parsing the flags raised.

  Returns:
    The override without dashes or value ('config.a.b'), or None: then the error is not about an override.
  """
  for arg in argv[1:]:
    override = arg.lstrip("-").split("=", 1)[0]
    flag, _, path = override.partition(".")
    if path and flag in flags.FLAGS and missing_name(error) in path.split("."):
      return override
  return None
