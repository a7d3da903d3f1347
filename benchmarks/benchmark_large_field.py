"""Benchmark large fields: sliding-window decoding against whole-volume decoding, seams, a 20 × 20 × 1 µm field
sampled at 20 nm voxels, and how time and memory grow with the field's area.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_large_field.py [--quick] [--output F]

Every case uses the shipped networks (``models/``), each in a child process of its own, so its peak memory
(``ru_maxrss``) is its own:

1. **Decoding.** A latent of a 48-voxel-deep grid of growing width decoded by ``scripts.sampling.large_fields.decode_tiled``
   against ``AutoencoderKL.decode`` of the whole volume (the reference), which runs until it no longer fits in
   20 GiB of address space. Peak memory above what the process held before decoding, and as a multiple of one
   float32 output grid.
2. **Seams.** (a) Fields of 20 × 20 × 0.6 µm sampled at the shipped voxels (64 × 64 × 8 latents, tiles of
   16 × 16 × 8): how much more the latent and the decoded grid change across tile edges than elsewhere
   (``seam_jump``), and the mean density of the planes at tile edges against the others (``seam_contrast``), beside
   tiles denoised apart (overlap 0, the reference) and at overlap 0.25. (b) A simulated 20 µm field voxelized at the shipped voxels:
   the autoencoder's reconstruction by sliding window against the whole grid's.
3. **Fidelity at scale.** The sampled fields' points (fine stage) against a simulated 20 µm field of the training
   data's kind (``simulate_microtubules``, filaments and points scaled by area): nearest-neighbour and z
   distributions over the whole field, and in its central quarter against its outer ring.
4. **The target field.** 20 × 20 × 1 µm at 20 nm voxels (1000 × 1000 × 50), 10^6 points, RFlow-5, through
   ``scripts.sampling.sampler.Sampler``: the shipped networks with their geometry read at 20 nm (the networks do not see nm;
   what is measured is time and memory at this grid size, not the quality of a model trained at 20 nm).
5. **Scaling.** The same at fields of 2.5, 5, 7.07 and 10 µm (and the target's 20 µm): time and peak memory against
   area, with a least-squares line and its R².

``--quick`` runs each case at small sizes: a smoke check of the script, not a measurement.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

# isort: split
import numpy as np  # noqa: E402

GIB = 2**30
ADDRESS_LIMIT = 20 * GIB  # the whole-volume reference stops where it no longer fits
FULL = {
    "decode_widths": [256, 512, 1024],
    "depth": 48,
    "seam_samples": 16,
    "seam_field_um": 20.0,
    "target_um": 20.0,
    "scaling_um": [2.5, 5.0, 7.07, 10.0],
    "spacing_nm": 20.0,
    "depth_nm": 1000.0,
    "num_points_per_um2": 2500.0,  # 10^6 points over 20 × 20 µm
    "seam_steps": 10,
    "steps": 5,
}
QUICK = {
    "decode_widths": [32, 64],
    "depth": 16,
    "seam_samples": 2,
    "seam_field_um": 10.0,
    "target_um": 2.0,
    "scaling_um": [1.0, 1.5],
    "spacing_nm": 40.0,
    "depth_nm": 640.0,
    "num_points_per_um2": 500.0,
    "seam_steps": 2,
    "steps": 2,
}


# ------------------------------------------------------------------------------------------------ child processes


def rss_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shipped(device="cpu"):
    from scripts.networks import trained as weights

    models = ROOT / "models"
    autoencoder_ckpt = weights.load_autoencoder_checkpoint(models / "model_autoencoder.pt")
    ckpt = weights.load_diffusion_checkpoint(models / "model.pt", autoencoder_ckpt, models / "model_autoencoder.pt")
    refiner_ckpt = weights.load_refiner_checkpoint(models / "model_refiner.pt")
    return (
        autoencoder_ckpt,
        ckpt,
        refiner_ckpt,
        weights.frozen_autoencoder(autoencoder_ckpt, "", device),
        weights.trained_unet(ckpt, "", device),
        weights.trained_refiner(refiner_ckpt, "", device),
    )


def child_decode(width, depth, method):
    """Seconds and peak bytes above the start of decoding one latent of a ``width`` × ``width`` × ``depth`` grid."""
    import torch
    from scripts.sampling.large_fields import decode_tiled, decoding_window

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    _, ckpt, _, autoencoder, _, _ = shipped()
    latent = torch.randn((1, 3, width // 2, width // 2, depth // 2), generator=torch.Generator().manual_seed(0))
    base = rss_bytes()
    start = time.perf_counter()
    try:
        if method == "whole":
            with torch.no_grad():
                grid = autoencoder.decode_stage_2_outputs(latent / ckpt["scale_factor"])
        else:
            grid = decode_tiled(autoencoder, latent, ckpt["scale_factor"], decoding_window(ckpt["latent_shape"][1:]))
    except (RuntimeError, MemoryError) as e:
        return {"fits": False, "error": str(e).splitlines()[0][:120]}
    seconds = time.perf_counter() - start
    return {"fits": True, "seconds": seconds, "peak": peak_bytes() - base, "grid_bytes": grid.numel() * 4}


def child_sample(field_um, depth_nm, spacing_nm, num_points, steps, output_dir):
    """Seconds, peak bytes and the estimate of sampling one field through the Sampler, with the shipped networks'
    geometry read at ``spacing_nm`` voxels."""
    import copy

    from scripts.data.geometry import GridGeometry
    from scripts.data.pointclouds import read_point_clouds
    from scripts.sampling.sampler import Sampler

    autoencoder_ckpt, ckpt, refiner_ckpt, autoencoder, unet, refiner = shipped()
    ckpt, refiner_ckpt = copy.deepcopy(ckpt), copy.deepcopy(refiner_ckpt)
    for c in (ckpt, refiner_ckpt):
        box = GridGeometry.from_dict(c["dataset_info"]["geometry"])
        c["dataset_info"]["geometry"] = GridGeometry(
            box.box_min_nm, tuple(box.lo + spacing_nm * np.asarray(c["voxel_size"])), tuple(c["voxel_size"])
        ).to_dict()
    base = rss_bytes()
    start = time.perf_counter()
    sampler = Sampler(
        autoencoder,
        unet,
        ckpt,
        output_dir,
        num_samples=1,
        batch_size=1,
        overwrite=True,
        denoising={"num_inference_steps": steps},
        export={"method": "refine", "num_points": int(num_points)},
        fine_stage={"refiner": refiner, "checkpoint": refiner_ckpt},
        field={"size_nm": [field_um * 1000, field_um * 1000, depth_nm]},
    )
    estimate = sum(sampler_memory(sampler, ckpt, refiner))
    sampler.run()  # writes each sample as it is made and keeps none
    seconds = time.perf_counter() - start
    clouds = read_point_clouds(Path(output_dir) / "pointcloud" / "sample_0000.csv")[0]
    return {
        "seconds": seconds,
        "peak": peak_bytes() - base,
        "estimate": estimate,
        "grid": list(sampler.geometry.shape),
        "grid_bytes": int(np.prod(sampler.geometry.shape)) * 4,
        "points": len(clouds[0]),
        "inside": bool(sampler.geometry.inside(clouds[0]).all()),
        "files": {p.name: p.stat().st_size for p in Path(output_dir).rglob("*") if p.is_file()},
    }


def sampler_memory(sampler, ckpt, refiner):
    from scripts.sampling.large_fields import sampling_memory

    return sampling_memory(
        sampler.geometry.shape,
        (sampler.latent_shape[0], *sampler.field_latent),
        1,
        sampler.latent_shape[1:],
        sampler.sw_batch_size,
        ckpt["network_config"],
        sampler.factor,
        refiner,
        sampler.num_points,
    )


def child(case):
    function = {"decode": child_decode, "sample": child_sample}[case.pop("case")]
    print(json.dumps(function(**case)))


def run_child(**case):
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True, cwd=ROOT
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"fits": False, "error": (result.stderr.strip().splitlines() or ["killed"])[-1][:160]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------------ the cases


def decoding_rows(cfg):
    rows, whole_fits = [], True
    for width in cfg["decode_widths"]:
        for method in ("sliding window", "whole"):
            if method == "whole" and not whole_fits:
                rows.append((method, width, None))
                continue
            result = run_child(case="decode", width=width, depth=cfg["depth"], method=method.split()[0])
            whole_fits = whole_fits and (method != "whole" or result["fits"])
            rows.append((method, width, result))
            print(f"decode {method} {width}: {result}", file=sys.stderr, flush=True)
    lines = [
        "## 1. Decoding a field: sliding window (ours) against the whole volume (reference)",
        "",
        "| decoding | grid | s | peak above start (MiB) | × one float32 grid |",
        "|---|---|---:|---:|---:|",
    ]
    for method, width, r in rows:
        grid = f"{width} × {width} × {cfg['depth']}"
        if r is None or not r["fits"]:
            why = "not run: a smaller grid did not fit" if r is None else f"does not fit in 20 GiB ({r['error']})"
            lines.append(f"| {method} | {grid} | – | {why} | – |")
        else:
            ratio = r["peak"] / r["grid_bytes"]
            lines.append(f"| {method} | {grid} | {r['seconds']:.1f} | {r['peak'] / 2**20:.0f} | {ratio:.2f} |")
    return lines + [""]


def seam_rows(cfg):
    """Sections 2 and 3: seams between tiles, sliding-window decoding, and the sampled fields' fidelity."""
    import torch
    from scripts.data.geometry import GridGeometry

    autoencoder_ckpt, ckpt, refiner_ckpt, autoencoder, unet, refiner = shipped()
    tile = tuple(ckpt["latent_shape"][1:])
    training = GridGeometry.from_dict(ckpt["dataset_info"]["geometry"]).with_shape(tuple(ckpt["voxel_size"]))
    size_nm = np.array([cfg["seam_field_um"] * 1000, cfg["seam_field_um"] * 1000, training.size_nm[2]])
    grid_shape = tuple(int(round(s)) for s in size_nm / training.spacing_nm)
    latent_xy = grid_shape[0] // 2
    geometry = GridGeometry(training.box_min_nm, tuple(training.lo + size_nm), grid_shape)
    noise = torch.randn(
        (cfg["seam_samples"], 3, latent_xy, latent_xy, tile[2]), generator=torch.Generator().manual_seed(0)
    )
    lines, fields = _seam_table(cfg, ckpt, unet, autoencoder, noise, tile, size_nm, grid_shape, latent_xy)
    simulated = _simulated_field(training, size_nm)
    lines += _window_rows(autoencoder, simulated, geometry, tile, size_nm)
    lines += _fidelity_rows(ckpt, refiner, refiner_ckpt, fields[0.5], geometry, simulated)
    return lines + [""]


