"""The fine stage's trainer and evaluator (``configs/train_refiner.json``): flow matching of each localization's
offset from its anchor, validated by the NN-distance W1 of refined points."""

import numpy as np
import torch
from ignite.metrics import Metric
from monai.utils import CommonKeys
from scripts.evaluation.metrics import histogram_w1, nn_distances_nm
from scripts.networks.build import unwrap
from scripts.networks.fine_stage import couple, refine_grid
from scripts.training.engines import MixedPrecisionTrainer, SeededEvaluator, batch_images


class RefinerTrainer(MixedPrecisionTrainer):
    """The fine stage: flow matching of each training point's offset from its anchor voxel (see
    :mod:`scripts.networks.fine_stage`), on the real grid or, with probability ``reconstruction_fraction``, on the autoencoder's
    reconstruction of it, so the model learns to read what the decoder makes.

    Batches hold ``image`` (B, 1, X, Y, Z), optionally ``recon`` (the same shape) and ``points`` (B, n, 3) in
    continuous voxel coordinates of the grid.
    """

    def __init__(
        self,
        device,
        max_epochs,
        train_data_loader,
        refiner,
        optimizer,
        sigma_voxels,
        splat="trilinear",
        reconstruction_fraction=0.5,
        epoch_length=None,
        amp=True,
        train_handlers=None,
        cpu_bf16=True,
    ):
        self.refiner, self.optimizer = refiner, optimizer
        self.sigma_voxels, self.splat, self.reconstruction_fraction = sigma_voxels, splat, reconstruction_fraction
        super().__init__(device, max_epochs, train_data_loader, epoch_length, amp, train_handlers, ("g",), cpu_bf16)

    def _iteration(self, engine, batchdata):
        grids = self.images(batchdata)
        if "recon" in batchdata and self.reconstruction_fraction > 0:
            use = (torch.rand(len(grids)) < self.reconstruction_fraction).to(grids.device)
            grids = torch.where(
                use[:, None, None, None, None], batch_images(batchdata, grids.device, key="recon"), grids
            )
        anchors, offsets, index = couple_batch(batchdata["points"], grids.shape[2:], self.sigma_voxels, self.splat)
        self.refiner.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = unwrap(self.refiner).loss(
                grids, index.to(grids.device), anchors.to(grids.device), offsets.to(grids.device)
            )
        self.step(loss.float(), self.optimizer, "g", "refiner loss")
        return {CommonKeys.LOSS: loss.detach().item()}


def couple_batch(points, shape, sigma_voxels, splat):
    """:func:`scripts.networks.fine_stage.couple` for a batch of point sets (B, n, 3): anchors, offsets and volume indices."""
    anchors, offsets, index = [], [], []
    for b, pts in enumerate(points):
        a, o, _ = couple(pts, tuple(shape), sigma_voxels, splat)
        anchors.append(a)
        offsets.append(o)
        index.append(torch.full((len(a),), b, dtype=torch.long))
    return torch.cat(anchors), torch.cat(offsets), torch.cat(index)


class HistogramW1(Metric):
    """W1 (in the values' unit) between two streams of values, ``(generated, real)`` per update, pooled into
    histograms of ``bins`` bins up to ``max_value`` (larger values fall in the last bin). Histograms add across
    ranks, so the metric is the same under DDP as in one process; the bins make it exact to half a bin."""

    def __init__(self, max_value=500.0, bins=2000, output_transform=lambda x: x, device="cpu"):
        self.edges = np.linspace(0.0, max_value, bins + 1)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self.counts = torch.zeros((2, len(self.edges) - 1), dtype=torch.float64)

    def update(self, output):
        for row, values in enumerate(output):
            values = np.clip(np.asarray(values, np.float64), 0, self.edges[-1] - 1e-9)
            self.counts[row] += torch.from_numpy(np.histogram(values, self.edges)[0].astype(np.float64))

    def compute(self):
        import ignite.distributed as idist

        counts = idist.all_reduce(self.counts.clone()) if idist.get_world_size() > 1 else self.counts
        return histogram_w1(counts[0].numpy(), counts[1].numpy(), self.edges[1] - self.edges[0])


class RefinerEvaluator(SeededEvaluator):
    """Validation of the fine stage on real grids: each held-out grid is turned into as many points as its cloud
    holds, and the key metric ``val_nn_w1`` is the 1D Wasserstein distance (nm) between the generated and the real
    clouds' nearest-neighbour distances (lower is better)."""

    def __init__(
        self,
        device,
        val_data_loader,
        refiner,
        geometry,
        threshold=0.0,
        flow_steps=12,
        seed=0,
        epoch_length=None,
        val_handlers=None,
    ):
        metric = {"val_nn_w1": HistogramW1(output_transform=lambda out: (out["generated"], out["real"]))}
        super().__init__(device, val_data_loader, metric, seed, epoch_length, val_handlers)
        self.refiner, self.geometry, self.threshold, self.flow_steps = refiner, geometry, threshold, flow_steps

    def _iteration(self, engine, batchdata):
        unwrap(self.refiner).eval()
        grids, points = batchdata["image"], batchdata["points"]
        generated, real = [], []
        for grid, pts in zip(grids, points):
            geometry = self.geometry.with_shape(grid.shape[-3:])
            cloud = geometry.to_nm(pts.numpy())
            new = refine_grid(
                unwrap(self.refiner), grid[0], geometry, len(cloud), self.threshold, self.flow_steps, self.generator
            )
            generated.append(nn_distances_nm(new))
            real.append(nn_distances_nm(cloud))
        return {"generated": np.concatenate(generated), "real": np.concatenate(real)}
