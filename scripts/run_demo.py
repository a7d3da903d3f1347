"""The demo: the whole pipeline, on built-in simulated microtubules or on your own clouds, with the commands a user
would type.

Usage from the bundle root::

    python scripts/run_demo.py                                        # simulated microtubules
    python scripts/run_demo.py --input my_clouds.h5 --output_dir D    # your clouds, any format the converter reads

Steps: (simulate clouds and a separate test set) → convert to grids → train the autoencoder → train the latent
diffusion model → train the fine stage → sample as many clouds as there are reference clouds → evaluate them
against the reference (the fresh test set, or for your data the validation split) and print the metric table; the
side-by-side figure of held-out and generated clouds is ``evaluation/renderings.png``. Each command is printed
before it runs, so any step can be re-run or changed by hand. Everything goes to the demo's own folders
(``data/demo``, ``outputs/demo``, ``logs/demo``, or ``D/data``, ``D/outputs``, ``D/logs``); each folder the demo
writes into gets a marker (``.run_demo.json``), and re-running replaces the files of folders so marked. A folder there
that holds anything else (your own trained model in ``D/outputs/autoencoder``, say) is refused before anything runs.

For your clouds the grid's box comes from the data; one large acquisition (a single cloud, e.g. a ThunderSTORM
CSV) is cut into tiles of a size chosen from its extent, which is printed.
"""

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.runtime.atomic_write import atomic_path  # noqa: E402
from scripts.runtime.command_line import main  # noqa: E402
from scripts.runtime.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".run_demo.json"  # in every folder the demo writes into: only folders holding it are the demo's to replace
STAGES = ("autoencoder", "diffusion", "refiner")

# The recipe: settings chosen for about 10 minutes on 2 CPU cores, pip included (see docs/README.md); real data at
# real sizes wants the config defaults on a GPU.
VOXEL_SIZE = [32, 32, 16]
AUTOENCODER = {
    "num_channels": "[16,32]",  # one halving: 16 × 16 × 8 latents keep the filaments (Dice 0.96 against 0.88 for two)
    "norm_num_groups": 8,
    "attention_levels": "[False,False]",
    "with_nonlocal_attn": False,
    "discriminator_channels": 16,
    "discriminator_num_layers": 2,
    "batch_size": 4,
    "learning_rate": 5e-4,
    "autoencoder_warm_up_n_epochs": 10,
    "num_workers": 0,
    "val_interval": 2,
    "image_log_interval": 4,
}
DIFFUSION = {
    "num_channels": "[16,32,64]",
    "attention_levels": "[False,False,True]",
    "num_head_channels": "[0,0,32]",
    "norm_num_groups": 16,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "val_interval": 10,
    "generate_samples_interval": 50,
    "num_inference_steps": 50,  # RFlow with fresh noise in its late steps: 50 beat 20 (benchmark_sampler_noise.py)
    # At the demo's budget (80 epochs, about 1000 steps) rectified flow alone did better than with the EMA, the
    # flips/rotations and the warm-up + cosine decay on top (1-NNA-CD 57.0 against 61.5 %, pair-distance W1 6.6
    # against 7.9 nm, means of seeds 0 and 1: benchmarks/benchmark_recipe.py); the configs keep them for full runs.
    "ema_decay": 0.0,
    "flip_x": False,
    "flip_y": False,
    "rotate_z": False,
    "lr_warmup_fraction": 0.0,
    "lr_decay": False,
}
REFINER = {"batch_size": 8}
# the evaluation's rows: the floor, the baseline, the samples and their voxel-uniform export (the autoencoder's
# ceilings are left out for time; configs/evaluate.json computes them by default)
DEMO_ROWS = "['train_vs_heldout','mean_grid_baseline','samples','samples_voxel_uniform']"
SUMMARY = (
    ("NN W1 (nm)", "nn_distance_nm", "wasserstein", 1, 2),
    ("z W1 (nm)", "z_nm", "wasserstein", 1, 1),
    ("linearity W1", "linearity", "wasserstein", 1, 3),
    ("pair W1 (nm)", "pair_distance_nm", "wasserstein", 1, 1),
    ("MMD-CD ×10³", "cd", "mmd", 1e3, 3),
    ("COV-CD %", "cd", "cov", 100, 1),
    ("1-NNA-CD %", "cd", "1nna", 100, 1),
    ("C2ST %", "realism", "accuracy", 100, 1),
    ("foreground %", "foreground_fraction", "mean", 100, 1),
)


