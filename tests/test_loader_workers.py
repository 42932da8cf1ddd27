"""The MONAI loader with persistent workers (pipelines.loader_workers): one loader per run,
patches a function of (seed, epoch, rank, volume) whatever the number of workers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from pipelines.config import load_config
from pipelines.data import build_dataset, make_loader, patch_batches, training_transform
from pipelines.loader_workers import resolve_num_workers
from planar3d.data.manifest import Case


def _cases(folder, count=3, shape=(12, 10, 6)):
    cases = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        image = (rng.normal(40, 8, shape) + (rng.random(shape) > 0.3) * rng.normal(300, 30, shape)).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[3:6, 2:5, 1:3] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"c{seed}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"c{seed}_label.nii.gz")
        cases.append(Case(f"c{seed}", folder / f"c{seed}.nii.gz", folder / f"c{seed}_label.nii.gz"))
    return cases


def test_persistent_workers_give_the_same_patches_with_any_worker_count(tmp_path):
    cases = _cases(tmp_path)

    def batches(workers, epochs):
        config = load_config("tiny", ["data.patch_size=[8, 8, 4]", "data.samples_per_volume=2", "data.batch_size=3",
                                      "data.persistent_workers=true", f"data.num_workers={workers}"])
        dataset = build_dataset(config, cases, training_transform(config, 2, [(12, 10, 6)] * 3), tmp_path)
        loader = None
        out = {}
        for epoch in epochs:
            loader = make_loader(dataset, config, epoch)
            assert loader is make_loader(dataset, config, epoch)  # one loader for the run
            out[epoch] = [(image.clone(), label.clone()) for image, label in patch_batches(loader, 3)]
        return out

    serial, parallel, resumed = batches(0, (0, 1)), batches(2, (0, 1)), batches(0, (1,))
    for epoch in (0, 1):
        assert [b[0].shape[0] for b in serial[epoch]] == [3, 3]
        for (a, b), (c, d) in zip(serial[epoch], parallel[epoch]):
            assert torch.equal(a, c) and torch.equal(b, d)
    for (a, b), (c, d) in zip(serial[1], resumed[1]):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(serial[0][0][0], serial[1][0][0])


def test_auto_workers_are_none_on_the_cpu():
    assert resolve_num_workers("auto", torch.device("cpu")) == 0 and resolve_num_workers(3, torch.device("cpu")) == 3
