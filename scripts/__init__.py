"""Python parts of the point-cloud latent diffusion bundle (importable as ``scripts.*`` from the bundle root)."""