def run_step(args, log=None):
    """Run one step from the bundle's root, its output on the terminal or appended to ``log``; stop with its status
    when it fails (the step has printed its own error line, or left it in ``log``)."""
    args = [str(a) for a in args]
    if log is None:
        print("$ " + " ".join(args), flush=True)
        result = subprocess.run(args, cwd=ROOT)
    else:
        with open(log, "a") as f:
            f.write("$ " + " ".join(args) + "\n")
            f.flush()
            result = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(result.returncode if log is None else f"failed ({result.returncode}): {' '.join(args)}; see {log}")


def demo_folders(data, outputs, logs, simulate):
    """The folders the demo writes into: the simulated clouds' (when it simulates), the conversion's, each stage's
    checkpoints and logs, the samples' and the evaluation's."""
    return [
        *([data] if simulate else []),
        data / "voxels_nifti",
        *(outputs / name for name in (*STAGES, "samples", "evaluation")),
        *(logs / name for name in STAGES),
    ]


def check_demo_folders(folders):
    """Refuse, before anything runs, a folder the demo would write into that holds files the demo did not write
    (no :data:`MARKER`): the demo replaces its own earlier output and nothing else."""
    for folder in map(Path, folders):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder}: the demo writes a folder here, but this is a file; choose another --output_dir")
        if not folder.is_dir() or (folder / MARKER).is_file():
            continue
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        if held:
            shown = ", ".join(held[:3]) + (f", … ({len(held)} entries)" if len(held) > 3 else "")
            raise UserError(
                f"{folder}: holds files the demo did not write ({shown}); the demo replaces only its own output, so "
                "choose another --output_dir (or move these files away)"
            )


@contextmanager
def marked_folders(folders, run):
    """Create the demo's folders, each with a :data:`MARKER` naming this run (``run``: its settings), for the steps
    inside the ``with``; when they fail, the folders created here that hold nothing but the marker are removed."""
    stamp = {"written_by": "scripts/run_demo.py", "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    created = []
    for folder in map(Path, folders):
        created += [p for p in (folder, *folder.parents) if not p.exists() and p not in created]
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / MARKER) as tmp:
            tmp.write_text(json.dumps({**stamp, **run}, indent=4) + "\n")
    try:
        yield
    except BaseException:
        for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            if folder.is_dir() and {p.name for p in folder.iterdir()} <= {MARKER}:
                (folder / MARKER).unlink(missing_ok=True)
                folder.rmdir()
        raise


