"""How a run ends when the user is the cause: one clear line naming the file or setting, and a non-zero exit.

- :class:`UserError`: a bad file, key, shape, config value or missing checkpoint (exit 2 from the fire command
  lines, 1 from ``python -m monai.bundle run``, whose exit status is MONAI's).
- :class:`Interrupted`: Ctrl-C (SIGINT, exit 130) or SIGTERM (exit 143), with what was kept intact.
"""

import logging
import os
import re
import signal
import sys
import threading
import traceback


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


def _kinds(kind):
    """``kind`` and its subclasses, as a traceback names them (``scripts.runtime.errors.UserError``, ``UserError``)."""
    names = {kind.__qualname__, f"{kind.__module__}.{kind.__qualname__}"}
    for sub in kind.__subclasses__():
        names |= _kinds(sub)
    return names


def user_error_message(exc):
    """The message of the :class:`UserError` behind ``exc``, or ``None``.

    Frameworks wrap exceptions: the UserError is then found among the causes. A data-loader worker cannot send its
    exception across: torch re-raises the worker's outermost exception type (for MONAI's transforms a
    ``RuntimeError``) with the worker's whole traceback as its message, where the UserError is one line,
    ``scripts.runtime.errors.UserError: <message>``.
    """
    names = _kinds(UserError)
    while exc is not None:
        text = str(exc)
        if isinstance(exc, UserError) and "\nOriginal Traceback" not in text:
            return text
        for line in text.splitlines():
            name, sep, message = line.partition(": ")
            if sep and name in names:
                return message
        exc = exc.__cause__ or exc.__context__
    return None


_BEFORE_HARD_EXIT = []


def before_hard_exit(func):
    """Also run ``func`` when an interrupt ends a run through ``os._exit``, which skips the ``atexit`` hooks (the
    output folders register the release of the folders they hold)."""
    if func not in _BEFORE_HARD_EXIT:
        _BEFORE_HARD_EXIT.append(func)


def _one_line_excepthook(exc_type, exc, tb):
    """Print a :class:`UserError` or an interrupt (also when a framework wrapped it in another exception) in a line."""
    stop = _cause(exc, KeyboardInterrupt)
    if stop is not None:
        stop = stop if isinstance(stop, Interrupted) else interrupted(stop, "")
        print(f"error: {stop}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        for release in _BEFORE_HARD_EXIT:  # os._exit skips atexit's hooks
            release()
        os._exit(stop.exit_status)  # MONAI's CLI owns the exit status otherwise; files were closed while unwinding
    message = user_error_message(exc) or _bundle_command_message(exc, tb)
    if message is None:
        return sys.__excepthook__(exc_type, exc, tb)
    print(f"error: {message}", file=sys.stderr)


def _bundle_command_message(exc, tb):
    """One line for an export target that cannot be written: MONAI's ``ckpt_export`` saves the TorchScript file
    after the bundle's code has run, and torch names neither the file nor an ``OSError``. ``None`` for anything
    else, which keeps its traceback. (A wrong ``--net_id`` or a missing ``--ckpt_file`` is refused by MONAI before
    any of the bundle's code is imported: those keep MONAI's traceback, whose last line names them.)"""
    written = re.search(r"open file failed with strerror: (.*)", str(exc))
    in_monai_bundle = any(f"monai{os.sep}bundle{os.sep}" in f.f_code.co_filename for f, _ in traceback.walk_tb(tb))
    if isinstance(exc, RuntimeError) and written and in_monai_bundle:
        return f"--filepath: could not write the exported file ({written[1].strip()})"
    return None


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_excepthook():
    """Make uncaught user errors and interrupts print one line (used by ``python -m monai.bundle run``, whose CLI we
    do not own), and make SIGTERM unwind like Ctrl-C, so temporary files and staging folders are removed."""
    sys.excepthook = _one_line_excepthook
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupted)
