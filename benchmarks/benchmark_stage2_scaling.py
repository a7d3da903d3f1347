"""Stage 2's scaling curve: what training steps, data and augmentation buy, scored on the samples.

Run from the bundle root; long, so in the background, into a folder that outlives the session::

    OMP_WAIT_POLICY=PASSIVE nohup python benchmarks/benchmark_stage2_scaling.py --work_dir ~/runs/scaling \
        --rows 1000:on --milestones 1000,2000,4000,8000,16000 > ~/runs/scaling.log 2>&1 &

Run it again with the same arguments to go on: a row resumes from its last milestone (``resume_from``), and
milestones already scored are read back. ``--quick`` is a smoke check (tiny rows, a few steps, 10 samples).

Every row trains stage 2 with the demo's recipe (``scripts/run_demo.py``: its UNet, batch, learning rate and
rectified flow), on the autoencoder of ``--model_dir`` (default: the shipped ``models/``, the demo's), for ``N``
simulated training clouds (``N:on`` with the flips and rotations, ``N:off`` without). ``--model_dir`` is the shipped
layout or a training one (``autoencoder/best_model.pt``, ``refiner/best_model.pt``), and the clouds are converted
into its autoencoder's box and grid (a finer autoencoder gets grids of its own voxels). 102 is the demo's own data
(128 clouds, seed 0, 80/20 split); other sizes are simulated with the demo's simulator and box, seed ``N``, with 100
validation clouds. At each milestone (optimizer steps, rounded up to whole epochs) the row samples 100 clouds through
the fine stage of ``--model_dir`` and scores them against the demo's 100 test clouds (seed 1) with
``configs/evaluate.json`` (every statistic of the model card and the realism test), keeps the renders, and checks
memorisation: each sample's Chamfer distance to its nearest training cloud, beside the test clouds' own.
"""

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
from scripts import run_demo  # noqa: E402
from scripts.networks.checkpoints import SHIPPED_INFO  # noqa: E402
from scripts.networks.trained import checkpoint_path, load_autoencoder_checkpoint  # noqa: E402
from scripts.runtime.errors import UserError  # noqa: E402

BATCH = run_demo.DIFFUSION["batch_size"]
N_VAL = 100  # validation clouds of the simulated sizes
N_SCORED = 100  # samples per milestone, and test clouds
MEMO_POINTS = 2048  # points per cloud in the memorisation check (as the set metrics)
COPY_RATIO = 1 / 3  # nearest / second-nearest training cloud below this: a copy (Carlini et al., 2023)
QUICK = {"rows": "16:on", "milestones": "4,8", "n_test": 10, "n_val": 4}
SAMPLING = common.EULER_SAMPLING  # how milestones are sampled unless --sampler says otherwise


def autoencoder_geometry(models):
    """The box and grid of ``models``' autoencoder (its checkpoint's conversion), in either layout."""
    return load_autoencoder_checkpoint(checkpoint_path(models, "autoencoder"))["dataset_info"]["geometry"]


def simulate(path, n, seed, log):
    if not path.is_file():
        run_demo.run_step(
            [sys.executable, "scripts/simulate_smlm.py", "--output", path, "--n_clouds", n, "--seed", seed], log
        )


def in_box(source, output, box_min, box_max):
    """The clouds of ``source`` clipped to the autoencoder's box (a point moves at most a fraction of a nm: that box
    is the demo data's extent), with the box's two corners added to the first cloud, so that the converter, which
    takes the box from the data, converts them into the autoencoder's box exactly."""
    from scripts.data.pointclouds import read_point_clouds, write_point_clouds_h5

    clouds, _ = read_point_clouds(source)
    clouds = [np.clip(c, box_min, box_max).astype(np.float32) for c in clouds]
    clouds[0] = np.concatenate([clouds[0], np.array([box_min, box_max], np.float32)])
    write_point_clouds_h5(output, clouds)


def training_grids(train_dir, voxel_size, n=None):
    """The first ``n`` (all: ``None``) grids of a conversion's ``train/`` folder, (N, 1, X, Y, Z) float in [0, 1],
    resized to ``voxel_size`` as the autoencoder sees them."""
    import torch
    from scripts.data.datasets import volume_transforms

    transform = volume_transforms(tuple(voxel_size))
    files = sorted(Path(train_dir).glob("*.nii.gz"))[:n]
    return torch.stack([transform({"image": str(f)})["image"] for f in files]).float()


