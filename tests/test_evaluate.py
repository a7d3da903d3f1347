import json
import shutil

import numpy as np
import pytest
from conftest import run_cli, run_workflow, user_error
from scripts.data.pointclouds import write_points_csv

ROWS = ["train_vs_heldout", "reconstruction", "mean_grid_baseline", "samples"]
SMALL = {"num_points": 256, "emd_points": 32, "num_pictures": 2}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def samples_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    run_workflow("inference.json", model_dir=str(model_dir), output_dir=str(out), num_samples=3, num_inference_steps=4)
    return out


@pytest.fixture(scope="module")
def evaluated(dataset_dir, model_dir, samples_dir, tmp_path_factory):
    """The evaluation of one sample plus an empty one (all grid values below the export threshold) against the two
    held-out clouds."""
    out, samples = tmp_path_factory.mktemp("evaluation"), tmp_path_factory.mktemp("with_empty") / "samples"
    shutil.copytree(samples_dir, samples)
    write_points_csv(samples / "pointcloud" / "sample_0001.csv", np.zeros((0, 3)))
    kept = ["nifti/sample_0000.nii.gz", "pointcloud/sample_0000.csv", "pointcloud/sample_0001.csv"]
    (samples / ".manifest.json").write_text(json.dumps({"files": kept}))  # as if the sampler had written them
    run_workflow(
        "evaluate.json",
        dataset_dir=str(dataset_dir),
        samples_dir=str(samples),
        model_dir=str(model_dir),
        output_dir=str(out),
        **SMALL,
    )
    return out


def test_evaluate_writes_metrics_json(evaluated):
    results = json.loads((evaluated / "metrics.json").read_text())
    assert results["settings"]["num_points"] == 256 and results["settings"]["n_heldout"] == 2
    assert list(results["rows"]) == ROWS
    for name in ROWS:
        row = results["rows"][name]
        assert row["n_reference"] == 2
        assert (row["n_generated"], row["n_empty"]) == ((1, 1) if name == "samples" else (2, 0))
        for metric in ("cd", "emd32"):
            assert set(row[metric]) == {"mmd", "cov", "1nna", "1nna_generated", "1nna_reference"}
            assert row[metric]["mmd"] >= 0 and 0 <= row[metric]["cov"] <= 1 and 0 <= row[metric]["1nna"] <= 1
        for key in ("nn_distance_nm", "z_nm", "linearity", "planarity", "pair_distance_nm", "cross_section_nm"):
            assert row[key]["wasserstein"] >= 0 and row[key]["reference_mean"] is not None
        assert 0 <= row["narrow_axis_z"]["mean"] <= 1
        assert 0 <= row["foreground_fraction"]["mean"] <= 1 and "wasserstein" in row["foreground_intensity"]
        # the realism test of each set's non-empty clouds: one sample cloud is too few to cross-validate
        realism = row["realism"]
        assert realism["n"] == row["n_generated"] and realism["folds"] == min(5, realism["n"])
        assert realism["accuracy"] is None if name == "samples" else 0 <= realism["accuracy"] <= 1
        assert set(realism["by_statistic"]) == {"point_count", "nn_distance_nm", "z_nm", "linearity", "planarity"} | {
            "pair_distance_nm"
        }
    grid = results["reconstruction_grids"]
    assert 0 <= grid["dice"]["mean"] <= 1 and 0 <= grid["iou"]["mean"] <= grid["dice"]["mean"]
    assert grid["psnr"]["mean"] > 0
    # training clouds are real clouds: their NN distances are far closer to the held-out ones than the baseline's
    w1 = {name: row["nn_distance_nm"]["wasserstein"] for name, row in results["rows"].items()}
    assert w1["train_vs_heldout"] < 0.5 * w1["mean_grid_baseline"]


