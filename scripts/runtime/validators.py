"""Validators of the settings a user types: each takes ``(value, name)`` and returns the value as the code uses it
(``'false'`` → ``False``, ``'[16,32]'`` → ``[16, 32]``), or raises a :class:`UserError` naming the setting."""

import ast
import difflib
from pathlib import Path

import numpy as np
from scripts.data.geometry import as_shape
from scripts.runtime.errors import UserError

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


def as_bool(value, name):
    """``value`` as a bool: True/False, 1/0, or true/false/yes/no/1/0 in any case; anything else is refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise UserError(f"{name}: expected true or false (also True/False, yes/no, 1/0), got {value!r}")


def closest(name, known):
    """`` did you mean X?`` for the known name closest to ``name``, or an empty string."""
    match = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


# ---------------------------------------------------------------------------------------------------- validators
# Each takes (value, name) and returns the value as the code uses it, or raises a UserError naming the setting.


def flag(value, name):
    return as_bool(value, name)


def integer(lo=None, optional=False):
    def check(value, name):
        if value is None and optional:
            return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            if not (isinstance(value, float) and value.is_integer()):
                raise UserError(f"{name}: expected an integer{_at_least(lo)}, got {value!r}")
        if lo is not None and value < lo:
            raise UserError(f"{name}: must be {lo} or more, got {value!r}")
        return int(value)

    return check


def number(lo=None, hi=None, above=False, optional=False):
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``above``)."""

    def check(value, name):
        if value is None and optional:
            return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise UserError(f"{name}: expected a number, got {value!r}")
        if not np.isfinite(value):
            raise UserError(f"{name}: expected a finite number, got {value!r}")
        if lo is not None and (value <= lo if above else value < lo):
            raise UserError(f"{name}: must be {'more than' if above else 'at least'} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise UserError(f"{name}: must be at most {hi}, got {value!r}")
        return value

    return check


def choice(*options, optional=False, ignore_case=False):
    def check(value, name):
        if value is None and optional:
            return None
        if ignore_case and isinstance(value, str):
            value = next((o for o in options if o.lower() == value.lower()), value)
        if value not in options:
            raise UserError(
                f"{name}: expected one of {', '.join(map(str, options))}, got {value!r}{closest(value, options)}"
            )
        return value

    return check


def list_of(item, at_least=1, optional=False):
    def check(value, name):
        if value is None and optional:
            return None
        if isinstance(value, str) and value.strip()[:1] == "[" and value.strip()[-1:] == "]":
            value = [literal(v.strip()) for v in value.strip()[1:-1].split(",") if v.strip()]  # [false,true]
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) < at_least:
            raise UserError(f"{name}: expected a list such as [16, 32, 32], got {value!r}")
        return [item(v, name) for v in value]

    return check


def subset(*options):
    def check(value, name):
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if not values or any(v not in options for v in values):
            raise UserError(f"{name}: expected a list of {', '.join(options)}, got {value!r}")
        return values

    return check


def voxel_size(value, name):
    as_shape(value, name)
    return value


def optional_voxel_size(value, name):
    return None if value is None else voxel_size(value, name)


def device(value, name):
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise UserError(f"{name}: expected cpu, cuda or cuda:N, got {value!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{name}: {value} was asked for, but this torch ({torch.__version__}) sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{name}: {value} was asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{name}: expected cpu, cuda or cuda:N, got {value!r}")
    return dev


def existing_file(optional=False):
    def check(value, name):
        if value is None and optional:
            return None
        if not isinstance(value, (str, Path)) or not Path(value).is_file():
            raise UserError(f"{value}: {name} names no such file")
        return str(value)

    return check


def _at_least(lo):
    return "" if lo is None else f" of {lo} or more"


def literal(text):
    """A command-line string read as the Python value it spells (``'[16,32]'``, ``'False'``), else as it is."""
    try:
        return ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError):
        return text
