"""The one place settings are parsed: booleans, command-line ids, the packages the bundle needs."""

import re
from pathlib import Path

import pytest
from scripts.evaluation.evaluator import Evaluation
from scripts.runtime.command_line import check_flags, flag_names
from scripts.runtime.dependencies import PACKAGES, check_dependencies
from scripts.runtime.errors import UserError
from scripts.runtime.settings import check_command_line_ids, check_config, check_values, command_line_overrides, grouped
from scripts.runtime.validators import as_bool
from scripts.sampling.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]
MONAI_MAIN = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"


@pytest.mark.parametrize(
    "word, value",
    [
        (True, True),
        ("true", True),
        ("True", True),
        ("YES", True),
        (1, True),
        ("1", True),
        (False, False),
        ("false", False),
        ("False", False),
        ("no", False),
        (0, False),
        ("0", False),
    ],
)
def test_booleans_in_every_spelling(word, value):
    assert as_bool(word, "amp") is value


@pytest.mark.parametrize("word", ["maybe", "", 2, 0.5, None, "ture"])
def test_anything_else_is_refused_naming_the_setting(word):
    with pytest.raises(UserError, match=r"^amp: expected true or false"):
        as_bool(word, "amp")


def test_values_are_checked_and_parsed():
    assert check_values({"amp": "false", "attention_levels": "[false,true]", "n_epochs": 3}, "train_autoencoder") == {
        "amp": False,
        "attention_levels": [False, True],
        "n_epochs": 3,
    }
    with pytest.raises(UserError, match=r"^num_points: must be 1 or more, got -5"):
        check_values({"num_points": -5}, "inference")
    with pytest.raises(
        UserError, match=r"^scheduler: expected one of RFlow, DDPM, DDIM, got 'DDIN'; did you mean DDIM\?"
    ):
        check_values({"scheduler": "DDIN"}, "inference")


@pytest.mark.parametrize(
    "make, group, wrong",
    [
        (lambda o, **g: Sampler(None, None, {}, o, **g), "export", "formats"),
        (lambda o, **g: Sampler(None, None, {}, o, **g), "field", "size"),
        (lambda o, **g: Evaluation(o, o, {}, None, "ae.pt", o, **g), "metrics", "num_point"),
        (lambda o, **g: Evaluation(o, o, {}, None, "ae.pt", o, **g), "reference", "reference_file"),
    ],
)
def test_a_key_a_settings_group_lacks_is_refused_in_one_line(tmp_path, make, group, wrong):
    """The Sampler's and the Evaluation's grouped settings (``inference.json``'s ``sampler#export``, ...) refuse a
    key their group does not have, naming the group and what it has, before anything else is checked or written."""
    with pytest.raises(UserError, match=rf"^{group}: no setting '{wrong}' in this group; it has \w+, ") as error:
        make(tmp_path / "out", **{group: {wrong: 1}})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_grouped_settings_take_the_defaults_for_what_they_leave_out():
    settings = grouped({"export": {"method": "refine", "threshold": 0.1}}, export={"threshold": 0.3})
    assert settings == {"export": {"method": "refine", "threshold": 0.3}}
    assert grouped({"export": {"method": "refine"}}, export=None) == {"export": {"method": "refine"}}


def test_command_line_ids_of_a_bundle_run_only():
    argv = [MONAI_MAIN, "run", "--config_file", "configs/train_autoencoder.json", "--n_epochs", "2", "--amp=false"]
    assert command_line_overrides(argv) == {
        "config_file": "configs/train_autoencoder.json",
        "n_epochs": "2",
        "amp": "false",
    }
    assert command_line_overrides(["pytest", "--n_epochs", "2"]) is None
    assert command_line_overrides([MONAI_MAIN, "ckpt_export", "--n_epochs", "2"]) is None


def test_unknown_ids_are_refused_with_the_closest_known_one(monkeypatch):
    monkeypatch.chdir(ROOT)
    base = [
        MONAI_MAIN,
        "run",
        "--config_file",
        "['configs/train_autoencoder.json','configs/multi_gpu_train_autoencoder.json']",
    ]
    check_command_line_ids(base + ["--n_epochs", "2", "--train#handlers#0#_disabled_", "true", "--scale_lr", "true"])
    with pytest.raises(UserError, match=r"^n_epoch: no such setting in .*; did you mean n_epochs\?$"):
        check_command_line_ids(base + ["--n_epoch", "2"])
    with pytest.raises(UserError, match=r"^learnig_rate: .*did you mean learning_rate\?"):
        check_command_line_ids(base + ["--learnig_rate", "1e-4"])


def test_a_bundle_run_whose_parser_is_out_of_reach_fails_loudly(monkeypatch):
    # the settings check finds MONAI's parser on the call stack; if a MONAI release hides it, a bundle run must stop
    # instead of skipping every check, while a direct call (a notebook, a test) has nothing to check
    assert check_config("train_autoencoder") == {}
    monkeypatch.setattr("sys.argv", [MONAI_MAIN, "run", "--config_file", "configs/train_autoencoder.json"])
    with pytest.raises(RuntimeError, match=r"^check_config: no monai.bundle.ConfigParser on the call stack"):
        check_config("train_autoencoder")


def test_fire_flags_are_checked_against_the_function():
    def convert(h5_file=None, voxel_size=64, overwrite=False):
        pass

    assert flag_names(["--voxel-size", "3", "--overwrite=true", "x", "--", "--help"]) == ["voxel_size", "overwrite"]
    check_flags(convert, ["--h5_file", "a.h5", "--nooverwrite", "--help"])
    with pytest.raises(UserError, match=r"^--voxelsize: unknown option; did you mean voxel_size\?"):
        check_flags(convert, ["--voxelsize", "16"])


def test_requirements_name_every_package_the_bundle_imports():
    listed = {
        re.split(r"[<>=\[ ]", line)[0].strip().lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {pip for pip, _ in PACKAGES.values()} <= listed
    check_dependencies()  # all of them are installed here


def test_a_missing_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "einops" else real(name, *a))
    with pytest.raises(
        UserError,
        match=r"^requirements: einops \(for the attention blocks .*\) not installed; pip "
        r"install -r requirements.txt",
    ):
        check_dependencies()


def test_an_old_monai_is_one_line(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.4.0" if name == "monai" else real(name))
    with pytest.raises(UserError, match=r"^requirements: monai 1.4.0 is installed, but the bundle needs monai >= 1.5"):
        check_dependencies()
