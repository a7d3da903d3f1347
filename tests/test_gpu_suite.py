"""The GPU suite's smoke run (``--quick``) on whatever device there is: every section runs and lands in the table."""

import re
import subprocess
import sys

from conftest import ROOT


def test_gpu_suite_quick_runs_every_section(tmp_path):
    out = tmp_path / "suite.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--quick", "--output", str(out), "--tmpdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    table = out.read_text()
    assert re.search(r"^Device: .*torch \d", table, re.M)
    for section in (
        "stage 1 step",
        "stage 2 step",
        "fine-stage step",
        "large-field decode",
        "large field",
        "conversion",
    ):
        row = re.search(rf"^\| {section} \| .* \| ([0-9.e+-]+) \| ", table, re.M)
        assert row and float(row.group(1)) > 0, section
    assert len(re.findall(r"^\| sampling \| (RFlow|DDIM|DDPM)-\d+", table, re.M)) == 3