def _seam_table(cfg, ckpt, unet, autoencoder, noise, tile, size_nm, grid_shape, latent_xy):
    """The seams' table for tiles denoised apart and together; the decoded fields by overlap."""
    from benchmarks.seams import seam_contrast, seam_jump, tile_edges
    from scripts.networks.schedulers import make_scheduler
    from scripts.sampling.large_fields import decode_tiled, decoding_window, denoise_tiled

    lines = [
        f"## 2. Seams: {cfg['seam_samples']} fields of {size_nm[0] / 1000:g} × {size_nm[1] / 1000:g} × "
        f"{size_nm[2] / 1000:.1f} µm (grid {' × '.join(map(str, grid_shape))}, latent tiles "
        f"{' × '.join(map(str, tile))}, RFlow-{cfg['seam_steps']})",
        "",
        "| tiles | latent change x / y | grid change x / y | density step at edges x / y | controls x / y |",
        "|---|---:|---:|---:|---:|",
    ]
    fields = {}
    cases = (
        (0.0, "denoised apart, overlap 0 (reference)"),
        (0.25, "denoised together, overlap 0.25"),
        (0.5, "denoised together, overlap 0.5 (ours: the default)"),
    )
    for overlap, label in cases:
        scheduler = make_scheduler(ckpt["scheduler"], None, cfg["seam_steps"], eta=common.EULER_SAMPLING["eta"])
        latent = denoise_tiled(unet, scheduler, noise, tile, overlap, 16)
        grids = decode_tiled(autoencoder, latent, ckpt["scale_factor"], decoding_window(tile), tile_batch=8).clamp_(
            0, 1
        )
        edges = tile_edges(latent_xy, tile[0], overlap)
        grid_edges = [2 * e for e in edges]
        mean = grids[:, 0].mean(0).numpy()
        controls = [2 * (e + 3) for e in edges if all(abs(e + 3 - f) > 1 for f in edges) and e + 3 < latent_xy]
        cells = [
            " / ".join(f"{seam_jump(latent, edges, a):.3f}" for a in (0, 1)),
            " / ".join(f"{seam_jump(grids, grid_edges, a, 2):.3f}" for a in (0, 1)),
            " / ".join(f"{100 * seam_contrast(mean, grid_edges, a):+.1f} %" for a in (0, 1)),
            " / ".join(f"{100 * seam_contrast(mean, controls, a):+.1f} %" for a in (0, 1)),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        fields[overlap] = grids[:, 0, : grid_shape[0], : grid_shape[1], : grid_shape[2]].numpy()
        print(lines[-1], file=sys.stderr, flush=True)

    return lines, fields


def _simulated_field(training, size_nm):
    """One simulated field of ``size_nm``, with filaments and points in proportion to its area."""
    from scripts.simulate_smlm import simulate_microtubules

    area = size_nm[0] * size_nm[1] / 25e6  # in demo crops (5 × 5 µm)
    return simulate_microtubules(
        1,
        seed=7,
        box_min_nm=training.box_min_nm,
        box_size_nm=tuple(size_nm),
        filaments_per_cloud=(int(3 * area), int(6 * area)),
        mean_points=int(10000 * area),
    )[0]


def _window_rows(autoencoder, simulated, geometry, tile, size_nm):
    """The simulated field's reconstruction by sliding window against the whole grid's."""
    import torch
    from benchmarks.seams import seam_jump, tile_edges
    from scripts.data.voxelize import normalize_, voxelize
    from scripts.sampling.large_fields import decode_tiled, decoding_window

    lines = []
    real, _ = voxelize(simulated, geometry, "gaussian", 1.0, "trilinear")
    normalize_(real, "max")
    with torch.no_grad():
        z_mu, _ = autoencoder.encode(torch.from_numpy(real)[None, None])
        whole = autoencoder.decode(z_mu)
    for window, label in ((tile, "the UNet's tile"), (decoding_window(tile), "the decoder's window (ours)")):
        tiled = decode_tiled(autoencoder, z_mu, 1.0, window)
        difference = (tiled - whole).abs()
        edges = [2 * e for e in tile_edges(z_mu.shape[2], window[0], 0.25)]
        paired = [seam_jump(tiled, edges, a, 2) / seam_jump(whole, edges, a, 2) for a in (0, 1)]
        lines.append(
            f"\n- reconstruction of a simulated {size_nm[0] / 1000:g} µm field by sliding window ({label}, "
            f"{' × '.join(map(str, window))} latent voxels, overlap 0.25) against the whole grid's: max |difference| "
            f"{difference.max():.3f}, mean {difference.mean():.4f}; change across window edges relative to the whole "
            f"grid's there x / y {paired[0]:.3f} / {paired[1]:.3f}"
        )
    return lines + [""]


def _fidelity_rows(ckpt, refiner, refiner_ckpt, fields, geometry, simulated):
    """The sampled fields' points (fine stage) against the simulated field: density, NN distances and z, by region."""
    import torch
    from scripts.evaluation.metrics import compare_distributions, nn_distances_nm
    from scripts.networks.fine_stage import refine_grid, refine_slab

    points_per_mass = ckpt["dataset_info"]["points_per_mass"]["mean"]
    steps = refiner_ckpt["sampling"]["flow_steps"]
    clouds = []
    for i, grid in enumerate(fields):
        generator = torch.Generator().manual_seed(i)
        slab = refine_slab(grid.shape, refiner)
        clouds.append(
            refine_grid(
                refiner, grid, geometry, None, 0.0, steps, generator, slab_voxels=slab, points_per_mass=points_per_mass
            )
        )
    lines = [
        "## 3. Fidelity at scale: the sampled fields' points (fine stage) against a simulated field",
        "",
        "| region | points per µm² | NN distance mean (nm) | NN W1 to the simulated field (nm) | z W1 (nm) |",
        "|---|---:|---:|---:|---:|",
    ]
    reference_nn, reference_z = nn_distances_nm(simulated), simulated[:, 2]
    half, field_um2 = geometry.size_nm[:2] / 4, geometry.size_nm[0] * geometry.size_nm[1] / 1e6

    def central(p):  # the central quarter of the field's area
        return np.all(np.abs(p[:, :2] - (geometry.lo[:2] + 2 * half)) < half, axis=1)

    for name, select, fraction in (
        ("whole field", lambda p: np.ones(len(p), bool), 1.0),
        ("central quarter", central, 0.25),
        ("outer ring", lambda p: ~central(p), 0.75),
    ):
        nn, z, count = [], [], 0
        for cloud in clouds:
            mask = select(cloud)
            nn.append(nn_distances_nm(cloud)[mask])
            z.append(cloud[mask, 2])
            count += mask.sum()
        area_um2 = field_um2 * fraction
        nn_stats = compare_distributions(np.concatenate(nn), reference_nn)
        z_stats = compare_distributions(np.concatenate(z), reference_z)
        lines.append(
            f"| {name} | {count / len(clouds) / area_um2:.0f} | {nn_stats['mean']:.1f} | "
            f"{nn_stats['wasserstein']:.2f} | {z_stats['wasserstein']:.1f} |"
        )
    lines.append(
        f"| simulated field (reference) | {len(simulated) / field_um2:.0f} | {reference_nn.mean():.1f} | 0 | 0 |"
    )
    return lines


def target_and_scaling_rows(cfg, work):
    sizes = sorted(set(cfg["scaling_um"]) | {cfg["target_um"]})
    results = {}
    for size in sizes:
        points = cfg["num_points_per_um2"] * size * size
        results[size] = run_child(
            case="sample",
            field_um=size,
            depth_nm=cfg["depth_nm"],
            spacing_nm=cfg["spacing_nm"],
            num_points=points,
            steps=cfg["steps"],
            output_dir=str(work / f"field_{size:g}"),
        )
        print(f"field {size} µm: {results[size]}", file=sys.stderr, flush=True)
    target = results[cfg["target_um"]]
    lines = [
        f"## 4. The target: a {cfg['target_um']:g} × {cfg['target_um']:g} × {cfg['depth_nm'] / 1000:g} µm field at "
        f"{cfg['spacing_nm']:g} nm voxels, RFlow-{cfg['steps']}, the fine stage, on this machine's CPU",
        "",
    ]
    if "seconds" in target:
        lines += [
            f"- grid {' × '.join(map(str, target['grid']))} ({target['grid_bytes'] / 2**20:.0f} MiB as float32), "
            f"{target['points']:,} points, all inside the field: {target['inside']}",
            f"- {target['seconds']:.0f} s; peak memory above the start {target['peak'] / GIB:.2f} GiB "
            f"({target['peak'] / target['grid_bytes']:.1f} × the grid); the start-up estimate "
            f"{target['estimate'] / GIB:.2f} GiB",
            "- files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(target["files"].items())),
        ]
    else:
        lines.append(f"- failed: {target.get('error')}")
    lines += [
        "",
        "## 5. Scaling with the field's area",
        "",
        "| field (µm) | grid | area (µm²) | s | s per µm² | peak above start (MiB) | estimate (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ok = [s for s in sizes if "seconds" in results[s]]
    for size in ok:
        r = results[size]
        area = size * size
        lines.append(
            f"| {size:g} | {' × '.join(map(str, r['grid']))} | {area:g} | {r['seconds']:.1f} | "
            f"{r['seconds'] / area:.2f} | {r['peak'] / 2**20:.0f} | {r['estimate'] / 2**20:.0f} |"
        )
    if len(ok) >= 3:
        area = np.array([s * s for s in ok])
        for key, unit, scale in (("seconds", "s", 1.0), ("peak", "MiB", 2**-20)):
            values = np.array([results[s][key] * scale for s in ok])
            slope, intercept = np.polyfit(area, values, 1)
            fit = slope * area + intercept
            r2 = 1 - ((values - fit) ** 2).sum() / ((values - values.mean()) ** 2).sum()
            lines.append(
                f"\n- {key}: least-squares line {slope:.3g} {unit}/µm² × area + {intercept:.3g} {unit}, R² = {r2:.4f}"
            )
    return lines + [""]


def main():
    parser = common.arg_parser(__doc__, "small sizes: a smoke check of the script", tmpdir="sampled fields")
    parser.add_argument("--output", default=None, help="also write the report to this Markdown file")
    parser.add_argument("--child", default=None, help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    cfg = QUICK if args.quick else FULL
    import monai
    import torch

    load = common.load_average()
    lines = common.machine_header(
        "Large fields",
        args.quick,
        load,
        [torch, monai],
        note="shipped networks, CPU",
        torch_info=True,
        method="Large fields",
    )
    start = time.perf_counter()
    lines += decoding_rows(cfg)
    lines += seam_rows(cfg)
    with common.work_folder(__file__, args.tmpdir) as work:
        lines += target_and_scaling_rows(cfg, work)
    lines.append(f"Total: {time.perf_counter() - start:.0f} s.")
    report = "\n".join(lines)
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
