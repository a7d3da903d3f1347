"""Which trained weights sampling and evaluation use, the networks loaded from them, and publishing them.

Sampling reads the user's trained outputs (``outputs/``) when they hold a stage-2 checkpoint, and otherwise the
weights shipped in ``models/`` (the Model Zoo layout of :mod:`scripts.networks.checkpoints`), so a downloaded bundle samples
at once; ``model_dir`` chooses a folder of either layout. The weights used are always logged.

Publish trained weights in the shipped layout (what ``ckpt_export``'s defaults and the zoo read)::

    python scripts/weights.py --model_dir outputs --output_dir models [--overwrite true] [--without_refiner true]
        [--eta 0] [--eta_below 0.5]

``--eta`` and ``--eta_below`` record the rectified-flow sampler's fresh noise these weights sample best with: it is
then their default (``inference.json``'s ``eta: null``), as the fine stage's ``flow_steps`` is.
"""

import json
import logging
from pathlib import Path

from scripts.networks.build import build_autoencoder, build_unet
from scripts.networks.checkpoints import (
    SHIPPED_FILES,
    SHIPPED_INFO,
    WEIGHTS,
    load_checkpoint,
    load_state,
    ship_checkpoint,
    weights_sha256,
)
from scripts.networks.schedulers import objective
from scripts.runtime.errors import UserError
from scripts.runtime.output_folders import StagedOutput
from scripts.runtime.settings import check_values

logger = logging.getLogger(__name__)
STAGES = ("autoencoder", "diffusion", "refiner")
STAGE1_HINT = "train stage 1 first: python -m monai.bundle run --config_file configs/train_autoencoder.json"
STAGE2_HINT = "train stage 2 first: python -m monai.bundle run --config_file configs/train_diffusion.json"
REFINER_HINT = "train the fine stage first: python -m monai.bundle run --config_file configs/train_refiner.json"


def checkpoint_path(model_dir, stage):
    """``stage``'s checkpoint in ``model_dir``: ``<stage>/best_model.pt`` (training layout) or its shipped file;
    the training path when neither exists (so a missing checkpoint is named as training writes it)."""
    trained = Path(model_dir) / stage / "best_model.pt"
    shipped = Path(model_dir) / SHIPPED_FILES[stage]
    return str(shipped if not trained.is_file() and shipped.is_file() else trained)


def default_model_dir(bundle_root):
    """``outputs/`` when it holds a trained stage-2 checkpoint, else the shipped ``models/`` (logged either way)."""
    outputs, models = Path(bundle_root) / "outputs", Path(bundle_root) / "models"
    if Path(checkpoint_path(outputs, "diffusion")).is_file() or not (models / SHIPPED_FILES["diffusion"]).is_file():
        return str(outputs)
    logger.info(f"no trained weights in {outputs}: using the weights shipped in {models}")
    return str(models)


def _loaded(path, stage, hint):
    ckpt = load_checkpoint(path, stage, hint=hint)
    logger.info(f"{stage} weights: {path} (epoch {ckpt.get('epoch')})")
    return ckpt


def load_autoencoder_checkpoint(path):
    """The stage-1 checkpoint, refused with one line when missing, corrupt or of another stage."""
    ckpt = _loaded(path, "autoencoder", STAGE1_HINT)
    for key in ("network_config", "autoencoder", "voxel_size"):
        if key not in ckpt:
            raise UserError(f"{path}: has no {key!r}; {STAGE1_HINT}")
    return ckpt


def frozen_autoencoder(checkpoint, path, device):
    """The AutoencoderKL built from the hyper-parameters stored in its checkpoint, in eval mode, without grads."""
    network = build_autoencoder(checkpoint["network_config"]["autoencoder"])
    load_state(network, checkpoint["autoencoder"], path, "autoencoder")
    network.to(device).eval().requires_grad_(False)
    return network


def load_diffusion_checkpoint(diffusion_path, autoencoder_checkpoint, autoencoder_path):
    """The stage-2 checkpoint, refused when it was trained on another autoencoder or lacks the data geometry."""
    ckpt = _loaded(diffusion_path, "diffusion", STAGE2_HINT)
    sha = weights_sha256(autoencoder_checkpoint["autoencoder"])
    if ckpt.get("autoencoder_weights_sha256") != sha:
        raise UserError(
            f"{diffusion_path}: was trained on other autoencoder weights (sha256 "
            f"{str(ckpt.get('autoencoder_weights_sha256'))[:12]}) than those in {autoencoder_path} (sha256 "
            f"{sha[:12]}); sample with that autoencoder or retrain stage 2"
        )
    geometry = (ckpt.get("dataset_info") or {}).get("geometry")
    if not geometry:
        raise UserError(f"{diffusion_path}: holds no data geometry (dataset_info); retrain on converted data")
    return ckpt


