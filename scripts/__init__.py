"""Python parts of the point-cloud latent diffusion bundle (importable as ``scripts.*`` from the bundle root).

The files here are the command lines the README names; the code they and the configs use is grouped by role:
``data`` (clouds, grids, the box, datasets), ``networks`` (networks, schedulers, checkpoints, trained weights),
``training`` (engines, handlers, losses, latent cache), ``sampling``, ``evaluation`` (metrics, report, pictures)
and ``runtime`` (settings, errors, output folders, command lines). Importing any of them changes no hook, signal
handler or exit path: a run installs its one-line error reporting where it starts (the configs' ``initialize``,
:func:`scripts.runtime.command_line.main`).
"""
