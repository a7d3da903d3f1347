"""Python parts of the point-cloud latent diffusion bundle (importable as ``scripts.*`` from the bundle root).

Importing the package makes an uncaught :class:`scripts.errors.UserError` print as one line, so that
``python -m monai.bundle run`` reports a bad file, key or setting without a stack trace.
"""

from scripts.errors import install_excepthook

install_excepthook()
