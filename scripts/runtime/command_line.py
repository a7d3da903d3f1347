"""The fire command lines of ``scripts/*.py``, checked before any work: unknown flags are refused (naming the
closest one), switches accept true/false/yes/no/1/0 in any case, and errors and interrupts end in one line.

fire would call the function with the flags it knows and only then complain about the others, after the work
was done; and it hands ``--overwrite false`` over as the string ``'false'``.
"""

import inspect
import sys
from functools import wraps

from scripts.runtime.errors import UserError, exit_on_user_error, install_excepthook
from scripts.runtime.validators import as_bool, closest

FIRE_FLAGS = ("help", "h")


def flag_names(argv):
    """The flag names in a fire command line (``--name value``, ``--name=value``, ``--no-name``), as identifiers;
    everything after a bare ``--`` belongs to fire itself."""
    names = []
    for token in argv:
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            names.append(token[2:].split("=", 1)[0].replace("-", "_"))
    return names


def check_flags(func, argv, extra=()):
    """Refuse a flag that ``func`` does not take (or ``extra`` does not list), before anything runs."""
    params = inspect.signature(func).parameters
    known = [p for p, v in params.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)] + list(extra)
    switches = [p for p, v in params.items() if isinstance(v.default, bool)]
    for name in flag_names(argv):
        if name in known or name in FIRE_FLAGS or (name.startswith("no") and name[2:].lstrip("_") in switches):
            continue
        raise UserError(f"--{name}: unknown option{closest(name, known)} (options: --{', --'.join(known)})")


def with_switches(func):
    """``func`` with every argument whose default is a bool parsed by :func:`scripts.runtime.validators.as_bool` first."""
    signature = inspect.signature(func)
    switches = [p for p, v in signature.parameters.items() if isinstance(v.default, bool)]

    @wraps(func)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)  # fire passes named flags positionally
        for name in switches:
            if name in bound.arguments:
                bound.arguments[name] = as_bool(bound.arguments[name], f"--{name}")
        return func(*bound.args, **bound.kwargs)

    return wrapper


def main(func, extra_flags=()):
    """Run ``func`` as a fire command line with the checks above; user errors exit 2, interrupts 130/143."""
    import fire

    install_excepthook()
    exit_on_user_error(check_flags)(func, sys.argv[1:], extra_flags)
    fire.Fire(exit_on_user_error(with_switches(func)), name=sys.argv[0])
