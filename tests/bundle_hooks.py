"""Test-only hooks that overlay configs attach to a bundle run (``python -m monai.bundle run`` imports this module as
``tests.bundle_hooks`` from the bundle root)."""

import os
import time

import torch.distributed as dist
from ignite.engine import Events


def pause_after(trainer, iteration):
    """After ``iteration``, announce it on stdout and wait for the test's signal, so it can stop the process
    mid-epoch (an abandoned run, whose test is gone, exits)."""
    test = os.getppid()

    def pause(engine):
        print(f"paused at iteration {engine.state.iteration}", flush=True)
        while os.getppid() == test:
            time.sleep(0.1)
        raise SystemExit("the test that paused this run is gone")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), pause)


def record_files(trainer, sampler, datalist, path_pattern):
    """At each epoch start, append the files this rank's sampler yields to ``path_pattern.format(rank)``."""

    def record(engine):
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(path_pattern.format(rank), "a") as f:
            f.write(" ".join(datalist[i]["image"] for i in iter(sampler)) + "\n")

    trainer.add_event_handler(Events.EPOCH_STARTED, record)
