"""The samplers and the dataset wrapper that make the data order a pure function of (seed, epoch).

:class:`EpochSampler` draws each training epoch (a seeded permutation, or weighted draws for a
``data.mix`` with weights), sharded round-robin over ranks and skippable to the sample, so a run
resumes on the very next batch with any number of processes; :class:`ValidationSampler` picks the
validation samples, spread per mixture source; :class:`EpochDataset` carries (epoch, index, draw)
keys into the loader's workers so augmentation never depends on them. They live apart from
:mod:`vla_ft.data` (from a recipe to the datasets and their loaders): the order of samples is
one job, reading and checking the data another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from robot_data import MixtureReader, RobotDataset
from vla_ft.config import Recipe

MULTINOMIAL_LIMIT = 2**24  # torch.multinomial refuses more categories


def weighted_draws(weights: torch.Tensor, n: int, g: torch.Generator) -> list[int]:
    """``n`` indices drawn with replacement in proportion to ``weights`` ((N,), float64).

    torch.multinomial up to its 2^24 categories (the stream runs saved before keep resuming on);
    above, the inverse of the cumulative distribution at ``n`` uniform draws, for mixtures of more
    than 16.7 M frames."""
    if len(weights) <= MULTINOMIAL_LIMIT:
        return torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    cdf = torch.cumsum(weights.double(), 0)
    u = torch.rand(n, generator=g, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(weights) - 1).tolist()


class EpochSampler(Sampler[int]):
    """Deterministic per-epoch permutation, sharded ``perm[rank::world]``, skippable.

    With batch B per rank, global batch k holds ``perm[k*B*W : (k+1)*B*W]`` whatever W is,
    so a single process with batch B*W sees the same samples per step as W processes.
    With ``weights`` ((n,), a dataset mixture's per-sample weights) an epoch is n draws with
    replacement in proportion to them instead of a permutation: as seeded, sharded and skippable.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | None = None,
    ):
        if weights is not None and (len(weights) != n or not shuffle):
            raise ValueError(f"weights: {len(weights)} for {n} samples (shuffle={shuffle}); need n, shuffled")
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world_size
        self.weights = weights
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Start ``epoch`` after ``consumed`` samples (global count) were already used."""
        self.epoch, self.start = epoch, consumed // self.world

    @property
    def _usable(self) -> int:
        # Shuffled epochs drop the remainder so every rank gets as many samples.
        return self.n - self.n % self.world if self.shuffle else self.n

    def _shard(self) -> list[tuple[int, int]]:
        """This rank's (index, draw) pairs of the epoch; ``draw`` counts the index's earlier draws in
        the epoch (always 0 but with ``weights``), so a repeated sample gets its own augmentation."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            if self.weights is not None:
                perm = weighted_draws(self.weights, self.n, g)
            else:
                perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        counts: dict[int, int] = {}
        draws = []
        for i in perm:
            draws.append((i, counts.get(i, 0)))
            counts[i] = counts.get(i, 0) + 1
        return draws[: self._usable][self.rank :: self.world]

    def __iter__(self):
        # (epoch, index, draw) keys: DataLoader workers hold their own dataset copies, so what
        # seeds augmentation travels with each index, see EpochDataset.
        return iter([(self.epoch, i, draw) for i, draw in self._shard()[self.start :]])

    def __len__(self) -> int:
        shard = len(range(self.rank, self._usable, self.world))  # no permutation needed for a length
        return max(0, shard - self.start)


class ValidationSampler(Sampler[tuple[int, int]]):
    """The validation samples in order, as (epoch 0, index) pairs like :class:`EpochSampler`: every
    sample, or with ``train.val_batches`` N, N batches' worth spread evenly over the set. The first
    N batches would be the first frames of the first episodes: a best checkpoint and early stopping
    chosen on one phase of one task. Every rank evaluates the same samples.

    ``sources`` (n,), each sample's mixture source (:func:`sample_sources`): the spread is then per
    source, each getting its share and at least one sample; over the whole set it could step over a
    small source between two others, and that source's ``val/mix/<source>/...`` was never logged."""

    def __init__(self, n: int, wanted: int, sources: Sequence[str] | None = None):
        """``wanted``: how many samples (0: every one); :func:`validation_samples`."""
        if not wanted or wanted >= n:
            self.indices = list(range(n))
        elif sources is None:
            self.indices = _spread(range(n), wanted)
        else:
            members: dict[str, list[int]] = {}
            for i, source in enumerate(sources):
                members.setdefault(source, []).append(i)
            shares = (_spread(ids, max(1, round(wanted * len(ids) / n))) for ids in members.values())
            self.indices = sorted(i for share in shares for i in share)

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Validation has no epochs (the loaders' common interface)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(0, i) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def validation_samples(recipe: Recipe, world_size: int = 1, saved: int | None = None) -> int:
    """How many validation samples the run evaluates (0: every one): ``train.val_batches`` global
    batches (``train.batch_size`` x processes) as the run started, so 1 and 2 processes of one global
    batch validate on the same samples. ``saved``: the count of the checkpoint resumed from, kept when
    the batch changed (another number of processes): a different set would make the saved best value
    one measured on other samples."""
    return saved if saved is not None else recipe.train.val_batches * recipe.train.batch_size * world_size


def _spread(ids: Sequence[int], k: int) -> list[int]:
    """k of ``ids`` evenly spaced, the first and the last among them; a spacing of (len - 1) / (k - 1)
    >= 1 keeps the rounded positions distinct."""
    k = min(k, len(ids))
    return [ids[round(i * (len(ids) - 1) / max(k - 1, 1))] for i in range(k)]


def sample_sources(dataset: RobotDataset) -> list[str] | None:
    """(len(dataset),) the mixture source of each sample, or None for one dataset."""
    reader = dataset.reader
    if not isinstance(reader, MixtureReader):
        return None
    return [reader.source_name(e.index) for e in dataset.episodes for _ in range(e.length)]


class EpochDataset(Dataset):
    """Indexes a RobotDataset by (epoch, index) so augmentation is the same in any worker."""

    def __init__(self, dataset: RobotDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """``key``: (epoch, index) or (epoch, index, draw) (:class:`EpochSampler`)."""
        epoch, index, *draw = key
        self.dataset.set_epoch(epoch, *draw)
        return self.dataset[index]