def prepare_row(row, n_train, n_val, geometry, log):
    """Simulate and convert the row's clouds (once) into the autoencoder's box and grid (``geometry``): the demo's
    data for 102, else ``n_train`` + ``n_val`` simulated clouds."""
    dataset = row / "voxels_nifti"
    if (dataset / "dataset_info.json").is_file():
        return dataset
    clouds = row / "clouds.h5"
    if n_train == 102:
        simulate(clouds, 128, 0, log)
        ratio = 0.8
    else:
        simulate(row / "simulated.h5", n_train + n_val, n_train, log)
        if not clouds.is_file():
            in_box(row / "simulated.h5", clouds, geometry["box_min_nm"], geometry["box_max_nm"])
        ratio = n_train / (n_train + n_val)
    run_demo.run_step(
        [
            sys.executable,
            "scripts/convert_h5_to_nifti.py",
            "--h5_file",
            clouds,
            "--output_dir",
            dataset,
            "--voxel_size",
            json.dumps(geometry["shape"]),
            "--method",
            "gaussian",
            "--sigma",
            "1.0",
            "--train_ratio",
            ratio,
            "--seed",
            0,
        ],
        log,
    )
    return dataset


def train_to(row, dataset, models, augment, epochs, log, quick, seed=0, changes=None):
    """Train the row's stage 2 to ``epochs`` (resuming the row's latest checkpoint) and return the last
    validation loss."""
    ckpt = row / "diffusion"
    latest = ckpt / "latest_checkpoint.pt"
    settings = {
        **run_demo.DIFFUSION,
        **({"num_channels": "[8,16,32]", "num_head_channels": "[0,0,8]", "norm_num_groups": 8} if quick else {}),
        "flip_x": augment,
        "flip_y": augment,
        "rotate_z": augment,
        "dataset_dir": dataset,
        "n_epochs": epochs,
        "val_interval": 10,
        "generate_samples_interval": 10**6,
        "ckpt_dir": ckpt,
        "log_dir": row / "logs",
        "seed": seed,
        **(changes or {}),
        "autoencoder_path": checkpoint_path(models, "autoencoder"),
        **({"resume_from": latest} if latest.is_file() else {}),
    }
    train_log = row / "train.log"
    start = train_log.stat().st_size if train_log.is_file() else 0
    run_demo.bundle_step("train_diffusion.json", settings, train_log)
    losses = re.findall(r"Metrics -- \S*?: ([0-9.eE+-]+)", train_log.read_text()[start:])
    return float(losses[-1]) if losses else float("nan")


def memorisation(samples, train, test, rng, extent):
    """For each sample and each test cloud: the Chamfer distance to its nearest training cloud, and its ratio to the
    distance to the second nearest (clouds subsampled to :data:`MEMO_POINTS` points, divided by the box's largest
    extent ``extent``, as in the evaluation). A copy of a training cloud is much nearer that cloud than any other (ratio well
    below 1); a blurred average of several is about as near to each (ratio near 1)."""
    from scripts.evaluation.metrics import chamfer_matrix, subsample

    def prepared(clouds):
        return [subsample(c, MEMO_POINTS, rng) / extent for c in clouds]

    train_p = prepared(train)
    out = []
    for clouds in (samples, test):
        nearest = np.sort(chamfer_matrix(prepared(clouds), train_p, workers=2), axis=1)[:, :2]
        out.append((nearest[:, 0], nearest[:, 0] / nearest[:, 1]))
    return out


def score(row, dataset, models, ckpt_file, reference, step, n_samples, log, with_reference_rows, sampler=None):
    """Sample (``inference.json`` with :data:`SAMPLING` updated by ``sampler``) and evaluate the checkpoint
    ``ckpt_file``; return the evaluation's rows and the memorisation check."""
    sampling = {**SAMPLING, **(sampler or {})}
    out = row / f"step{step}{sampling_label(sampler)}"
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    model_dir = out / "models"  # ``models``' autoencoder and fine stage, in its layout, beside this stage 2
    (model_dir / "diffusion").mkdir(parents=True, exist_ok=True)
    linked = [Path(checkpoint_path(models, stage)) for stage in ("autoencoder", "refiner")]
    if (models / SHIPPED_INFO).is_file():  # the shipped files' settings
        linked.append(models / SHIPPED_INFO)
    for source in linked:
        link = model_dir / source.relative_to(models)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve())
    shutil.copyfile(ckpt_file, model_dir / "diffusion" / "best_model.pt")
    run_demo.bundle_step(
        "inference.json",
        {
            "model_dir": model_dir,
            "output_dir": out / "samples",
            "num_samples": n_samples,
            "output_formats": "['nifti','csv','h5']",
            "batch_size": 10,
            "seed": 0,
            **sampling,
            "overwrite": "true",
        },
        log,
    )
    result = evaluate(out, dataset, model_dir, reference, log, with_reference_rows)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    (out / "models" / "diffusion" / "best_model.pt").unlink()
    return result


