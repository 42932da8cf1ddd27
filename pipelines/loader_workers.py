"""Workers of the MONAI loader: how many (``data.num_workers: auto``), and persistent ones
(``data.persistent_workers: true``).

Persistent workers, why: :func:`pipelines.data.make_loader` builds a new DataLoader every epoch, because that is how
its transforms are reseeded from ``(seed, epoch, rank)``; each epoch then starts its workers
again (process start, the cached volumes shared anew). Here one DataLoader with
``persistent_workers=True`` serves every epoch, and the seed travels with each item instead:
the sampler yields ``(epoch seed, volume index)`` and the dataset reseeds the transform chain
from that pair before drawing, in whichever worker gets it. So a volume's patches in an epoch
are a function of ``(seed, epoch, rank, volume)`` only -- the same with 0, 2 or 8 workers, and
the same after a resume -- though not the numbers of the per-epoch loader (whose stream also
depends on the worker count).

Example:
    >>> # for epoch in ...: patch_batches(persistent_loader(dataset, config, epoch, device, 2), batch_size)
"""

from __future__ import annotations

import os
import weakref
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipelines.config import TrainConfig


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)  # as pipelines.data.make_loader


class SeededItems(Dataset):
    """``dataset[(epoch_seed, index)]``: item ``index`` with the transforms reseeded from both."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch_seed, index = key
        seed = int(np.random.SeedSequence([epoch_seed, index]).generate_state(1)[0])
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        return self.dataset[index]


class EpochSampler(Sampler):
    """``(epoch seed, index)`` pairs of this rank's volumes in an order drawn from ``(seed, epoch)``
    (sharded as ``DistributedSampler`` shards); :meth:`set_epoch` before each epoch."""

    def __init__(self, count: int, seed: int, rank: int = 0, world_size: int = 1):
        self.count, self.seed, self.rank, self.world_size = count, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self):
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch, 0))
        order = torch.randperm(self.count, generator=generator).tolist()
        if self.world_size > 1:
            total = -(-self.count // self.world_size) * self.world_size
            order = (order * (-(-total // self.count)))[:total][self.rank:total:self.world_size]
        return order

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch_seed = _epoch_seed(self.seed, self.epoch, self.rank)
        return iter([(epoch_seed, index) for index in self._order()])

    def __len__(self) -> int:
        return len(self._order())


_LOADERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # dataset -> its run-long loader


def persistent_loader(dataset, config: TrainConfig, epoch: int, device, num_workers: int, rank: int = 0,
                      world_size: int = 1):
    """The run-long DataLoader of ``dataset`` (made on the first call), set to draw ``epoch``;
    pinned batches on CUDA."""
    from monai.data import DataLoader

    loader = _LOADERS.get(dataset)
    if loader is None:
        sampler = EpochSampler(len(dataset), config.seed, rank, world_size)
        loader = DataLoader(SeededItems(dataset), batch_size=1, sampler=sampler, num_workers=num_workers,
                            persistent_workers=num_workers > 0, pin_memory=torch.device(device).type == "cuda",
                            drop_last=False)
        _LOADERS[dataset] = loader
    loader.sampler.set_epoch(epoch)  # read in this process when the epoch's iteration starts
    return loader


def resolve_num_workers(num_workers, device: torch.device) -> int:
    """``data.num_workers`` for the MONAI loader; ``auto``: none on the CPU (workers would take
    cores from the training step), on a GPU all cores but two, at most 8 (the H100 run of issue 10
    was loader-bound with 2)."""
    if num_workers != "auto":
        return int(num_workers)
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 2))
