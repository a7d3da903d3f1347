"""Stage 2 without the latent: rectified flow on the voxel grids themselves, beside the latent model of the scaling run.

The question it answers: do the samples' meshes of short branched tubes come from the latent (a diffusion model on
the autoencoder's 16 × 16 × 8 × 3 latents learns only their Gaussian part: ``benchmark_stage2_layout.py``), or
from what any small diffusion model learns from these clouds in a few thousand steps? It trains a
``DiffusionModelUNet`` with the bundle's rectified-flow loss (``engines.diffusion_loss``) on a conversion's training
grids (values in [0, 1] mapped to [-1, 1]; the flips and the quarter turns about z of ``train_diffusion.json``),
samples ``--num_samples`` grids (``--num_inference_steps`` Euler steps, sampling seed 0), puts them through the
bundle's inference config (the shipped fine stage places their points) with the denoising swapped for this model,
and scores them with ``configs/evaluate.json`` against the reference clouds, as a scaling row
(``benchmark_stage2_scaling.evaluate``: every statistic of the card, the realism test and the copy check).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_pixel_diffusion.py --work_dir ~/runs/pixel \\
        --dataset_dir ~/runs/scaling/data1000/voxels_nifti --reference_file ~/runs/scaling/test_clouds.h5
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import benchmark_stage2_scaling as scaling  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

# isort: split
import torch  # noqa: E402
from scripts import run_demo  # noqa: E402
from scripts.runtime.validators import literal  # noqa: E402

UNET = {  # the demo's stage-2 UNet (run_demo.DIFFUSION), on one channel at the grid's size
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": literal(run_demo.DIFFUSION["num_channels"]),
    "attention_levels": literal(run_demo.DIFFUSION["attention_levels"]),
    "num_head_channels": literal(run_demo.DIFFUSION["num_head_channels"]),
    "num_res_blocks": 1,
    "norm_num_groups": run_demo.DIFFUSION["norm_num_groups"],
}
QUICK_UNET = {"channels": [16, 16, 32], "num_head_channels": [0, 0, 16], "norm_num_groups": 8}
QUICK = {"steps": 4, "num_samples": 4, "num_inference_steps": 2}
RFLOW = {"objective": "rflow", "num_train_timesteps": 1000}  # train_diffusion.json's scheduler settings


def augment(batch, generator):
    """The flips in x and y and the quarter turns about z of ``train_diffusion.json``, one draw per batch."""
    if torch.rand(1, generator=generator) < 0.5:
        batch = batch.flip(2)
    if torch.rand(1, generator=generator) < 0.5:
        batch = batch.flip(3)
    return torch.rot90(batch, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))


def train(grids, unet_args, steps, batch_size, learning_rate, seed, log_every=100):
    """The UNet after ``steps`` optimizer steps of the bundle's rectified-flow loss; with the seconds it took."""
    from monai.networks.nets import DiffusionModelUNet
    from scripts.networks.schedulers import training_scheduler
    from scripts.training.engines import diffusion_loss

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = DiffusionModelUNet(**unet_args)
    scheduler = training_scheduler(RFLOW)
    optimizer = torch.optim.Adam(unet.parameters(), lr=learning_rate)
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        index = torch.randint(len(grids), (batch_size,), generator=generator)
        loss = diffusion_loss(unet, scheduler, augment(grids[index], generator), torch.autocast("cpu", enabled=False))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        if step % log_every == 0:
            print(f"step {step}: loss {running / log_every:.4f}", file=sys.stderr, flush=True)
            running = 0.0
    return unet.eval(), time.perf_counter() - start


def pixel_sampler(unet, shape, num_inference_steps):
    """A stand-in for ``schedulers.sample_grids`` with its signature: grids drawn by ``unet`` in voxel space."""
    from monai.inferers import DiffusionInferer
    from scripts.networks.schedulers import make_scheduler

    scheduler = make_scheduler(RFLOW, None, num_inference_steps, eta=0.0)  # Euler's steps, as the scaling rows

    def sample_grids(autoencoder, _unet, _scheduler, scale_factor, latent_shape, n, device, generator=None, *_, **__):
        noise = torch.randn((n, 1, *shape), generator=generator)
        with torch.no_grad():
            grids = DiffusionInferer(scheduler).sample(input_noise=noise, diffusion_model=unet, scheduler=scheduler)
        return (grids + 1) / 2

    return sample_grids


