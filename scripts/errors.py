"""How a run ends when the user is the cause: one clear line naming the file or setting, and a non-zero exit.

- :class:`UserError`: a bad file, key, shape, config value or missing checkpoint (exit 2 from the fire command
  lines, 1 from ``python -m monai.bundle run``, whose exit status is MONAI's).
- :class:`Interrupted`: Ctrl-C (SIGINT, exit 130) or SIGTERM (exit 143), with what was kept intact.
"""

import logging
import os
import signal
import sys
import threading


class UserError(Exception):
    """An error the user caused and can fix (bad file, key, shape, config value, missing checkpoint)."""


def fail(path, problem):
    """Raise a :class:`UserError` whose message starts with the offending file or setting."""
    raise UserError(f"{path}: {problem}")


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``note`` says what is intact (code that handles Ctrl-C handles it too)."""

    def __init__(self, signum=signal.SIGINT, note=""):
        super().__init__(signum, note)
        self.signum, self.note = signum, note

    def __str__(self):
        name = signal.Signals(self.signum).name
        return f"interrupted by {name}" + (f"; {self.note}" if self.note else "")

    @property
    def exit_status(self):
        return 128 + int(self.signum)


def interrupted(exc, note):
    """An :class:`Interrupted` for a ``KeyboardInterrupt`` (or an earlier Interrupted) with ``note`` added."""
    return Interrupted(getattr(exc, "signum", signal.SIGINT), note or getattr(exc, "note", ""))


def exit_on_user_error(func):
    """Wrap a command-line entry point: a :class:`UserError` prints one line and exits 2, an interrupt prints one
    line and exits 130 (SIGINT) or 143 (SIGTERM).

    The wrapper returns nothing, so a CLI framework (fire) does not print the function's return value.
    """
    from functools import wraps

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            func(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:
            e = e if isinstance(e, Interrupted) else interrupted(e, "")
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_status)

    return wrapper


def _cause(exc, kind):
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def _one_line_excepthook(exc_type, exc, tb):
    """Print a :class:`UserError` or an interrupt (also when a framework wrapped it in another exception) in a line."""
    stop = _cause(exc, KeyboardInterrupt)
    if stop is not None:
        stop = stop if isinstance(stop, Interrupted) else interrupted(stop, "")
        print(f"error: {stop}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(stop.exit_status)  # MONAI's CLI owns the exit status otherwise; files were closed while unwinding
    cause = _cause(exc, UserError)
    if cause is None:
        return sys.__excepthook__(exc_type, exc, tb)
    lines = [line for line in str(cause).splitlines() if line.strip()]
    # re-raised from a data-loader worker, the message carries the worker's traceback; its last line is the error
    print(f"error: {lines[-1].split('UserError: ', 1)[-1] if lines else cause}", file=sys.stderr)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_excepthook():
    """Make uncaught user errors and interrupts print one line (used by ``python -m monai.bundle run``, whose CLI we
    do not own), and make SIGTERM unwind like Ctrl-C, so temporary files and staging folders are removed."""
    sys.excepthook = _one_line_excepthook
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupted)
