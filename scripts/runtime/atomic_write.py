"""Write files so that a crash, a kill or a full disk never leaves a half-written file in place."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from scripts.runtime.errors import UserError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on error it is removed.

    A failed write (a full disk, no permission) becomes a :class:`UserError` naming ``path``; whatever was at
    ``path`` before is untouched.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: could not write ({e.strerror or e})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; written files get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: could not write ({e.strerror or e}); any previous file there is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
