"""Stage 2 in other designs than the bundle's, beside its own, trained and scored the same way.

The question it answers: do the samples' meshes of short branched tubes come from the design of stage 2 (a 3D UNet
on the autoencoder's 16 × 16 × 8 × 3 latents, which learns little more than their Gaussian part:
``benchmark_stage2_layout.py``), or from what any small diffusion model learns from these clouds in a few thousand
steps? ``--design`` picks what is trained, with the bundle's rectified-flow loss (``engines.diffusion_loss``), the
flips and the quarter turns about z of ``train_diffusion.json``:

- ``voxels``: the demo's stage-2 UNet on the conversion's grids themselves (values in [0, 1] mapped to [-1, 1]);
- ``latent``: the demo's stage-2 UNet on the latents of ``--model_dir``'s autoencoder (draws of its posterior,
  scaled by the shipped stage 2's scale factor): the bundle's design, as the reference of this loop;
- ``folded``: those latents with their z axis folded into the channels, (3 · 8) × 16 × 16, under a 2D UNet over
  x and y (:data:`FOLDED_UNET`, 16 M parameters against the 3D UNet's 1.8 M): every layer sees the whole depth of
  the thin slab, where filaments lie nearly in its plane, and the budget buys a far larger network.

It samples ``--num_samples`` clouds (``--num_inference_steps`` steps, Euler's unless ``--eta``, sampling seed 0)
through the bundle's inference config (the shipped fine stage places their points) with the denoising swapped for
this model, and scores them with ``configs/evaluate.json`` against the reference clouds, as a scaling row
(``benchmark_stage2_scaling.evaluate``: every statistic of the card, the realism test and the copy check).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_stage2_designs.py --work_dir ~/runs/designs/folded \\
        --design folded --dataset_dir ~/runs/scaling/data1000/voxels_nifti --reference_file ~/runs/scaling/test_clouds.h5
"""

import functools
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
FOLDED_UNET = {  # 2D, over x and y; its channels are the latent's times its depth
    "spatial_dims": 2,
    "channels": [64, 128, 256],
    "attention_levels": [False, True, True],
    "num_head_channels": [0, 32, 32],
    "num_res_blocks": 2,
    "norm_num_groups": 32,
}
QUICK_FOLDED = {"channels": [16, 16, 32], "attention_levels": [False, False, True], "num_res_blocks": 1}
QUICK_FOLDED.update(num_head_channels=[0, 0, 16], norm_num_groups=8)
DESIGNS = ("voxels", "latent", "folded")
QUICK = {"steps": 4, "num_samples": 4, "num_inference_steps": 2}
RFLOW = {"objective": "rflow", "num_train_timesteps": 1000}  # train_diffusion.json's scheduler settings


def augment(batch, generator):
    """The flips in x and y and the quarter turns about z of ``train_diffusion.json``, one draw per batch."""
    if torch.rand(1, generator=generator) < 0.5:
        batch = batch.flip(2)
    if torch.rand(1, generator=generator) < 0.5:
        batch = batch.flip(3)
    return torch.rot90(batch, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))


class FoldedUNet(torch.nn.Module):
    """A 2D ``DiffusionModelUNet`` on latents (B, C, X, Y, Z) with Z folded into the channels: (B, C·Z, X, Y)."""

    def __init__(self, latent_shape, **unet_args):
        from monai.networks.nets import DiffusionModelUNet

        super().__init__()
        folded = latent_shape[0] * latent_shape[3]
        self.unet = DiffusionModelUNet(in_channels=folded, out_channels=folded, **unet_args)

    def forward(self, x, timesteps, **_):
        b, c, nx, ny, nz = x.shape
        folded = self.unet(x.permute(0, 1, 4, 2, 3).reshape(b, c * nz, nx, ny), timesteps=timesteps)
        return folded.reshape(b, c, nz, nx, ny).permute(0, 1, 3, 4, 2)


