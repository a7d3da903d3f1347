"""Sampling with fresh noise in the late steps (``eta``, ``eta_below``) beside Euler's deterministic steps.

One trained model (default: the shipped ``models/``), sampled through ``configs/inference.json`` and its fine stage
with each setting of ``--settings`` (the first is the reference), 100 samples each against the demo's 100 test clouds
(seed 1), scored by ``configs/evaluate.json`` as the scaling rows are (``benchmark_stage2_scaling.evaluate``: every
statistic of the model card, the realism test, the copy check against the demo's training clouds)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_sampler_noise.py --work_dir ~/runs/sampler_noise

A setting already scored in ``--work_dir`` is read back. ``--quick``: 10 samples of 4 steps per setting.

A setting with ``guidance=W`` samples with autoguidance (Karras et al., 2024): each velocity is the guide's pushed
``W`` times as far towards the model's, ``guide + W (model - guide)``, the guide being a weaker version of the same
model: the demo's recipe stopped after ``--guide_epochs`` epochs (trained into ``--work_dir``), or ``--guide``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import benchmark_stage2_scaling as scaling  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

# isort: split
import torch  # noqa: E402
from scripts import run_demo  # noqa: E402

SETTINGS = (
    "eta=0,num_inference_steps=20",  # the reference: Euler's steps, as the demo sampled before
    "eta=0,num_inference_steps=50",
    "eta=1,eta_below=0.5,num_inference_steps=20",
    "eta=1,eta_below=0.5,num_inference_steps=50",
    "eta=1,eta_below=0.3,num_inference_steps=50",
    "eta=1,eta_below=0.7,num_inference_steps=50",
    "eta=1,eta_below=1,num_inference_steps=50",
)
QUICK = {
    "settings": (
        "eta=0,num_inference_steps=4",
        "eta=1,eta_below=0.5,num_inference_steps=4",
        "eta=0,num_inference_steps=4,guidance=2",
    ),
    "n": 10,
    "guide_epochs": 1,
}


def parse(setting):
    """``"eta=1,eta_below=0.5"`` → ``{"eta": "1", "eta_below": "0.5"}``."""
    pairs = [item.split("=", 1) for item in setting.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(setting)
    return dict(pairs)


def label(setting):
    """A setting as the figure names it: ``Euler, 20 steps``, ``eta 1 below 0.5, 50 steps`` or ``guidance 2``."""
    from scripts.networks.schedulers import RFLOW_ETA

    values = {**{k: str(v) for k, v in RFLOW_ETA.items()}, **parse(setting)}
    steps = f"{values.get('num_inference_steps', 'the default')} steps"
    named = ("eta", "eta_below", "num_inference_steps", "guidance")
    others = "".join(f", {k} {v}" for k, v in values.items() if k not in named)  # e.g. ", threshold 0"
    if "guidance" in values:  # short: the row labels are drawn along a strip's height
        return f"guidance {values['guidance']}" + (", Euler" if float(values["eta"]) == 0 else "") + others
    if float(values["eta"]) == 0:
        return f"Euler, {steps}{others}"
    return f"eta {values['eta']} below {values['eta_below']}, {steps}{others}"


def folder(work, setting, seed=0):
    """Where ``setting``'s samples and scores go (sampling seeds other than 0 in folders of their own)."""
    return work / (setting.replace("=", "-").replace(",", "_") + (f"_seed{seed}" if seed else ""))


class AutoGuided(torch.nn.Module):
    """A diffusion model guided by a weaker version of itself: ``guide + weight (model - guide)`` (autoguidance)."""

    def __init__(self, model, guide, weight):
        super().__init__()
        self.model, self.guide, self.weight = model, guide, float(weight)

    def forward(self, x, *args, **kwargs):
        guide = self.guide(x, *args, **kwargs)
        return guide + self.weight * (self.model(x, *args, **kwargs) - guide)


def train_guide(work, dataset, models, epochs, log):
    """The guide: stage 2 of the demo's recipe (``run_demo.DIFFUSION``, seed 0) on the demo's clouds and
    ``models``' autoencoder, its latents scaled by ``models``' stage-2 factor (the sampler scales them once, so the
    two must agree), stopped after ``epochs`` epochs; trained once into ``work/guide`` (its ``best_model.pt``,
    written by the one validation after the last epoch, marks a finished run)."""
    from scripts.networks.checkpoints import load_checkpoint
    from scripts.networks.trained import checkpoint_path

    guide = work / "guide" / f"epochs{epochs}"
    if not (guide / "best_model.pt").is_file():
        settings = {**run_demo.DIFFUSION, "dataset_dir": dataset, "seed": 0, "n_epochs": epochs, "ckpt_dir": guide}
        settings.update(log_dir=guide / "logs", generate_samples_interval=10**6, val_interval=epochs)
        settings.update(autoencoder_path=checkpoint_path(models, "autoencoder"), overwrite="true")
        settings.update(scale_factor=load_checkpoint(checkpoint_path(models, "diffusion"), "diffusion")["scale_factor"])
        run_demo.bundle_step("train_diffusion.json", settings, log)
    return guide / "best_model.pt"


def sample_guided(overrides, guide, weight):
    """``inference.json`` with ``overrides``, its UNet guided by the stage-2 checkpoint ``guide`` (in this process)."""
    from scripts.networks import trained
    from scripts.runtime.validators import literal

    typed = {**{k: literal(str(v)) for k, v in overrides.items()}, "overwrite": True}
    workflow = common.open_workflow(ROOT / "configs" / "inference.json", typed)
    config = workflow.parser
    checkpoint = trained.load_diffusion_checkpoint(
        guide, config.get_parsed_content("autoencoder_checkpoint"), config.get_parsed_content("autoencoder_path")
    )
    scale, own = config.get_parsed_content("diffusion_checkpoint")["scale_factor"], checkpoint["scale_factor"]
    if abs(own - scale) > 1e-3 * scale:  # the sampler scales the latents once, by the model's factor
        raise SystemExit(f"--guide {guide}: its latent scale factor {own:.4g} is not the model's {scale:.4g}")
    weaker = trained.trained_unet(checkpoint, guide, config.get_parsed_content("device"))
    config["unet"] = AutoGuided(config.get_parsed_content("unet"), weaker, weight)
    common.run_workflow(workflow)