def evaluate(out, dataset, model_dir, reference, log, with_reference_rows):
    """Evaluate the samples in ``out/samples`` (``configs/evaluate.json``) and check them for copies of training
    clouds; return the evaluation's rows and that check."""
    from scripts.data.pointclouds import read_point_clouds

    sets = ["train_vs_heldout", "mean_grid_baseline", "samples"] if with_reference_rows else ["samples"]
    run_demo.bundle_step(
        "evaluate.json",
        {
            "dataset_dir": dataset,
            "samples_dir": out / "samples",
            "model_dir": model_dir,
            "output_dir": out / "evaluation",
            "emd_points": 0,
            "num_workers": 2,
            "reference_file": reference,
            "sets": "[" + ",".join(f"'{s}'" for s in sets) + "]",
            "overwrite": "true",
        },
        log,
    )
    rows = json.loads((out / "evaluation" / "metrics.json").read_text())["rows"]
    samples, _ = read_point_clouds(out / "samples" / "pointcloud" / "samples.h5")
    train, _ = read_point_clouds(dataset / "train_points.h5")
    test, _ = read_point_clouds(reference)
    extent = common.box_extent(json.loads((dataset / "dataset_info.json").read_text())["geometry"])
    (to_train, ratio), (test_to_train, test_ratio) = memorisation(
        samples, train, test, np.random.default_rng(0), extent
    )
    result = {
        "rows": rows,
        "memorisation": {
            "sample_median": float(np.median(to_train)),
            "test_median": float(np.median(test_to_train)),
            "sample_ratio": float(np.median(ratio)),
            "test_ratio": float(np.median(test_ratio)),
            "copies": int((ratio < COPY_RATIO).sum()),  # much nearer one training cloud than the next: a copy
            "n": len(to_train),
        },
    }
    shutil.rmtree(out / "samples" / "nifti", ignore_errors=True)  # the grids are large; the points and renders stay
    return result


def sampling_label(sampler):
    """The suffix of a milestone's folder sampled with other settings than :data:`SAMPLING` ('' for those)."""

    def same(a, b):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)

    changed = {k: v for k, v in (sampler or {}).items() if not same(SAMPLING.get(k), v)}
    return "".join(f"_{k}-{_short(v)}" for k, v in sorted(changed.items()))


def figure(row, steps, output, sampler=None):
    """One picture of a row: the test clouds' renders above the samples' at each of ``steps``, labelled with the
    step."""
    folders = [(f"{s} steps", row / f"step{s}{sampling_label(sampler)}") for s in steps]
    strips([(label, folder / "evaluation" / "renderings.png") for label, folder in folders], Path(output))


def strips(renderings, output):
    """The test clouds' renders (the top row of the first evaluation's ``renderings.png``) above the samples' (the
    bottom row of each), one strip per ``(label, renderings.png)`` of ``renderings``, written to ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = [(label, plt.imread(path)) for label, path in renderings]
    half = pictures[0][1].shape[0] // 2
    rows = [("test clouds", pictures[0][1][:half])] + [(label, p[p.shape[0] // 2 :]) for label, p in pictures]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.3 * len(rows)), dpi=100)
    for ax, (label, strip) in zip(axes, rows):
        ax.imshow(strip)
        ax.set_ylabel(label, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def _short(value):
    """A recipe change as it reads in a row's folder name: a file (``pretrained``) by its name alone."""
    return Path(value).stem if "/" in value else value


def shape_cells(row):
    """Mean linearity / planarity, and where scored, the mean width across (nm) and the narrowest axis's z share."""
    cells = f"{row['linearity']['mean']:.2f} / {row['planarity']['mean']:.2f}"
    if "cross_section_nm" in row:  # rows scored before it was a statistic lack it
        cells += f"; {row['cross_section_nm']['mean']:.1f} nm, {row['narrow_axis_z']['mean']:.2f}"
    return cells


