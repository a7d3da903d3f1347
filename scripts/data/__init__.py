"""Point clouds and grids: reading and writing them, the box they live in, voxelization, the datasets."""