def sample_and_score(work, setting, models, dataset, reference, n, log, with_reference_rows, seed=0, guide=None):
    """Sample ``n`` clouds from ``models`` with ``setting`` and score them; read back when done before."""
    out = folder(work, setting, seed)
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    values = parse(setting)
    weight = values.pop("guidance", None)
    overrides = {
        "model_dir": models,
        "output_dir": out / "samples",
        "num_samples": n,
        "output_formats": "['nifti','csv','h5']",
        "batch_size": 10,
        "seed": seed,
        **values,
        "overwrite": "true",
    }
    if weight is None:
        run_demo.bundle_step("inference.json", overrides, log)
    else:
        sample_guided(overrides, guide, weight)
    result = scaling.evaluate(out, dataset, models, reference, log, with_reference_rows)
    if weight is not None:  # read back whatever the guide is then: another guide wants another work_dir
        result["guide"] = str(guide)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(results):
    head = ["sampling (inference.json)", *(name for name, *_ in run_demo.SUMMARY), scaling.SHAPE_HEAD]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(run_demo.SUMMARY) + "---|"]
    for setting, r in results:
        samples = r["rows"]["samples"]
        lines.append(f"| {setting} | {run_demo.summary_cells(samples)} | {scaling.shape_cells(samples)} |")
    # the reference rows: scored with the first setting of the run that scored it (a setting read back from an
    # earlier run may lack them)
    rows = next((r["rows"] for _, r in results if "train_vs_heldout" in r["rows"]), {})
    for name, key in (("floor: training clouds", "train_vs_heldout"), ("mean-grid baseline", "mean_grid_baseline")):
        if key in rows:
            lines.append(f"| {name} | {run_demo.summary_cells(rows[key])} | {scaling.shape_cells(rows[key])} |")
    lines += ["", "Test clouds: " + scaling.reference_shape(results[0][1]["rows"]["samples"]) + "."]
    return lines + scaling.by_statistic_lines([(setting, r["rows"]["samples"]) for setting, r in results])


def main():
    parser = common.arg_parser(__doc__, "10 samples of 4 steps per setting: a smoke check")
    parser.add_argument("--work_dir", required=True, help="where the samples and scores go (kept)")
    parser.add_argument("--model_dir", default=str(ROOT / "models"), help="the trained model (default: shipped)")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="comma-separated ID=VALUE of inference.json")
    parser.add_argument(
        "--figure", default=None, help="a PNG: the test clouds' renders above each setting's samples (--figure_of)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (the same for every setting)")
    parser.add_argument("--figure_of", nargs="+", default=None, help="the settings drawn in --figure (default: all)")
    parser.add_argument("--guide", default=None, help="the guide of guidance=W settings: a stage-2 checkpoint")
    parser.add_argument("--guide_epochs", type=int, default=20, help="else the demo's recipe stopped after these")
    args = parser.parse_args()
    settings, n = (QUICK["settings"], QUICK["n"]) if args.quick else (args.settings, scaling.N_SCORED)
    for setting in settings:
        try:
            float(parse(setting).get("guidance", 1))
        except ValueError:
            parser.error(f"--settings {setting!r}: give ID=VALUE pairs separated by commas, guidance=W a number")
    if args.guide and not Path(args.guide).is_file():
        parser.error(f"--guide {args.guide}: no such stage-2 checkpoint")
    guided = any("guidance" in parse(s) for s in settings)
    if args.guide and not guided:
        parser.error("--guide: no setting uses it; add guidance=W to a setting")
    models = Path(args.model_dir).resolve()
    if not (models / "checkpoints.json").is_file() and not (models / "diffusion").is_dir():
        parser.error(f"--model_dir {models}: holds no trained model (checkpoints.json, or diffusion/)")
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    log, load = work / "commands.log", common.load_average()
    (work / "data102").mkdir(exist_ok=True)
    geometry = scaling.autoencoder_geometry(models)  # the demo's clouds and split, in the model's grid
    dataset = scaling.prepare_row(work / "data102", 102, 0, geometry, log)
    reference = work / "test_clouds.h5"
    scaling.simulate(reference, n, 1, log)  # the demo's test clouds
    guide = args.guide
    if guide is None and guided:
        guide = train_guide(work, dataset, models, QUICK["guide_epochs"] if args.quick else args.guide_epochs, log)
    results = []
    for i, setting in enumerate(settings):
        score = sample_and_score(work, setting, models, dataset, reference, n, log, i == 0, args.seed, guide)
        results.append((setting, score))
        print(table(results)[2 + i], flush=True)  # this setting's row
    import monai
    import numpy as np

    lines = common.machine_header("Sampling noise", args.quick, load, (torch, monai, np), torch_info=True)
    lines += [
        f"{n} samples per setting (sampling seed {args.seed}) from {models} against {n} test clouds (the demo's, seed 1).",
        "",
    ]
    report = "\n".join(lines + table(results))
    (work / "report.md").write_text(report + "\n")
    print(report)
    if args.figure:
        drawn = args.figure_of or settings
        strips = [(label(s), folder(work, s, args.seed) / "evaluation" / "renderings.png") for s in drawn]
        scaling.strips(strips, Path(args.figure))


if __name__ == "__main__":
    main()
