import re
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
