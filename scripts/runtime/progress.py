"""Progress as bars on a terminal, and as one line per block of work in a file or a pipe, where bar redraws would
fill the log (megabytes for a demo run)."""

import sys
import time

from tqdm import tqdm


def interactive():
    """Whether progress goes to a terminal (stderr, where tqdm and ignite draw their bars)."""
    return sys.stderr.isatty()


def progress(iterable, desc, unit, total=None, lines=10, units=None):
    """``iterable`` with a tqdm bar on a terminal; elsewhere with about ``lines`` lines on stdout (errors stay alone
    on stderr), the last one at the end: ``desc: 40/100 units, 12.3 s`` (``units``: the plural, default ``unit + 's'``).
    """
    if interactive():
        yield from tqdm(iterable, desc=desc, unit=unit, total=total)
        return
    total = len(iterable) if total is None else total
    every, start = max(1, -(-total // lines)), time.perf_counter()
    for i, item in enumerate(iterable, start=1):
        yield item
        if i % every == 0 or i == total:
            print(f"{desc}: {i}/{total} {units or unit + 's'}, {time.perf_counter() - start:.1f} s", flush=True)
