"""The benchmarks the model card cites and no other test runs, in their ``--quick`` form: each runs on the CPU and
prints its table with the reference row beside ours (a benchmark that no longer runs would leave its figures
unreproducible)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

QUICK = {  # benchmark: a cell its table prints only when the reference was measured beside ours
    "benchmark_metrics.py": "1.00× (baseline)",
    "benchmark_autoencoder.py": "1.00× (baseline)",
    "benchmark_convert.py": "1.00×",
    "benchmark_diffusion.py": "1.00× (baseline)",
    "benchmark_sampling.py": "1.00× (baseline)",
    "benchmark_refiner.py": "| case | reference | ours | ratio |",
}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_quick_prints_ours_beside_the_reference(name):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, f"benchmarks/{name}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "quick" in result.stdout.lower()  # the header says the figures are a smoke check
    assert QUICK[name] in result.stdout
