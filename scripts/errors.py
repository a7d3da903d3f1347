"""User-facing errors: one clear line naming the file and the problem, and a non-zero exit."""

import sys
from functools import wraps


class UserError(Exception):
    """An error the user caused and can fix (bad file, key, shape, config value, missing checkpoint)."""


def fail(path, problem):
    """Raise a :class:`UserError` whose message starts with the offending file or setting."""
    raise UserError(f"{path}: {problem}")


def exit_on_user_error(func):
    """Wrap a command-line entry point so that a :class:`UserError` prints one line and exits with status 2.

    The wrapper returns nothing, so a CLI framework (fire) does not print the function's return value.
    """

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            func(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def _one_line_excepthook(exc_type, exc, tb):
    """Print a :class:`UserError` (also when a framework wrapped it in another exception) as one line."""
    cause = exc
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return sys.__excepthook__(exc_type, exc, tb)
    print(f"error: {cause}", file=sys.stderr)


def install_excepthook():
    """Make uncaught user errors print one line (used by ``python -m monai.bundle run``, whose CLI we do not own)."""
    sys.excepthook = _one_line_excepthook
