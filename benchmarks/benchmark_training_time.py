"""Benchmark what training time buys: the demo recipe run end to end with every stage's epochs scaled, and the
metric table of each run against the issue's targets.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_training_time.py [--scales 1,2,4] [--quick]

Each run is ``scripts/run_demo.py`` (simulated microtubules, 100 fresh test clouds, 100 samples) with the
autoencoder, diffusion and fine-stage epochs multiplied by the scale; the reported minutes are the run's wall time
(pip not included). Targets (the fine-stage and speed targets have their own benchmark, benchmark_refiner.py):
NN-distance W1 <= 3 nm, z W1 <= 10 nm, foreground fraction and structure statistics within 10 % of the held-out
set, 1-NNA-CD and COV-CD within 10 points of the train-vs-test floor, MMD-CD and 1-NNA-CD below the mean-grid
baseline's.
"""

import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402

# isort: split
import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts import run_demo  # noqa: E402

QUICK = {"scales": [1], "epochs": (2, 10, 2), "n_clouds": 16, "n_test": 8}  # every stage validates


def targets(rows):
    """Each target: (name, value, goal, met)."""
    s, floor, base = rows["samples"], rows["train_vs_heldout"], rows["mean_grid_baseline"]

    def rel(key, field="mean"):
        return abs(s[key][field] - s[key]["reference_" + field]) / abs(s[key]["reference_" + field])

    checks = [
        ("NN W1 (nm)", s["nn_distance_nm"]["wasserstein"], "≤ 3", s["nn_distance_nm"]["wasserstein"] <= 3),
        ("z W1 (nm)", s["z_nm"]["wasserstein"], "≤ 10", s["z_nm"]["wasserstein"] <= 10),
        ("foreground, rel. diff.", rel("foreground_fraction"), "≤ 0.10", rel("foreground_fraction") <= 0.1),
        ("linearity, rel. diff.", rel("linearity"), "≤ 0.10", rel("linearity") <= 0.1),
        ("planarity, rel. diff.", rel("planarity"), "≤ 0.10", rel("planarity") <= 0.1),
        ("pair distance, rel. diff.", rel("pair_distance_nm"), "≤ 0.10", rel("pair_distance_nm") <= 0.1),
        (
            "1-NNA − floor (points)",
            100 * (s["cd"]["1nna"] - floor["cd"]["1nna"]),
            "≤ 10",
            100 * (s["cd"]["1nna"] - floor["cd"]["1nna"]) <= 10,
        ),
        (
            "floor COV − COV (points)",
            100 * (floor["cd"]["cov"] - s["cd"]["cov"]),
            "≤ 10",
            100 * (floor["cd"]["cov"] - s["cd"]["cov"]) <= 10,
        ),
        ("MMD-CD / baseline", s["cd"]["mmd"] / base["cd"]["mmd"], "< 1", s["cd"]["mmd"] < base["cd"]["mmd"]),
        (
            "1-NNA-CD − baseline (points)",
            100 * (s["cd"]["1nna"] - base["cd"]["1nna"]),
            "< 0",
            s["cd"]["1nna"] < base["cd"]["1nna"],
        ),
    ]
    return checks


def main():
    parser = common.arg_parser(__doc__, "one tiny run: a smoke check", tmpdir="demo runs")
    parser.add_argument("--scales", default="1,2,4", help="epoch multipliers, comma separated")
    args = parser.parse_args()
    load = common.load_average()
    base = {k: v.default for k, v in inspect.signature(run_demo.run_demo).parameters.items()}
    scales = QUICK["scales"] if args.quick else [float(s) for s in args.scales.split(",")]
    results = []
    with common.work_folder(__file__, args.tmpdir) as work:
        for scale in scales:
            if args.quick:
                epochs = QUICK["epochs"]
                extra = {"n_clouds": QUICK["n_clouds"], "n_test": QUICK["n_test"]}
            else:
                epochs = run_demo.scaled_epochs(
                    scale, *(base[k] for k in ("autoencoder_epochs", "diffusion_epochs", "refiner_epochs"))
                )
                extra = {}
            start = time.perf_counter()
            run_demo.run_demo(
                output_dir=work / f"x{scale:g}",
                autoencoder_epochs=epochs[0],
                diffusion_epochs=epochs[1],
                refiner_epochs=epochs[2],
                **extra,
            )
            minutes = (time.perf_counter() - start) / 60
            metrics = json.loads((work / f"x{scale:g}" / "outputs" / "evaluation" / "metrics.json").read_text())
            results.append((scale, epochs, minutes, targets(metrics["rows"]), run_demo.summary(metrics)))
    lines = common.machine_header(
        "Training time against the targets", args.quick, load, (torch, monai, np), torch_info=True
    )
    names = [name for name, *_ in results[0][3]]
    lines += [
        "| scale | epochs (stage 1 / 2 / fine) | minutes | " + " | ".join(names) + " |",
        "|---:|---|---:|" + "---:|" * len(names),
    ]
    for scale, epochs, minutes, checks, _ in results:
        cells = [f"{value:.3g}{' ✓' if met else ''}" for _, value, _, met in checks]
        lines.append(f"| {scale:g} | {' / '.join(map(str, epochs))} | {minutes:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Goals: " + "; ".join(f"{name} {goal}" for name, _, goal, _ in results[0][3]) + " (✓: met).", ""]
    for scale, _, _, _, table in results:
        lines += [f"### scale {scale:g}", "", table, ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