def table(results):
    head = ["clouds", "flips/rot. (changes)", "steps", "val loss", "minutes"] + [name for name, *_ in run_demo.SUMMARY]
    head += [SHAPE_HEAD, "copies", "CD to nearest train ×10³ (samples / test)"]
    head += ["nearest / 2nd (samples / test)"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(run_demo.SUMMARY) + "---|---:|---|---|",
    ]
    for r in results:
        m = r["memorisation"]
        lines.append(
            f"| {r['n_train']} | {r['augment']} | {r['steps']} | {r['val_loss']:.4f} | {r['minutes']:.0f} | "
            f"{run_demo.summary_cells(r['rows']['samples'])} | {shape_cells(r['rows']['samples'])} | {m['copies']}/{m['n']} | "
            f"{m['sample_median'] * 1e3:.2f} / {m['test_median'] * 1e3:.2f} | "
            f"{m['sample_ratio']:.2f} / {m['test_ratio']:.2f} |"
        )
    return lines


def reference_rows(results):
    """The table's last rows, from the first result that has them: the floor and the mean-grid baseline; then the
    test clouds' mean linearity and planarity."""
    first = next((r for r in results if "train_vs_heldout" in r["rows"]), None)
    if first is None:
        return []
    lines = []
    for label, key in (("floor: training clouds", "train_vs_heldout"), ("mean-grid baseline", "mean_grid_baseline")):
        cells = f"{run_demo.summary_cells(first['rows'][key])} | {shape_cells(first['rows'][key])}"
        lines.append(f"| {label} | | | | | {cells} | | | |")
    test = first["rows"]["samples"]
    return lines + ["", "Test clouds: " + reference_shape(test) + "."]


SHAPE_HEAD = "linearity / planarity mean; across (nm), narrowest axis z share"


def reference_shape(row):
    """The test clouds' means of :func:`shape_cells`' statistics, in words."""
    words = f"linearity mean {row['linearity']['reference_mean']:.2f}, planarity mean "
    words += f"{row['planarity']['reference_mean']:.2f}"
    if "cross_section_nm" in row:
        words += f", width across {row['cross_section_nm']['reference_mean']:.1f} nm, narrowest axis z share "
        words += f"{row['narrow_axis_z']['reference_mean']:.2f}"
    return words


def by_statistic_lines(labelled):
    """A table of the realism test on each statistic alone for ``(label, evaluation row)`` pairs, under the main
    table; empty when no row has it (rows scored before it was measured)."""
    from scripts.evaluation.report import by_statistic_table

    scored = [(label, row["realism"]["by_statistic"]) for label, row in labelled if "by_statistic" in row["realism"]]
    if not scored:
        return []
    intro = (
        "C2ST on each statistic alone (%; 50: the samples match the test clouds in it, 100: it alone gives them away):"
    )
    return ["", intro, "", *by_statistic_table("samples", scored)]


def write_report(work, title, quick, load, intro, results):
    """Print the report (the machine, ``intro``, the table of ``results`` and the reference rows) and keep it in
    ``work/report.md``."""
    import monai
    import torch

    lines = common.machine_header(title, quick, load, (torch, monai, np), torch_info=True)
    lines += [intro, "", *table(results), *reference_rows(results)]
    labelled = [(f"{r['n_train']} clouds, {r['augment']}, {r['steps']} steps", r["rows"]["samples"]) for r in results]
    lines += by_statistic_lines(labelled)
    report = "\n".join(lines)
    (work / "report.md").write_text(report + "\n")
    print(report)


def _parser():
    parser = common.arg_parser(__doc__, "one tiny row, two milestones of a few steps: a smoke check", tmpdir=None)
    parser.add_argument("--work_dir", default=None, help="where rows, checkpoints and scores go (kept; required)")
    parser.add_argument("--rows", default="102:off,102:on,1000:off,1000:on,5000:off,5000:on", help="N:on|off,...")
    parser.add_argument("--milestones", default="1000,2000,4000,8000,16000", help="optimizer steps, comma separated")
    parser.add_argument("--model_dir", default=str(ROOT / "models"), help="autoencoder and fine stage (shipped)")
    parser.add_argument("--seed", type=int, default=0, help="stage 2's training seed (sampling keeps seed 0)")
    parser.add_argument("--figure", default=None, help="also write one PNG per row: test clouds above each milestone")
    parser.add_argument(
        "--data_only",
        action="store_true",
        help="simulate and convert the rows' clouds (W/dataN/voxels_nifti), train nothing",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="ID=VALUE", help="a change to the recipe (train_diffusion.json)"
    )
    parser.add_argument(
        "--sampler",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help=f"a sampling setting of inference.json for the milestones' samples (default {SAMPLING})",
    )
    return parser