def weights_key(checkpoint, stage):
    """The entry of ``checkpoint`` whose weights are used: the UNet's moving average where there is one, else the
    stage's weights (``unet``, ``autoencoder``, ``refiner``)."""
    return "unet_ema" if "unet_ema" in checkpoint else WEIGHTS[stage]


def trained_unet(checkpoint, path, device):
    """The diffusion UNet built from the hyper-parameters in its checkpoint, with its exponential moving average
    of weights (``unet_ema``; the raw ``unet`` weights for checkpoints without one), in eval mode."""
    unet = build_unet(checkpoint["network_config"]["unet"])
    key = weights_key(checkpoint, "diffusion")
    load_state(unet, checkpoint[key], path, key)
    return unet.to(device).eval()


def start_from(network, pretrained, stage, resume_from=None):
    """``network`` with the weights of the checkpoint ``pretrained`` (a ``stage`` checkpoint: a training run's
    ``best_model.pt`` or ``latest_checkpoint.pt``, or a shipped file such as ``models/model_autoencoder.pt``), to
    fine-tune it on other clouds; ``network`` as built when ``pretrained`` is None.

    Only the weights are taken (for stage 2 its moving average where the checkpoint has one): epochs, optimizer and
    learning-rate schedule start afresh. ``resume_from`` continues a run with its own weights instead, so the two
    together are refused. Weights that do not fit the network the config builds are refused in one line.
    """
    if pretrained is None:
        return network
    if resume_from:
        raise UserError(
            f"pretrained: {pretrained} and resume_from {resume_from} are both set; resume_from continues that run "
            "with its own weights, pretrained starts a new run from other weights: set one"
        )
    ckpt = load_checkpoint(pretrained, stage)
    key = weights_key(ckpt, stage)
    try:
        load_state(network, ckpt[key], pretrained, key)
    except UserError as e:
        built = ckpt.get("network_config", {}).get({"diffusion": "unet"}.get(stage, stage), {})
        shown = ", ".join(
            f"{k} {v}" for k, v in built.items() if k not in ("spatial_dims", "in_channels", "out_channels")
        )
        raise UserError(f"{e}; set the network settings they were trained with ({shown})") from None
    logger.info(f"{stage}: starting from the weights of {pretrained} ({key}, epoch {ckpt.get('epoch')})")
    return network


def load_refiner_checkpoint(path):
    """The fine stage's checkpoint, refused with one line when missing, corrupt or of another stage."""
    return _loaded(path, "refiner", REFINER_HINT)


def trained_refiner(checkpoint, path, device="cpu"):
    """The fine stage's network built from the settings in its checkpoint, with its weights, in eval mode."""
    from scripts.networks.fine_stage import Refiner

    refiner = Refiner(**checkpoint["network_config"]["refiner"])
    load_state(refiner, checkpoint["refiner"], path, "refiner")
    return refiner.to(device).eval().requires_grad_(False)


def measured_background(dataset_dir, autoencoder_checkpoint, autoencoder_path):
    """The fine stage's background level measured on ``dataset_dir``'s training grids and their reconstructions by
    the autoencoder of ``autoencoder_checkpoint``, as the fine stage's training records it."""
    from scripts.data.datasets import cloud_items, grid_geometry, list_volumes, load_dataset_info, volume_transforms
    from scripts.networks.fine_stage import background_level

    train = Path(dataset_dir) / "train"
    info = load_dataset_info(train)
    voxel_size = tuple(autoencoder_checkpoint["voxel_size"])
    autoencoder = frozen_autoencoder(autoencoder_checkpoint, autoencoder_path, "cpu")
    items = cloud_items(
        list_volumes(train, "training folder"),
        Path(dataset_dir) / "train_points.h5",
        volume_transforms(voxel_size),
        grid_geometry(info, voxel_size),
        autoencoder,
        batch_size=8,
    )
    level = background_level(items, info)
    logger.info(f"background level {level:.3g}, measured on {len(items)} training grids of {dataset_dir}")
    return level


