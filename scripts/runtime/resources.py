"""This machine's memory and disk, and refusals of work that would not fit them (with both figures)."""

import os
import shutil
from pathlib import Path

from scripts.runtime.errors import UserError


def physical_memory_bytes():
    """This machine's memory (the GPU's when training there is not asked here), or ``None`` where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed_bytes, what, hint):
    """Refuse ``what`` when ``needed_bytes`` exceed this machine's memory, with both figures."""
    total = physical_memory_bytes()
    if total is not None and needed_bytes > total:
        raise UserError(
            f"{what} needs about {_size(needed_bytes)} (estimated), but this machine has {_size(total)}; {hint}"
        )


def free_disk_bytes(folder):
    """Free bytes on the filesystem ``folder`` is (or will be) on: that of its nearest existing parent."""
    existing = next(p for p in [Path(folder).absolute(), *Path(folder).absolute().parents] if p.exists())
    return shutil.disk_usage(existing).free


def check_disk(needed_bytes, folder, what, hint):
    """Refuse ``what`` when ``needed_bytes`` exceed the free space of ``folder``'s filesystem, with both figures."""
    free = free_disk_bytes(folder)
    if needed_bytes > free:
        raise UserError(
            f"{what} needs about {_size(needed_bytes)} on disk (estimated), but {folder} has {_size(free)} free; {hint}"
        )


def round_down(n):
    """``n`` rounded down to two significant digits (a count to suggest in a message)."""
    n = max(0, int(n))
    scale = 10 ** max(0, len(str(n)) - 2)
    return n // scale * scale


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024
