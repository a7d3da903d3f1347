"""Output folders: an earlier run's files are never replaced unless asked, never half replaced, never mixed.

A run that writes a set of files (a conversion, samples, an evaluation) writes them into a hidden staging folder
*inside* the output folder (so on the output's own filesystem, also when that is a mount point). Only when every
file is complete, a journal (``commit.json``) is written and the earlier run's files (those its manifest lists)
are moved aside and the new ones moved in, by renames; then ``.manifest.json`` lists the new files. A run killed
before the journal leaves the earlier files untouched and its staging folder is removed at the next start; one
killed after it is completed at the next start. Files the bundle did not write are never touched.

One folder, one run: a run holds its output folder (:func:`hold_folder`, an exclusive ``flock`` on ``.lock`` in it)
while it writes there, and a second run into the same folder is refused. The kernel drops the lock when the holder
dies, however it dies, so a lock file that a killed run left behind is simply taken over.
"""

import atexit
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from scripts.runtime.atomic_write import atomic_path
from scripts.runtime.errors import UserError, before_hard_exit

logger = logging.getLogger(__name__)
MANIFEST = ".manifest.json"
STAGING = ".staging-"
LOCK = ".lock"


def check_writable(path, name):
    """Refuse ``path`` (a folder to be written, maybe not yet there) when it is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {name} exists and is not a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: {name} cannot be written ({existing} is read-only for this user)")
    return path


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Hold:
    """This process's hold on a folder: the open lock file, how many holds share it, the folders it created."""

    def __init__(self, fd, path, created):
        self.fd, self.path, self.created, self.count, self.pid = fd, path, created, 1, os.getpid()


_held = {}  # real path of a folder -> _Hold: a process never refuses itself (flock is per open file description)
_live_staging = set()  # staging folders of this process's runs in progress