def train(draw, count, build, steps, batch_size, learning_rate, seed, log_every=100):
    """The UNet ``build()`` after ``steps`` optimizer steps of the bundle's rectified-flow loss on batches
    ``draw(index, generator)`` of ``count`` training items; with the seconds it took."""
    from scripts.networks.schedulers import training_scheduler
    from scripts.training.engines import diffusion_loss

    torch.manual_seed(seed)
    unet = build()
    generator = torch.Generator().manual_seed(seed)
    scheduler = training_scheduler(RFLOW)
    optimizer = torch.optim.Adam(unet.parameters(), lr=learning_rate)
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        index = torch.randint(count, (batch_size,), generator=generator)
        batch = augment(draw(index, generator), generator)
        loss = diffusion_loss(unet, scheduler, batch, torch.autocast("cpu", enabled=False))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        if step % log_every == 0:
            print(f"step {step}: loss {running / log_every:.4f}", file=sys.stderr, flush=True)
            running = 0.0
    return unet.eval(), time.perf_counter() - start


def voxel_sampler(unet, shape, num_inference_steps, eta):
    """A stand-in for ``schedulers.sample_grids`` with its signature: grids drawn by ``unet`` in voxel space."""
    from monai.inferers import DiffusionInferer
    from scripts.networks.schedulers import make_scheduler

    scheduler = make_scheduler(RFLOW, None, num_inference_steps, eta=eta)

    def sample_grids(autoencoder, _unet, _scheduler, scale_factor, latent_shape, n, device, generator=None, *_, **__):
        noise = torch.randn((n, 1, *shape), generator=generator)
        with torch.no_grad():
            grids = DiffusionInferer(scheduler).sample(input_noise=noise, diffusion_model=unet, scheduler=scheduler)
        return (grids + 1) / 2

    return sample_grids


def training_data(design, dataset, model_dir):
    """The design's training items: ``(count, draw(index, generator) → batch, shape of one item)``."""
    if design == "voxels":
        shape = json.loads((dataset / "dataset_info.json").read_text())["geometry"]["shape"]
        grids = scaling.training_grids(dataset / "train", shape).clamp(0, 1) * 2 - 1  # [-1, 1]
        return len(grids), lambda index, _: grids[index], shape
    from benchmarks.benchmark_stage2_layout import encoded_grids
    from scripts.networks import trained
    from scripts.networks.checkpoints import load_checkpoint
    from scripts.training.latents import sample_latents

    _, mean, spread = encoded_grids(trained.checkpoint_path(model_dir, "autoencoder"), str(dataset / "train"), None)
    # the model_dir's stage-2 latent scale, which sampling applies
    scale = load_checkpoint(trained.checkpoint_path(model_dir, "diffusion"), "diffusion")["scale_factor"]

    def draw(index, generator):  # a fresh draw of the posterior each step, as train_diffusion.json's default
        return sample_latents({"z_mu": mean[index], "z_sigma": spread[index]}, None, "cpu", generator) * scale

    return len(mean), draw, list(mean.shape[1:])


def network_args(design, quick):
    """The design's UNet settings (the tests' tiny ones with ``quick``)."""
    if design == "folded":
        return {**FOLDED_UNET, **(QUICK_FOLDED if quick else {})}
    return {**UNET, **(QUICK_UNET if quick else {})}


def network(design, unet_args, shape):
    from monai.networks.nets import DiffusionModelUNet

    if design == "folded":
        return FoldedUNet(shape, **unet_args)
    channels = 1 if design == "voxels" else shape[0]
    return DiffusionModelUNet(**{**unet_args, "in_channels": channels, "out_channels": channels})


def sample(design, unet, shape, out, model_dir, args):
    """The bundle's inference (its fine stage and writers) with the denoising swapped for ``unet`` (and, in voxel
    space, the decoding left out)."""
    import scripts.sampling.sampler as sampler

    original = sampler.sample_grids
    if design == "voxels":
        sampler.sample_grids = voxel_sampler(unet, shape, args.num_inference_steps, args.eta)
    try:
        workflow = common.open_workflow(
            ROOT / "configs" / "inference.json",
            {
                "model_dir": str(model_dir),
                "output_dir": str(out / "samples"),
                "num_samples": args.num_samples,
                "output_formats": ["nifti", "csv", "h5"],
                "batch_size": 10,
                "seed": 0,
                "num_inference_steps": args.num_inference_steps,
                "eta": args.eta,
                "overwrite": True,
            },
        )
        if design != "voxels":  # the latent designs keep the bundle's scheduler, scale and decoder
            workflow.parser["unet"] = unet.to(workflow.parser.get_parsed_content("device"))
        common.run_workflow(workflow)
    finally:
        sampler.sample_grids = original


