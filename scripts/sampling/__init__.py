"""Sampling new clouds: the sampler and the tiled denoising and decoding of large fields."""