def bundle_step(config, settings, log=None):
    """``python -m monai.bundle run`` of ``configs/<config>`` with ``settings`` as ``--id value``: see :func:`run_step`."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}"]
    for key, value in settings.items():
        args += [f"--{key}", value]
    run_step(args, log)


def _tile_flags(source, tiles, tile_size):
    """The converter's tile flags for the user's clouds: one large acquisition (a single cloud) is cut into tiles
    whose count and size are chosen from its extent unless given; several clouds are converted as they are."""
    from scripts.data.pointclouds import read_point_clouds
    from scripts.data.tiles import suggest_tiles

    clouds, _ = read_point_clouds(source)
    if len(clouds) > 1 and not tiles:
        return []
    n, size = suggest_tiles(clouds)
    n, size = tiles or n, tile_size or size
    print(
        f"{source}: {len(clouds)} cloud(s) of {sum(map(len, clouds))} localizations: cutting {n} tiles of "
        f"{[round(float(v)) for v in size]} nm (--tiles and --tile_size change this)",
        flush=True,
    )
    return ["--tiles", n, "--tile_size", json.dumps([float(v) for v in size])]


def summary_cells(row):
    """One row of ``metrics.json`` as the Markdown cells of :data:`SUMMARY` ("–" where a figure is missing)."""
    return " | ".join(
        "–" if row.get(key, {}).get(field) is None else f"{row[key][field] * scale:.{digits}f}"
        for _, key, field, scale, digits in SUMMARY
    )


def summary(metrics):
    """The demo's metric table (Markdown) from ``metrics.json``: each set's figures against the reference clouds,
    the floor (training clouds) first, and the reference's own foreground fraction."""
    rows = metrics["rows"]
    lines = ["| set | " + " | ".join(name for name, *_ in SUMMARY) + " |", "|---|" + "---:|" * len(SUMMARY)]
    lines += [f"| {name} | {summary_cells(row)} |" for name, row in rows.items()]
    held = next(iter(rows.values()))["foreground_fraction"]["reference_mean"]
    lines += [
        "",
        f"{metrics['settings']['n_heldout']} reference clouds; their foreground fraction: {held * 100:.1f} %.",
    ]
    return "\n".join(lines)