LABELS = {"voxels": "voxel space", "latent": "3D UNet", "folded": "2D UNet, z folded"}


def run(args, unet_args, work):
    """Train, sample and score; the scaling row's result with this run's size, steps and training minutes."""
    dataset, model_dir = Path(args.dataset_dir), Path(args.model_dir).resolve()
    count, draw, shape = training_data(args.design, dataset, model_dir)
    build = functools.partial(network, args.design, unet_args, shape)
    unet, seconds = train(draw, count, build, args.steps, args.batch_size, args.learning_rate, args.seed)
    saved = {"design": args.design, "unet_args": unet_args, "state_dict": unet.state_dict(), "steps": args.steps}
    torch.save(saved, work / "stage2.pt")
    sample(args.design, unet, shape, work, model_dir, args)
    result = scaling.evaluate(work, dataset, model_dir, Path(args.reference_file), work / "commands.log", True)
    changes = dict(n_train=count, augment=f"on ({LABELS[args.design]})", steps=args.steps, minutes=seconds / 60)
    changes.update(design=args.design)
    parameters = sum(p.numel() for p in unet.parameters())
    return {**result, **changes, "val_loss": float("nan"), "parameters": parameters}


def _check_arguments(parser, args):
    """Refuse, in one line and before any training, inputs this run would otherwise fail on late."""
    dataset = Path(args.dataset_dir)
    if not (dataset / "dataset_info.json").is_file() or not any((dataset / "train").glob("*.nii.gz")):
        parser.error(f"--dataset_dir {dataset}: not a conversion with training grids (dataset_info.json, train/)")
    if not Path(args.reference_file).is_file():
        parser.error(f"--reference_file {args.reference_file}: no such file")
    from scripts.networks.trained import checkpoint_path

    stages = ("refiner",) if args.design == "voxels" else ("refiner", "autoencoder", "diffusion")
    for stage in stages:  # the fine stage; the latent designs also encode and scale as the shipped stage 2
        if not Path(checkpoint_path(args.model_dir, stage)).is_file():
            parser.error(f"--model_dir {args.model_dir}: holds no {stage} checkpoint")
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
    parser.add_argument(
        "--model_dir",
        default=str(ROOT / "models"),
        help="the fine stage (latent designs: and its autoencoder, stage 2)",
    )
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=run_demo.DIFFUSION["batch_size"])
    parser.add_argument("--learning_rate", type=float, default=run_demo.DIFFUSION["learning_rate"])
    parser.add_argument("--num_samples", type=int, default=scaling.N_SCORED)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.0, help="fresh noise below noise level 0.5 (0: Euler's steps)")
    parser.add_argument("--design", choices=DESIGNS, default="voxels", help="what stage 2 is trained on, and how")
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
    unet_args = network_args(args.design, args.quick)
    if args.quick:
        vars(args).update(QUICK)
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    load = common.load_average()
    result_file = work / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())  # trained, sampled and scored before: reported again
        if result.get("design", "voxels") != args.design:
            parser.error(f"--work_dir {work}: holds the {result.get('design', 'voxels')} design's run; use another")
    else:
        result = run(args, unet_args, work)
        result_file.write_text(json.dumps(result, indent=1) + "\n")
    intro = (
        f"{LABELS[args.design]}: {common.describe_unet(unet_args)}, {result.get('parameters', 0) / 1e6:.1f} M "
        f"parameters, on the {result['n_train']} training grids of {args.dataset_dir}, {result['steps']} steps of "
        f"batch {args.batch_size}; {args.num_samples} samples (seed 0, {args.num_inference_steps} steps, eta "
        f"{args.eta:g}) through the fine stage of {args.model_dir}, against {args.reference_file}; minutes: training."
    )
    scaling.write_report(work, f"Stage 2 designs: {LABELS[args.design]}", args.quick, load, intro, [result])
    if args.figure:
        others = [tuple(b.split("=", 1)) for b in args.beside]  # checked: LABEL=PNG
        mine = (f"{LABELS[args.design]}, {result['steps']} steps", work / "evaluation" / "renderings.png")
        scaling.strips([*others, mine], Path(args.figure))


if __name__ == "__main__":
    main()
