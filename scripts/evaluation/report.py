"""What an evaluation writes besides ``metrics.json``: the Markdown tables of ``metrics.md`` and the figures."""

import numpy as np
from scripts.evaluation.projections import projection_grid
from scripts.evaluation.rendering import render_points


def _num(value, scale=1.0, digits=2):
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _mean_std(stats, prefix="", scale=1.0, digits=1):
    return f"{_num(stats[prefix + 'mean'], scale, digits)} ± {_num(stats[prefix + 'std'], scale, digits)}"


def markdown_report(results):
    """The Markdown tables of ``metrics.md`` from the ``metrics.json`` dict."""
    settings, rows = results["settings"], results["rows"]
    sections = [_point_metrics(settings, rows), _smlm_statistics(rows), _structure_statistics(settings, rows)]
    sections += [_grid_statistics(settings, rows), _reconstructions(settings, results["reconstruction_grids"])]
    return "\n".join(line for section in sections for line in section)


def _point_metrics(settings, rows):
    emd = f"emd{settings['emd_points']}" if settings["emd_points"] else None
    lines = [
        "# Evaluation: generated point clouds against the held-out set",
        "",
        f"Held-out set: {settings['n_heldout']} clouds of `{settings['dataset_dir']}`; samples: "
        f"`{settings['samples_dir']}`. Rows: " + "; ".join(f"`{k}`: {v}" for k, v in settings["rows"].items()) + ".",
        "",
        "## Point-cloud metrics",
        "",
        f"Clouds subsampled to {settings['num_points']} points (seed {settings['seed']}), centred on the training box "
        f"and divided by its largest extent ({settings['largest_extent_nm']:.0f} nm). CD: the sum of the two mean "
        "squared nearest-neighbour distances"
        + (
            f"; EMD{settings['emd_points']}: mean matched distance of the exact assignment on the first "
            f"{settings['emd_points']} points of each subsample"
            if emd
            else ""
        )
        + ". 1-NNA: mean of the leave-one-out 1-NN accuracies on the generated and on the held-out clouds, each in "
        "brackets (50 % ideal, 100 % every cloud told apart, below 50 % copies of held-out clouds: expected for "
        "`reconstruction`, whose every cloud has its original in the held-out set; a high generated and a low held-out "
        "accuracy: generated clouds that sit between all real ones, such as blurred ones). COV is at most n gen / n "
        "ref and MMD falls as n gen grows: compare rows of equal size (sample as many clouds as are held out).",
    ]
    realism = settings.get("realism_folds") is not None
    if realism:
        lines += [
            "",
            f"C2ST (realism test): the {settings['realism_folds']}-fold (at most one fold per cloud) cross-validated "
            "accuracy ± its standard error over the folds of a logistic regression telling the set's non-empty clouds "
            "from as many held-out ones by their statistics (NN-distance, z, linearity and planarity quantiles, "
            "pair-distance histogram, point count): 50 % the sets cannot be told apart, 100 % always.",
        ]
    lines.append("")
    header = "| set | n gen / n ref (empty) | MMD-CD (×10³) | COV-CD (%) | 1-NNA-CD (%) (gen / ref) |"
    rule = "|---|---:|---:|---:|---:|"
    if realism:
        header += " C2ST (%) |"
        rule += "---:|"
    if emd:
        header += f" MMD-EMD{settings['emd_points']} (×10²) | COV-EMD (%) | 1-NNA-EMD (%) (gen / ref) |"
        rule += "---:|---:|---:|"
    lines += [header, rule]
    for name, row in rows.items():
        line = f"| {name} | {row['n_generated']} / {row['n_reference']} ({row['n_empty']}) |"
        for key, scale in (("cd", 1e3),) + (((emd, 1e2),) if emd else ()):
            m = row.get(key, {})
            line += f" {_num(m.get('mmd'), scale, 3)} | {_num(m.get('cov'), 100, 1)} | {_num(m.get('1nna'), 100, 1)}"
            line += f" ({_num(m.get('1nna_generated'), 100, 0)} / {_num(m.get('1nna_reference'), 100, 0)}) |"
            if key == "cd" and realism:
                c2st = row.get("realism") or {}
                line += f" {_num(c2st.get('accuracy'), 100, 1)}"
                line += f" ± {_num(c2st['stderr'], 100, 1)} |" if c2st.get("stderr") is not None else " |"
        lines.append(line)
    if realism:
        lines += _realism_by_statistic(rows)
    return lines