def publish(
    model_dir="outputs",
    output_dir="models",
    overwrite=False,
    without_refiner=False,
    eta=None,
    eta_below=None,
    background_from=None,
):
    """Write the checkpoints of ``model_dir`` (training layout) to ``output_dir`` in the shipped layout, as one set.

    The autoencoder and the diffusion model are needed (and must belong together); the fine stage is written when
    it exists and ``without_refiner`` is false. The set is staged and swapped in at once
    (:class:`scripts.runtime.output_folders.StagedOutput`): a failure (a full disk) leaves the earlier set as it was, and a
    replaced set leaves none of its files behind. An earlier set is replaced only with ``overwrite``, and one with
    a fine stage only by a set with one or with ``without_refiner``. ``eta``, ``eta_below``: the sampling defaults
    recorded with stage 2 (its checkpoint's ``sampling``; rectified flow only). ``background_from``: a converted
    data folder whose training grids measure the fine stage's background level again
    (:func:`scripts.networks.fine_stage.background_level`, with this set's autoencoder), for a fine stage trained
    before it was recorded. Returns the files written.
    """
    recorded = {
        k: v for k, v in check_values({"eta": eta, "eta_below": eta_below}, "inference").items() if v is not None
    }
    model_dir, out = Path(model_dir), Path(output_dir)
    paths = {stage: model_dir / stage / "best_model.pt" for stage in STAGES}
    shipped = [model_dir / name for name in (SHIPPED_INFO, *SHIPPED_FILES.values())]
    if not paths["autoencoder"].is_file() and any(p.is_file() for p in shipped):
        raise UserError(
            f"{model_dir}: holds published weights (model.pt, {SHIPPED_INFO}), not training outputs; pass the "
            "folder training wrote, e.g. --model_dir outputs (it holds autoencoder/best_model.pt)"
        )
    ckpts = {"autoencoder": load_autoencoder_checkpoint(paths["autoencoder"])}
    ckpts["diffusion"] = load_diffusion_checkpoint(paths["diffusion"], ckpts["autoencoder"], paths["autoencoder"])
    if recorded:
        if objective(ckpts["diffusion"]["scheduler"]) != "rflow":
            raise UserError(
                f"--{next(iter(recorded))}: only rectified-flow sampling draws fresh noise; this stage 2 "
                f"was trained with the {objective(ckpts['diffusion']['scheduler'])} objective"
            )
        ckpts["diffusion"]["sampling"] = {**(ckpts["diffusion"].get("sampling") or {}), **recorded}
    if paths["refiner"].is_file() and not without_refiner:
        ckpts["refiner"] = load_refiner_checkpoint(paths["refiner"])
    if background_from is not None and "refiner" not in ckpts:
        raise UserError(
            f"--background_from: the background level is recorded with the fine stage, and this set publishes none "
            f"({paths['refiner']}: no such checkpoint, or --without_refiner)"
        )
    staged = StagedOutput(out, "published weights", [SHIPPED_INFO, *SHIPPED_FILES.values()], overwrite)
    earlier = staged.check()
    stale = out / SHIPPED_FILES["refiner"]
    if "refiner" not in ckpts and stale.exists():  # it would stay beside weights it does not belong to
        if not without_refiner:
            raise UserError(
                f"{paths['refiner']}: no such checkpoint, but the set in {out} being replaced has a fine stage "
                f"({stale.name}); {REFINER_HINT}; or pass --without_refiner true to publish the set without it "
                "(sampling then places points by --method probabilistic)"
            )
        if stale.name not in earlier:
            raise UserError(f"{stale}: was not published with the set in {out}, so publishing keeps it; move it away")
    if background_from is not None:  # minutes of reconstructions: only once the output folder is known to be usable
        level = measured_background(background_from, ckpts["autoencoder"], paths["autoencoder"])
        ckpts["refiner"]["sampling"] = {**ckpts["refiner"]["sampling"], "background": level}
    try:
        with staged as staging:
            info = {}
            for ckpt in ckpts.values():
                path, entry = ship_checkpoint(ckpt, staging)
                info[path.name] = entry
            (staging / SHIPPED_INFO).write_text(json.dumps(info, indent=4) + "\n")
    except OSError as e:
        raise UserError(
            f"{out}: could not write the published set ({e.strerror or e}); the earlier set there is unchanged"
        ) from None
    written = [out / name for name in (*info, SHIPPED_INFO)]
    print(f"published {', '.join(p.name for p in written)} to {out}")
    return written
