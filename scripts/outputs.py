"""Output folders: an earlier run's files are never replaced unless asked, never half replaced, never mixed.

A run that writes a set of files (a conversion, samples, an evaluation) writes them into a hidden staging folder
*inside* the output folder (so on the output's own filesystem, also when that is a mount point). Only when every
file is complete, a journal (``commit.json``) is written and the earlier run's files (those its manifest lists)
are moved aside and the new ones moved in, by renames; then ``.manifest.json`` lists the new files. A run killed
before the journal leaves the earlier files untouched and its staging folder is removed at the next start; one
killed after it is completed at the next start. Files the bundle did not write are never touched.
"""

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from scripts.atomic import atomic_path
from scripts.errors import UserError

logger = logging.getLogger(__name__)
MANIFEST = ".manifest.json"
STAGING = ".staging-"


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
        """Refuse before any work: a folder that is a file or read-only, or that holds an earlier run's files."""
        check_writable(self.output_dir, self.name)
        if self.output_dir.is_dir():
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
        self.check()
        self.created = not self.output_dir.exists()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=self.output_dir))
        (self.staging / "new").mkdir()
        return self.staging / "new"

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            journal = {"new": _files(self.staging / "new"), "old": self.existing()}
            (self.staging / "commit.json").write_text(json.dumps(journal))
            try:
                _swap(self.output_dir, self.staging)
            except BaseException:  # a rename failed or the run was interrupted while swapping: undo it
                _roll_back(self.output_dir, self.staging)
                raise
            _finish(self.output_dir, self.staging)
            return False
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.created and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()
        return False


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
        if _alive(pid) and pid != os.getpid():
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
    """Start-up check of a training run's folders: writable, and no earlier run's checkpoints in ``ckpt_dir``
    unless this run resumes (``resume_from``) or replaces them (``overwrite``)."""
    check_writable(ckpt_dir, "ckpt_dir")
    check_writable(log_dir, "log_dir")
    held = [name for name in CHECKPOINT_NAMES if (Path(ckpt_dir) / name).exists()]
    if held and not resume_from and not overwrite:
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