def _holder(fd):
    """``pid 1234: <command line>`` from a lock file, or ``None`` while its holder has not yet written it."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        command = " ".join(holder["command"]).replace("\n", " ")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return f"pid {holder['pid']}: {command[:77] + '…' if len(command) > 80 else command}"


def hold_folder(folder, name="output_dir"):
    """Hold ``folder`` (created when missing) for this run, or refuse: a second run into it is refused in one line
    naming the other run, which is waited for only while it is still writing its pid (a second or two at most).

    Holds taken again by the same process are counted; :func:`release_folder` undoes one. The lock file is removed
    and folders this hold created are removed when empty, also when the process exits without releasing.
    """
    key = os.path.realpath(folder)
    if key in _held:
        _held[key].count += 1
        return
    folder, path = Path(folder), Path(key) / LOCK
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    deadline = time.monotonic() + 2.0
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a run that just released it: create it again
            continue
        except OSError as e:  # e.g. a lock file another user's killed run left
            _remove_empty(created)
            raise UserError(f"{path}: cannot be opened to hold {folder} ({e.strerror}); move it away") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if holder is None and time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            _remove_empty(created)
            raise UserError(
                f"{folder}: in use by another run ({holder or 'pid unknown'}); wait for it to finish or choose "
                f"another --{name.lstrip('-')}"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder released and removed it between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    command = [Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command}).encode(), 0)
    if not _held:
        atexit.register(release_held_folders)
        before_hard_exit(release_held_folders)
    _held[key] = _Hold(fd, path, created)


def release_folder(folder):
    """Undo one :func:`hold_folder` of this process (nothing when it holds none): the last removes the lock file."""
    key = os.path.realpath(folder)
    hold = _held.get(key)
    if hold is None:
        return
    hold.count -= 1
    if hold.count == 0:
        del _held[key]
        if hold.pid != os.getpid():  # a forked child (a pool worker): the lock and its file are its parent's
            return
        Path(hold.path).unlink(missing_ok=True)  # while still locked: a run waiting on this file then sees it gone
        os.close(hold.fd)
        _remove_empty(hold.created)


def release_held_folders():
    """Release every folder this process holds (at exit; the kernel would drop the locks, not remove the files)."""
    for key in list(_held):
        _held[key].count = 1
        release_folder(key)


@contextmanager
def holding_folder(folder, name="output_dir"):
    """Hold ``folder`` for the ``with`` block."""
    hold_folder(folder, name)
    try:
        yield
    finally:
        release_folder(folder)


def _remove_empty(folders):
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's lock file, the run's files) or already gone
            return


class StagedOutput:
    """Stage one run's files for ``output_dir`` and swap them in when complete (see the module docstring).

    Args:
        output_dir: the folder the files belong in.
        what: what the files are, for messages ('samples', 'a conversion', 'an evaluation').
        patterns: glob patterns (relative to ``output_dir``) of the files this kind of run writes, used for folders
            written before manifests existed.
        overwrite: replace an earlier run's files; otherwise an output folder that holds any is refused.
        name: the setting that names the folder, for messages.
    """

    def __init__(self, output_dir, what, patterns, overwrite=False, name="output_dir"):
        self.output_dir, self.what, self.patterns = Path(output_dir), what, tuple(patterns)
        self.overwrite, self.name = overwrite, name
        self.staging = None

    def existing(self):
        """The earlier run's files in ``output_dir``, relative paths."""
        listed = listed_files(self.output_dir)
        if listed is not None:
            return [f for f in listed if (self.output_dir / f).exists()]
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in sorted(self.output_dir.rglob("*")):
            rel = path.relative_to(self.output_dir).as_posix()
            if not rel.startswith(STAGING) and path.is_file() and any(fnmatch.fnmatch(rel, p) for p in self.patterns):
                found.append(rel)
        return found

    def check(self):
        """Refuse before any work: a folder that is a file or read-only, that another run is writing, or that holds
        an earlier run's files. Creates nothing: the folder is held only while the files are written."""
        check_writable(self.output_dir, self.name)
        if not self.output_dir.is_dir():
            return []
        with holding_folder(self.output_dir, self.name):
            return self._check_held()

    def _check_held(self):
        recover_stale_staging(self.output_dir)
        old = self.existing()
        if old and not self.overwrite:
            shown = ", ".join(old[:3]) + (f", … ({len(old)} files)" if len(old) > 3 else "")
            raise UserError(
                f"{self.output_dir}: already holds {self.what} ({shown}); pass --overwrite true to replace them "
                "(only the bundle's own files)"
            )
        return old

    def __enter__(self):
        check_writable(self.output_dir, self.name)
        hold_folder(self.output_dir, self.name)  # until __exit__; creates the folder (removed again if left empty)
        try:
            self._check_held()  # again: another run may have finished into the folder since check()
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=self.output_dir))
            _live_staging.add(self.staging.resolve())
            (self.staging / "new").mkdir()
        except BaseException:
            self._end()
            raise
        return self.staging / "new"

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                journal = {"new": _files(self.staging / "new"), "old": self.existing()}
                (self.staging / "commit.json").write_text(json.dumps(journal))
                try:
                    _swap(self.output_dir, self.staging)
                except BaseException:  # a rename failed or the run was interrupted while swapping: undo it
                    _roll_back(self.output_dir, self.staging)
                    raise
                _finish(self.output_dir, self.staging)
        finally:
            self._end()
        return False

    def _end(self):
        """Staging removed (when still there) and the folder released (removed when this run created it and it is
        empty)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            _live_staging.discard(self.staging.resolve())
            self.staging = None
        release_folder(self.output_dir)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _swap(output_dir, staging):
    """The journalled swap: earlier files aside, new files in (repeatable: a resumed swap skips what is done)."""
    journal = json.loads((staging / "commit.json").read_text())
    new = set(journal["new"])
    for rel in journal["old"]:
        moved_in = rel in new and not (staging / "new" / rel).exists()  # already the new file (a resumed swap)
        if (output_dir / rel).is_file() and not moved_in:
            (staging / "old" / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(output_dir / rel, staging / "old" / rel)
    for rel in journal["new"]:
        src = staging / "new" / rel
        if src.exists():
            (output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, output_dir / rel)


def _finish(output_dir, staging):
    """After a swap: the manifest of the new files, folders left empty by the earlier run removed, staging removed."""
    journal = json.loads((staging / "commit.json").read_text())
    with atomic_path(output_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"files": journal["new"]}, indent=1) + "\n")
    for rel in journal["old"]:  # folders the earlier run had and this one does not, when nothing else is in them
        parent = (output_dir / rel).parent
        while parent != output_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    shutil.rmtree(staging, ignore_errors=True)


def _roll_back(output_dir, staging):
    """Undo a swap that failed half-way: new files back to staging, earlier files back in place, staging removed."""
    journal = json.loads((staging / "commit.json").read_text())
    for rel in journal["new"]:
        if (output_dir / rel).is_file() and not (staging / "new" / rel).exists():
            os.replace(output_dir / rel, staging / "new" / rel)
    for rel in journal["old"]:
        if (staging / "old" / rel).is_file():
            (output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "old" / rel, output_dir / rel)
    shutil.rmtree(staging, ignore_errors=True)


def recover_stale_staging(output_dir):
    """Staging folders of runs that are no longer running: completed when journalled, removed otherwise."""
    for staging in Path(output_dir).glob(f"{STAGING}*"):
        try:
            pid = int(staging.name[len(STAGING) :].split("-")[0])
        except ValueError:
            continue
        if staging.resolve() in _live_staging or (_alive(pid) and pid != os.getpid()):
            continue
        if (staging / "commit.json").is_file():
            logger.warning(f"{staging}: completing the swap of a run that was stopped while swapping its files in")
            _swap(Path(output_dir), staging)
            _finish(Path(output_dir), staging)
        else:
            logger.warning(f"{staging}: removing the staging folder of a run that did not finish (pid {pid})")
            shutil.rmtree(staging, ignore_errors=True)


CHECKPOINT_NAMES = ("best_model.pt", "latest_checkpoint.pt")


def check_training_outputs(ckpt_dir, log_dir, resume_from=None, overwrite=False):
    """Start-up check of a training run's folders: writable, no other run writing ``ckpt_dir``, and no earlier
    run's checkpoints in it unless this run resumes (``resume_from``) or replaces them (``overwrite``).

    From here on the run holds ``ckpt_dir`` (:func:`hold_folder`) until :func:`release_folder` (the configs'
    ``finalize``) or its exit, so it is the last start-up check. Under torch.distributed rank 0 holds it for all
    ranks, and every rank raises rank 0's refusal.
    """
    import torch.distributed as dist

    check_writable(ckpt_dir, "ckpt_dir")
    check_writable(log_dir, "log_dir")
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        _hold_training_outputs(ckpt_dir, resume_from, overwrite)
        return
    problem = [None]
    if dist.get_rank() == 0:
        try:
            _hold_training_outputs(ckpt_dir, resume_from, overwrite)
        except UserError as e:
            problem = [str(e)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise UserError(problem[0])


def _hold_training_outputs(ckpt_dir, resume_from, overwrite):
    hold_folder(ckpt_dir, "ckpt_dir")
    held = [name for name in CHECKPOINT_NAMES if (Path(ckpt_dir) / name).exists()]
    if held and not resume_from and not overwrite:
        release_folder(ckpt_dir)
        raise UserError(
            f"{ckpt_dir}: already holds {' and '.join(held)} of an earlier run; resume it with --resume_from "
            f"{Path(ckpt_dir) / 'latest_checkpoint.pt'} (and a larger --n_epochs), replace it with --overwrite true, "
            "or choose another --ckpt_dir"
        )


def listed_files(folder):
    """The files the manifest of ``folder`` lists (one run's), or ``None`` when it has no manifest."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return list(json.loads(manifest.read_text())["files"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest}: unreadable manifest; move it away") from None