BY_STATISTIC = {
    "point_count": "point count",
    "nn_distance_nm": "NN distance",
    "z_nm": "z",
    "linearity": "linearity",
    "planarity": "planarity",
    "pair_distance_nm": "pair distances",
}


def _realism_by_statistic(rows):
    """The realism test on each statistic alone: which statistics give each set away."""
    rows = [(name, row["realism"]["by_statistic"]) for name, row in rows.items() if "by_statistic" in row["realism"]]
    if not rows:
        return []  # metrics.json of an earlier version
    intro = (
        "C2ST by statistic (%): the same test on each statistic's features alone. Near 50: the set matches the "
        "held-out clouds in it; near 100: it gives the set away by itself."
    )
    return ["", intro, "", *by_statistic_table("set", rows)]


def by_statistic_table(head, labelled):
    """A Markdown table of :func:`scripts.evaluation.realism.realism_by_statistic`'s accuracies (%), one row per
    ``(label, {statistic: accuracy})`` pair, under the first column's ``head``."""
    return [
        f"| {head} | " + " | ".join(BY_STATISTIC.values()) + " |",
        "|---|" + "---:|" * len(BY_STATISTIC),
        *(f"| {label} | " + " | ".join(_num(by.get(k), 100, 1) for k in BY_STATISTIC) + " |" for label, by in labelled),
    ]


