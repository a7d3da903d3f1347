"""Validation in training: every stage validates at its last epoch too, so a run shorter than ``val_interval``
leaves a ``best_model.pt`` for the next stage (a run whose last epoch is on the interval validates it once); an
interrupt during validation names the checkpoint that is intact, and nothing logs a traceback."""

import logging

import pytest
import torch
from conftest import ROOT, TINY_REFINER, diffusion_overrides, overrides, run_workflow
from ignite.engine import Engine, Events
from scripts.runtime.errors import Interrupted
from scripts.training.handlers import ValidationAtIntervalAndEnd


class _Recorded(ValidationAtIntervalAndEnd):
    def __init__(self, interval):
        super().__init__(interval)
        self.epochs = []

    def __call__(self, engine):
        self.epochs.append(engine.state.epoch)


@pytest.mark.parametrize(
    "n_epochs, interval, validated", [(3, 5, [3]), (10, 5, [5, 10]), (7, 3, [3, 6, 7]), (1, 1, [1]), (2, 2, [2])]
)
def test_the_last_epoch_is_validated_once(n_epochs, interval, validated):
    handler = _Recorded(interval)
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=n_epochs)
    assert handler.epochs == validated


def _best(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stage_1_shorter_than_the_interval_leaves_best_model(dataset_dir, tmp_path):
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path, n_epochs=2, val_interval=3))
    best = tmp_path / "outputs" / "autoencoder" / "best_model.pt"
    assert best.is_file() and _best(best)["best_metric_epoch"] == 2


def test_stage_2_shorter_than_the_interval_leaves_best_model(dataset_dir, autoencoder_ckpt, tmp_path):
    settings = diffusion_overrides(
        dataset_dir, autoencoder_ckpt, tmp_path, n_epochs=2, val_interval=4, generate_samples_interval=10
    )
    run_workflow("train_diffusion.json", **settings)
    best = tmp_path / "outputs" / "diffusion" / "best_model.pt"
    assert best.is_file() and _best(best)["best_metric_epoch"] == 2


def test_the_fine_stage_shorter_than_the_interval_leaves_best_model(dataset_dir, autoencoder_ckpt, tmp_path):
    run_workflow(
        "train_refiner.json",
        dataset_dir=str(dataset_dir),
        autoencoder_path=str(autoencoder_ckpt),
        ckpt_dir=str(tmp_path / "outputs" / "refiner"),
        log_dir=str(tmp_path / "logs" / "refiner"),
        **TINY_REFINER,
        batch_size=2,
        points_per_volume=64,
        fast_dev_run=True,
        n_epochs=1,
        val_interval=5,
        flow_steps=3,
    )
    best = tmp_path / "outputs" / "refiner" / "best_model.pt"
    assert best.is_file() and _best(best)["best_metric_epoch"] == 1


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_an_interrupt_during_validation_names_the_intact_checkpoint(
    stage, dataset_dir, autoencoder_ckpt, tmp_path, monkeypatch
):
    from monai.bundle import ConfigWorkflow

    settings = (
        overrides(dataset_dir, tmp_path, n_epochs=3)
        if stage == "autoencoder"
        else diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, n_epochs=3, generate_samples_interval=10)
    )
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / f"train_{stage}.json"), workflow_type="train", **settings
    )
    workflow.initialize()

    def ctrl_c_in_the_second_validation(engine):
        if engine.state.epoch == 2:
            raise KeyboardInterrupt

    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, ctrl_c_in_the_second_validation)
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(handler.format(record))
    trainer = workflow.parser.get_parsed_content("train#trainer")
    for logger in (logging.getLogger(), trainer.logger, evaluator.logger):  # engines log on their own loggers
        monkeypatch.setattr(logger, "disabled", False)  # (the workflows' fileConfig disables existing loggers)
        monkeypatch.setattr(logger, "propagate", False)
        monkeypatch.setattr(logger, "level", logging.INFO)
        logger.addHandler(handler)
    try:
        with pytest.raises(Interrupted) as caught:
            workflow.run()
    finally:
        for logger in (logging.getLogger(), trainer.logger, evaluator.logger):
            logger.removeHandler(handler)
    logged = "\n".join(records)
    latest = tmp_path / "outputs" / stage / "latest_checkpoint.pt"
    assert str(caught.value) == (
        f"interrupted by SIGINT; at epoch 2, iteration 4: {latest} (epoch 1) is intact; resume with --resume_from "
        f"{latest}"
    )
    assert "terminating due to exception" in logged and "Traceback" not in logged, logged
    assert "no checkpoint" not in logged, logged