def main():
    parser = _parser()
    args = parser.parse_args()
    if any("=" not in s for s in args.sampler + args.set):
        parser.error("--set and --sampler take ID=VALUE")
    sampler = dict(s.split("=", 1) for s in args.sampler)
    if args.quick:
        args.rows, args.milestones = QUICK["rows"], QUICK["milestones"]
    if not args.work_dir:
        parser.error("--work_dir is required: the rows' checkpoints and scores are kept there to resume")
    work, models = Path(args.work_dir).expanduser().resolve(), Path(args.model_dir).resolve()
    try:
        geometry = autoencoder_geometry(models)
    except UserError as e:  # refused before the work dir is made
        parser.error(f"--model_dir: {e}")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    n_test = QUICK["n_test"] if args.quick else N_SCORED
    n_val = QUICK["n_val"] if args.quick else N_VAL
    reference = work / "test_clouds.h5"
    simulate(reference, n_test, 1, log)  # the demo's test clouds
    load = common.load_average()
    results = []
    for spec in args.rows.split(","):
        size, augment = spec.split(":")
        n_train, augment = int(size), {"on": True, "off": False}[augment]
        changes = dict(c.split("=", 1) for c in args.set)
        label = "".join(f"_{k}-{_short(v)}" for k, v in sorted(changes.items()))
        label += f"_seed{args.seed}" if args.seed else ""
        row = work / f"n{n_train}_{'aug' if augment else 'noaug'}{label}"
        row.mkdir(exist_ok=True)
        (work / f"data{n_train}").mkdir(exist_ok=True)  # one conversion per size, shared by its rows
        dataset = prepare_row(work / f"data{n_train}", n_train, n_val, geometry, log)
        if args.data_only:
            print(f"{dataset}: {n_train} training clouds in the autoencoder's box", flush=True)
            continue
        n_actual = json.loads((dataset / "dataset_info.json").read_text())["counts"]["n_train"]
        per_epoch = math.ceil(n_actual / BATCH)
        timing_file = row / "minutes.json"
        minutes = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        milestones = [int(m) for m in args.milestones.split(",")]
        for step in milestones:
            epochs = math.ceil(step / per_epoch)
            kept = row / f"step{step}.pt"
            if not kept.is_file():
                start = time.perf_counter()
                val_loss = train_to(row, dataset, models, augment, epochs, log, args.quick, args.seed, changes)
                previous = max([v["minutes"] for v in minutes.values()], default=0.0)
                minutes[str(step)] = {"minutes": previous + (time.perf_counter() - start) / 60, "val_loss": val_loss}
                shutil.copyfile(row / "diffusion" / "latest_checkpoint.pt", kept)
                timing_file.write_text(json.dumps(minutes, indent=1) + "\n")
            first = step == milestones[0]
            result = score(row, dataset, models, kept, reference, step, n_test, log, first, sampler)
            results.append(
                {
                    **result,
                    "n_train": n_actual,
                    "augment": ", ".join(
                        ["on" if augment else "off", *(f"{k}={_short(v)}" for k, v in sorted(changes.items()))]
                        + ([f"seed {args.seed}"] if args.seed else [])
                        + (
                            [f"sampled with {' '.join(f'{k}={v}' for k, v in sorted(sampler.items()))}"]
                            if sampler
                            else []
                        )
                    ),
                    "steps": epochs * per_epoch,
                    **minutes[str(step)],
                }
            )
            print("\n".join(table(results[-1:])[2:]), flush=True)
        if args.figure:
            figure(row, milestones, Path(args.figure).with_suffix(f".{row.name}{sampling_label(sampler)}.png"), sampler)
    if args.data_only:
        return
    intro = (
        f"The demo's stage-2 recipe on the autoencoder and fine stage of {models}; {n_test} samples per milestone "
        f"against {n_test} test clouds (the demo's, seed 1); minutes: this row's training so far."
    )
    write_report(work, "Stage 2's scaling curve", args.quick, load, intro, results)


if __name__ == "__main__":
    main()