def test_sets_are_balanced(dataset_dir, model_dir, samples_dir, tmp_path):
    """Three samples against two held-out clouds: every row compares two clouds with two."""
    run_workflow(
        "evaluate.json",
        dataset_dir=str(dataset_dir),
        samples_dir=str(samples_dir),
        model_dir=str(model_dir),
        output_dir=str(tmp_path / "e"),
        **{**SMALL, "emd_points": 0},
    )
    rows = json.loads((tmp_path / "e" / "metrics.json").read_text())["rows"]
    assert {(r["n_generated"] + r["n_empty"], r["n_reference"]) for r in rows.values()} == {(2, 2)}


def test_evaluate_writes_markdown_and_figures(evaluated):
    text = (evaluated / "metrics.md").read_text()
    for needle in ROWS + ["| set | n gen / n ref (empty) | MMD-CD (×10³)", "1-NNA-EMD", "| Dice | IoU | PSNR (dB) |"]:
        assert needle in text
    assert "## Structure statistics" in text and "| set | linearity | W1 | planarity | W1 |" in text
    assert "| across √λ3 (nm) | W1 (nm) | narrowest axis z share | W1 |" in text
    assert "| 1-NNA-CD (%) (gen / ref) | C2ST (%) |" in text and "C2ST (realism test): the 5-fold" in text
    assert "| set | point count | NN distance | z | linearity | planarity | pair distances |" in text
    for name in ("projections.png", "renderings.png", "nn_distance.png", "z.png", "linearity.png", "pair_distance.png"):
        assert (evaluated / name).read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_val_points", "voxels/val_points.h5: no such file; convert point clouds"),
        ("no_samples_dir", "nothing: no such samples folder; sample first"),
        ("no_sample_clouds", "samples/pointcloud: no sample point clouds (*.csv)"),
        ("emd_points", "emd_points: must be an integer in [0, num_points=256] or null, got 512"),
    ],
)
def test_evaluate_errors(dataset_dir, model_dir, samples_dir, tmp_path, case, message):
    data, samples, extra = dataset_dir, samples_dir, {}
    if case == "no_val_points":
        data = tmp_path / "voxels"
        shutil.copytree(dataset_dir, data)
        (data / "val_points.h5").unlink()
    if case == "no_samples_dir":
        samples = tmp_path / "nothing"
    if case == "no_sample_clouds":
        samples = tmp_path / "samples"
        (samples / "pointcloud").mkdir(parents=True)
    if case == "emd_points":
        extra["emd_points"] = 512
    overrides = {**SMALL, **extra, "dataset_dir": str(data), "samples_dir": str(samples)}
    with pytest.raises(Exception) as info:
        run_workflow("evaluate.json", model_dir=str(model_dir), output_dir=str(tmp_path / "out"), **overrides)
    assert message in str(user_error(info.value)), info.value
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_error_is_one_line(dataset_dir, model_dir, tmp_path):
    result = run_cli(
        "evaluate.json", dataset_dir=dataset_dir, samples_dir=tmp_path / "nothing", model_dir=model_dir, **SMALL
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nothing'}: no such samples folder; sample first: python -m monai.bundle run "
        "--config_file configs/inference.json"
    )


def test_demo_summary_has_the_realism_column(evaluated):
    from scripts.run_demo import summary

    metrics = json.loads((evaluated / "metrics.json").read_text())
    lines = summary(metrics).splitlines()
    assert "| C2ST % |" in lines[0]
    column = lines[0].split(" | ").index("C2ST %")
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[column] for line in lines[2 : 2 + len(ROWS)]}
    assert cells["samples"] == "–"  # too few clouds
    assert cells["train_vs_heldout"] == f"{metrics['rows']['train_vs_heldout']['realism']['accuracy'] * 100:.1f}"


def test_realism_test_can_be_turned_off(dataset_dir, model_dir, samples_dir, tmp_path):
    run_workflow(
        "evaluate.json",
        dataset_dir=str(dataset_dir),
        samples_dir=str(samples_dir),
        model_dir=str(model_dir),
        output_dir=str(tmp_path / "e"),
        **{**SMALL, "emd_points": 0, "sets": ["train_vs_heldout"], "realism_test": "false"},
    )
    results = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "realism" not in results["rows"]["train_vs_heldout"] and results["settings"]["realism_folds"] is None
    assert "C2ST" not in (tmp_path / "e" / "metrics.md").read_text()