def _statistics_table(rows, columns):
    """A table of one set per row: for each of ``columns`` ``(key, header, W1 header, scale, digits, W1 digits)``,
    the set's mean ± std and its W1 to the held-out distribution, under a first row of the held-out values."""
    first = next(iter(rows.values()))
    columns = [c for c in columns if c[0] in first]  # metrics.json of an earlier version may lack a statistic
    lines = [
        "| set | " + " | ".join(f"{header} | {w1}" for _, header, w1, *_ in columns) + " |",
        "|---|" + "---:|---:|" * len(columns),
        "| held-out | "
        + " | ".join(f"{_mean_std(first[k], 'reference_', s, d)} | –" for k, _, _, s, d, _ in columns)
        + " |",
    ]
    for name, row in rows.items():
        cells = [f"{_mean_std(row[k], '', s, d)} | {_num(row[k]['wasserstein'], s, w)}" for k, _, _, s, d, w in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _smlm_statistics(rows):
    intro = "Pooled over each set's full clouds (nm); W1: 1D Wasserstein distance to the held-out distribution (nm)."
    columns = [
        ("nn_distance_nm", "NN distance mean ± std (nm)", "NN distance W1 (nm)", 1, 1, 2),
        ("z_nm", "z mean ± std (nm)", "z W1 (nm)", 1, 1, 2),
    ]
    return ["", "## SMLM statistics", "", intro, "", *_statistics_table(rows, columns)]


def _structure_statistics(settings, rows):
    intro = (
        f"Linearity (λ1 − λ2) / λ1 and planarity (λ2 − λ3) / λ1 of the covariance of the points within "
        f"{settings['structure_radius_nm']:g} nm of each of up to 512 points per cloud; across: the width along its "
        "narrowest axis, √λ3 (nm), and that axis's z share, the absolute z component of its direction (0: the "
        "narrowest direction lies in xy, as on filaments imaged with a poorer axial precision; a tilted cross-section "
        "scores higher); pair distances: every "
        f"distance between {settings['pair_range_nm'][0]:g} and {settings['pair_range_nm'][1]:g} nm among 1000 "
        "points per cloud (the pair statistic behind Ripley's K). Mean ± std and W1 to the held-out distribution."
    )
    columns = [
        ("linearity", "linearity", "W1", 1, 3, 3),
        ("planarity", "planarity", "W1", 1, 3, 3),
        ("cross_section_nm", "across √λ3 (nm)", "W1 (nm)", 1, 1, 2),
        ("narrow_axis_z", "narrowest axis z share", "W1", 1, 2, 3),
        ("pair_distance_nm", "pair distance (nm)", "W1 (nm)", 1, 1, 2),
    ]
    return ["", "## Structure statistics", "", intro, "", *_statistics_table(rows, columns)]


def _grid_statistics(settings, rows):
    with_grids = {k: v for k, v in rows.items() if "foreground_fraction" in v}
    if not with_grids:
        return []
    intro = (
        f"Grids at the autoencoder's size {settings['voxel_size']}; foreground: values > {settings['threshold']}; "
        "intensity: values of foreground voxels; W1 against the held-out grids."
    )
    columns = [
        ("foreground_fraction", "foreground fraction (%)", "W1 (%)", 100, 2, 2),
        ("foreground_intensity", "foreground intensity", "W1", 1, 3, 3),
    ]
    return ["", "## Grid statistics", "", intro, "", *_statistics_table(with_grids, columns)]


def _reconstructions(settings, grid):
    return [
        "",
        "## Autoencoder reconstructions of the held-out grids",
        "",
        f"Per volume, mean ± std; foreground: values > {settings['threshold']}; PSNR with a data range of 1.",
        "",
        "| Dice | IoU | PSNR (dB) |",
        "|---:|---:|---:|",
        f"| {_mean_std(grid['dice'], '', 1, 3)} | {_mean_std(grid['iou'], '', 1, 3)} | "
        f"{_mean_std(grid['psnr'], '', 1, 2)} |",
        "",
        "Figures: `projections.png` (held-out | reconstruction | generated grids), `renderings.png` (held-out clouds "
        "above, generated below, one renderer and scale), and the distributions `nn_distance.png`, `z.png`, "
        "`linearity.png`, `planarity.png`, `pair_distance.png`.",
        "",
    ]


def write_figures(folder, ev, real_clouds, real_grids, recon_grids, sample_clouds, sample_grids, curves, rows):
    """``projections.png``, ``renderings.png`` and one histogram per statistic, for the :class:`Evaluation` ``ev``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = ev.num_pictures
    columns = [("held-out", real_grids), ("reconstruction", recon_grids), ("generated", sample_grids or [])]
    canvases = [(label, projection_grid([[g] for g in grids[:n]])) for label, grids in columns if grids]
    height = 4 * max(c.shape[0] / c.shape[1] for _, c in canvases) + 0.5
    fig, axes = plt.subplots(1, len(canvases), figsize=(4 * len(canvases), height), squeeze=False)
    for ax, (label, canvas) in zip(axes[0], canvases):
        ax.imshow(canvas, cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"{label}: maximum projections: xy, xz below, zy right", fontsize=9)
        ax.axis("off")
    _save(fig, folder / "projections.png")

    box = [(ev.geometry.box_min_nm[a], ev.geometry.box_max_nm[a]) for a in range(3)]
    pairs = [("held-out", real_clouds), ("generated", [c for c in sample_clouds if len(c)])]
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6.4), squeeze=False)
    for r, (label, clouds) in enumerate(pairs):
        for i, ax in enumerate(axes[r]):
            ax.axis("off")
            if i < len(clouds):
                image, meta = render_points(clouds[i], ev.pixel_nm, xy_range=box[:2], z_range=box[2])
                ax.imshow(image)
                ax.set_title(f"{label} {i}: {len(clouds[i])} pts, bar {meta['bar_nm']} nm", fontsize=8)
    _save(fig, folder / "renderings.png")

    top = 1.5 * max(float(np.percentile(v, 95)) for v in curves["nn_distance_nm"].values() if len(v))
    specs = (
        ("nn_distance_nm", np.linspace(0, top, ev.nn_bins + 1), "nearest-neighbour distance (nm)", " nm"),
        ("z_nm", np.linspace(*box[2], ev.z_bins + 1), "z (nm)", " nm"),
        ("linearity", np.linspace(0, 1, 41), "local linearity", ""),
        ("planarity", np.linspace(0, 1, 41), "local planarity", ""),
        ("pair_distance_nm", np.linspace(*ev.pair_range_nm, 49), "distance between point pairs (nm)", " nm"),
    )
    for key, edges, xlabel, unit in specs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, values in curves[key].items():
            if not len(values):
                continue
            density, _ = np.histogram(values, edges, density=True)
            if label == "held-out":
                ax.stairs(density, edges, label=label, linewidth=2.5, color="k")
            else:
                w1 = rows[label][key]["wasserstein"]  # None where the held-out clouds give no values to compare
                w1 = f" (W1 {w1:.3g}{unit})" if w1 is not None else ""
                ax.stairs(density, edges, label=f"{label}{w1}", linewidth=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.set_title(f"{xlabel.split(' (')[0]}: generated sets against the held-out clouds", fontsize=9)
        ax.legend(fontsize=8)
        _save(fig, folder / f"{key.replace('_nm', '')}.png")


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
