import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def _tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        return [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    skip = {".git", ".venv", "venv", "outputs", "__pycache__"}  # not a git checkout (a downloaded bundle)
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_no_shipped_file_names_a_path_of_the_machine_that_made_it():
    """No file of the bundle (metadata, configs, docs, code, the weights' pickles) holds an absolute path of a build
    machine: the training data's file is recorded by name only."""
    machine_path = re.compile(rb"(?<![\w.~$/-])(/(?:tmp|home|root|work|Users|mnt|media|scratch|private)/[\w.+-]+)")
    windows_path = re.compile(rb"(?<![\w])([A-Z]:\\\\?[\w.-]+)")
    files = _tracked_files()
    assert any(p.name == "checkpoints.json" for p in files) and any(p.suffix == ".pt" for p in files)
    found = {}
    for path in files:
        if path.relative_to(ROOT).parts[0] == "tests" and path.parent.name == "data":
            continue  # third-party SMLM files kept as published, with their own acquisition metadata
        data = path.read_bytes()
        paths = machine_path.findall(data)
        if b"\0" not in data:  # a text file (in binary ones, two bytes can look like a drive letter)
            paths += windows_path.findall(data)
        if paths:
            found[str(path.relative_to(ROOT))] = sorted({p.decode(errors="replace") for p in paths})[:3]
    assert found == {}


def test_importing_the_bundle_changes_no_hook_or_signal_handler():
    """Importing every module of ``scripts`` (a notebook that only wants a reader) leaves the excepthook, the SIGTERM
    handler and the exit path alone; a run installs them where it starts."""
    code = (
        "import importlib, pkgutil, signal, sys, scripts\n"
        "names = [m.name for m in pkgutil.walk_packages(scripts.__path__, 'scripts.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "assert sys.excepthook is sys.__excepthook__, sys.excepthook\n"
        "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGTERM)\n"
        "print(len(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 30  # every module was imported


def test_a_run_installs_the_one_line_errors_where_it_starts():
    """The configs install the hook first thing in ``initialize`` (and the exported networks before they are
    built); the command lines in :func:`scripts.runtime.command_line.main`."""
    for config in sorted((ROOT / "configs").glob("*.json")):
        parsed = json.loads(config.read_text())
        if "initialize" in parsed:
            assert parsed["initialize"][0] == "$scripts.runtime.errors.install_excepthook()", config.name
    code = (
        "import signal, sys\n"
        "from scripts.runtime import command_line\n"
        "sys.argv = ['x', '--value', '1']\n"
        "def f(value): assert sys.excepthook is not sys.__excepthook__; "
        "assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL; print('installed')\n"
        "command_line.main(f)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "installed" in result.stdout, result.stderr