def sample(unet, shape, out, model_dir, n_samples, num_inference_steps):
    """The bundle's inference (its fine stage and writers) with the denoising and decoding swapped for ``unet``."""
    import scripts.sampling.sampler as sampler

    original = sampler.sample_grids
    sampler.sample_grids = pixel_sampler(unet, shape, num_inference_steps)
    try:
        workflow = common.open_workflow(
            ROOT / "configs" / "inference.json",
            {
                "model_dir": str(model_dir),
                "output_dir": str(out / "samples"),
                "num_samples": n_samples,
                "output_formats": ["nifti", "csv", "h5"],
                "batch_size": 10,
                "seed": 0,
                "num_inference_steps": num_inference_steps,
                "overwrite": True,
            },
        )
        common.run_workflow(workflow)
    finally:
        sampler.sample_grids = original


def run(args, unet_args, work):
    """Train, sample and score; the scaling row's result with this run's size, steps and training minutes."""
    info = json.loads((Path(args.dataset_dir) / "dataset_info.json").read_text())
    shape = info["geometry"]["shape"]
    grids = scaling.training_grids(Path(args.dataset_dir) / "train", shape).clamp(0, 1) * 2 - 1  # [-1, 1]
    unet, seconds = train(grids, unet_args, args.steps, args.batch_size, args.learning_rate, args.seed)
    torch.save({"unet_args": unet_args, "state_dict": unet.state_dict(), "steps": args.steps}, work / "pixel_unet.pt")
    sample(unet, shape, work, Path(args.model_dir).resolve(), args.num_samples, args.num_inference_steps)
    result = scaling.evaluate(
        work, Path(args.dataset_dir), Path(args.model_dir), Path(args.reference_file), work / "commands.log", True
    )
    changes = dict(n_train=len(grids), augment="on (voxel space)", steps=args.steps, minutes=seconds / 60)
    return {**result, **changes, "val_loss": float("nan")}


def _check_arguments(parser, args):
    """Refuse, in one line and before any training, inputs this run would otherwise fail on late."""
    dataset = Path(args.dataset_dir)
    if not (dataset / "dataset_info.json").is_file() or not any((dataset / "train").glob("*.nii.gz")):
        parser.error(f"--dataset_dir {dataset}: not a conversion with training grids (dataset_info.json, train/)")
    if not Path(args.reference_file).is_file():
        parser.error(f"--reference_file {args.reference_file}: no such file")
    if not (Path(args.model_dir) / "model_refiner.pt").is_file():
        parser.error(f"--model_dir {args.model_dir}: holds no fine stage (model_refiner.pt)")
    for item in args.beside:
        label, _, png = item.partition("=")
        if not label or not Path(png).is_file():
            parser.error(f"--beside {item!r}: give LABEL=PNG with an existing PNG (an evaluation's renderings.png)")
    if args.beside and not args.figure:
        parser.error("--beside: draws into --figure; give --figure too")


def main():
    parser = common.arg_parser(__doc__, "a tiny UNet, a few steps and samples: a smoke check", tmpdir=None)
    parser.add_argument("--work_dir", required=True, help="where the model, samples and scores go (kept)")
    parser.add_argument("--dataset_dir", required=True, help="a conversion (its train/ grids and train_points.h5)")
    parser.add_argument("--reference_file", required=True, help="the clouds the samples are scored against (h5)")
    parser.add_argument("--model_dir", default=str(ROOT / "models"), help="the fine stage (and the grid geometry)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=run_demo.DIFFUSION["batch_size"])
    parser.add_argument("--learning_rate", type=float, default=run_demo.DIFFUSION["learning_rate"])
    parser.add_argument("--num_samples", type=int, default=scaling.N_SCORED)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="training seed (sampling keeps seed 0)")
    parser.add_argument("--figure", default=None, help="a PNG: the test clouds' renders above the samples'")
    parser.add_argument(
        "--beside",
        action="append",
        default=[],
        metavar="LABEL=PNG",
        help="another run's evaluation renderings.png, drawn in the figure above this run's samples",
    )
    args = parser.parse_args()
    _check_arguments(parser, args)
    unet_args = {**UNET, **QUICK_UNET} if args.quick else UNET
    if args.quick:
        vars(args).update(QUICK)
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    load = common.load_average()
    result_file = work / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())  # trained, sampled and scored before: reported again
    else:
        result = run(args, unet_args, work)
        result_file.write_text(json.dumps(result, indent=1) + "\n")
    intro = (
        f"{common.describe_unet(unet_args)} on the {result['n_train']} training grids of {args.dataset_dir}, "
        f"{result['steps']} steps of batch {args.batch_size}; {args.num_samples} samples (seed 0) through the fine stage "
        f"of {args.model_dir}, against {args.reference_file}; minutes: training."
    )
    scaling.write_report(work, "Stage 2 in voxel space", args.quick, load, intro, [result])
    if args.figure:
        others = [tuple(b.split("=", 1)) for b in args.beside]  # checked: LABEL=PNG
        mine = (f"voxel space, {result['steps']} steps", work / "evaluation" / "renderings.png")
        scaling.strips([*others, mine], Path(args.figure))


if __name__ == "__main__":
    main()