def scaled_epochs(scale, *epochs):
    """``epochs`` multiplied by ``scale`` (``--epochs_scale``), rounded, at least 1 each."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"epochs_scale: expected a number above 0 (2 doubles every stage's epochs), got {scale!r}")
    return tuple(max(1, round(e * scale)) for e in epochs)


def run_demo(
    input=None,
    output_dir=None,
    n_clouds=128,
    n_test=100,
    autoencoder_epochs=15,
    diffusion_epochs=80,
    refiner_epochs=60,
    num_samples=None,
    tiles=None,
    tile_size=None,
    epochs_scale=1.0,
    seed=0,
):
    """Run every stage of the pipeline; see the module docstring.

    Args:
        input: your point clouds (any format the converter reads); ``None``: simulated microtubules.
        output_dir: where everything goes (``data/``, ``outputs/``, ``logs/`` inside); default: the bundle's
            ``data/demo``, ``outputs/demo`` and ``logs/demo``.
        n_clouds, n_test: simulated training clouds, and simulated test clouds (another seed) to evaluate against.
        autoencoder_epochs, diffusion_epochs, refiner_epochs: training length of each stage.
        num_samples: clouds to sample (default: as many as the reference holds).
        tiles, tile_size: cut this many tiles of this size (nm) out of your clouds (default for one acquisition:
            chosen from its extent).
        epochs_scale: multiplies every stage's epochs (rounded, at least 1): more training time for better samples
            (about ``epochs_scale`` times the demo's training minutes).
        seed: every random choice of the run.
    """
    start = time.perf_counter()
    autoencoder_epochs, diffusion_epochs, refiner_epochs = scaled_epochs(
        epochs_scale, autoencoder_epochs, diffusion_epochs, refiner_epochs
    )
    base = Path(output_dir) if output_dir else None
    data, outputs, logs = (
        (base / "data", base / "outputs", base / "logs")
        if base
        else (Path("data/demo"), Path("outputs/demo"), Path("logs/demo"))
    )
    folders = demo_folders(data, outputs, logs, simulate=input is None)
    check_demo_folders(folders)
    convert_flags = []
    reference = None
    if input is not None:
        source = Path(input)
        convert_flags = _tile_flags(source, tiles, tile_size)
    run = {"input": str(input) if input is not None else "simulated", "seed": seed, "epochs_scale": epochs_scale}
    with marked_folders(folders, run):
        if input is None:
            source, reference = data / "microtubules.h5", data / "test_clouds.h5"
            _simulate(source, n_clouds, seed)
            _simulate(reference, n_test, seed + 1)
        dataset = data / "voxels_nifti"
        _convert(source, dataset, seed, convert_flags)
        _train(dataset, outputs, logs, seed, (autoencoder_epochs, diffusion_epochs, refiner_epochs))
        info = json.loads((dataset / "dataset_info.json").read_text())
        n_reference = n_test if reference else info["counts"]["n_val"]
        metrics = _sample_and_evaluate(dataset, outputs, reference, seed, num_samples or n_reference)
        print("\n" + summary(metrics) + "\n")
        print(
            f"demo finished in {time.perf_counter() - start:.0f} s: samples in {outputs / 'samples'} (nifti/, "
            f"pointcloud/, preview.png); held-out beside generated clouds: {outputs / 'evaluation' / 'renderings.png'}; "
            f"all metrics: {outputs / 'evaluation' / 'metrics.md'}; TensorBoard logs in {logs}"
        )


def _simulate(path, n, seed):
    run_step(
        [
            sys.executable,
            "scripts/simulate_smlm.py",
            "--output",
            path,
            "--n_clouds",
            n,
            "--seed",
            seed,
            "--overwrite",
            "true",
        ]
    )


def _convert(source, dataset, seed, flags):
    run_step(
        [
            sys.executable,
            "scripts/convert_h5_to_nifti.py",
            "--h5_file",
            source,
            "--output_dir",
            dataset,
            "--voxel_size",
            json.dumps(VOXEL_SIZE),
            "--method",
            "gaussian",
            "--sigma",
            "1.0",
            "--seed",
            seed,
            *flags,
            "--overwrite",
            "true",
        ]
    )


def _train(dataset, outputs, logs, seed, epochs):
    """The three training stages, with the recipe at the top of this file and ``epochs`` (stage 1, 2, fine)."""
    autoencoder_epochs, diffusion_epochs, refiner_epochs = epochs
    common = {"dataset_dir": dataset, "seed": seed, "overwrite": "true"}
    bundle_step(
        "train_autoencoder.json",
        {
            **AUTOENCODER,
            **common,
            "voxel_size": json.dumps(VOXEL_SIZE),
            "n_epochs": autoencoder_epochs,
            "ckpt_dir": outputs / "autoencoder",
            "log_dir": logs / "autoencoder",
        },
    )
    autoencoder = outputs / "autoencoder" / "best_model.pt"
    bundle_step(
        "train_diffusion.json",
        {
            **DIFFUSION,
            **common,
            "n_epochs": diffusion_epochs,
            "ckpt_dir": outputs / "diffusion",
            "log_dir": logs / "diffusion",
            "autoencoder_path": autoencoder,
        },
    )
    bundle_step(
        "train_refiner.json",
        {
            **REFINER,
            **common,
            "n_epochs": refiner_epochs,
            "val_interval": refiner_epochs,  # one validation, at the end, writes best_model.pt
            "ckpt_dir": outputs / "refiner",
            "log_dir": logs / "refiner",
            "autoencoder_path": autoencoder,
        },
    )


def _sample_and_evaluate(dataset, outputs, reference, seed, num_samples):
    """Sample ``num_samples`` clouds and evaluate them against ``reference`` (or the validation split); returns
    ``metrics.json``."""
    bundle_step(
        "inference.json",
        {
            "model_dir": outputs,
            "output_dir": outputs / "samples",
            "seed": seed,
            "num_samples": num_samples,
            "batch_size": 10,
            "num_inference_steps": DIFFUSION["num_inference_steps"],
            "overwrite": "true",
        },
    )
    evaluation = outputs / "evaluation"
    bundle_step(
        "evaluate.json",
        {
            "dataset_dir": dataset,
            "samples_dir": outputs / "samples",
            "model_dir": outputs,
            "output_dir": evaluation,
            "emd_points": 0,
            "sets": DEMO_ROWS,
            "num_workers": 2,
            "seed": seed,
            "overwrite": "true",
            **({"reference_file": reference} if reference else {}),
        },
    )
    return json.loads((evaluation / "metrics.json").read_text())


if __name__ == "__main__":
    main(run_demo)
