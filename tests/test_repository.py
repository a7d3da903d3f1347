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


def test_no_shipped_file_names_a_path_of_the_machine_that_made_it():
    """Metadata that ships (weights' settings, configs, the download list) holds no absolute path of a build machine:
    the training data's file is recorded by name only."""
    shipped = [*(ROOT / "models").glob("*.json"), *(ROOT / "configs").glob("*.json"), ROOT / "large_files.yml"]
    machine_path = re.compile(r'"(/(?:tmp|home|root|work|Users|mnt|media|data|scratch|private)/[^"]*)"')  # a value
    found = {p.name: machine_path.findall(p.read_text()) for p in shipped}
    assert {name: paths for name, paths in found.items() if paths} == {}


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
