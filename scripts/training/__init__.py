"""The training engines, their handlers, the losses and the stage-2 latent cache."""
