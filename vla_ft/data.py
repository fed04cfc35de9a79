"""From a recipe to train/val DataLoaders over :mod:`robot_data`, resumable to the sample.

The sampler (:mod:`vla_ft.samplers`) is a pure function of (seed, epoch): a permutation of the
dataset, sharded round-robin over ranks. The data position saved in a checkpoint is the number of
samples of the current epoch already consumed *globally*, so a run resumes on the very next batch,
with any number of processes.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import robot_data
from robot_data import (
    MixtureReader,
    Normalizer,
    PerSourceNormalizer,
    PromptTokenizer,
    RobotDataset,
    collate,
    load_normalizer,
    split_episodes,
)
from robot_data.check import DatasetCheckError, check_dataset, check_mixture, episodes_to_skip
from robot_data.delta_actions import DeltaActions
from robot_data.normalize import resolve_stats
from robot_data.reader import DatasetFormatError, UnknownFeatureError, did_you_mean
from vla_ft.config import Recipe, RecipeError
from vla_ft.losses import check_action_dim
from vla_ft.metrics import best_metric_problems
from vla_ft.runtime import say
from vla_ft.samplers import EpochDataset, EpochSampler


@dataclass
class DataBundle:
    reader: Any
    train_set: RobotDataset
    val_set: RobotDataset | None
    normalizer: Normalizer | PerSourceNormalizer
    train_episodes: list[int]
    val_episodes: list[int]
    state_dim: int
    action_dim: int
    cameras: list[str]
    train_weights: torch.Tensor | None = None  # per training sample, data.mix weights (None: uniform)

    @property
    def prompt_prefix(self) -> list[int]:
        """The ids every prompt starts with (the tokenizer's own BOS, if it adds one)."""
        prompts = self.train_set.prompt_tokenizer
        return prompts.prefix if prompts is not None else []


def _reader_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The reader's keyword arguments, ``path`` excepted (one per source: :func:`data_sources`)."""
    d = recipe.data
    if d.format == "synthetic":
        s = d.synthetic
        return {"episodes": s.episodes, "episode_length": s.episode_length, "image_size": s.image_size, "seed": s.seed}
    kw: dict[str, Any] = {"state_key": d.state_key, "action_key": d.action_key}
    if d.format == "lerobot":
        kw.update(text_key=d.text_key, video_tolerance_s=d.video_tolerance_s, frame_cache=d.frame_cache)
    if d.format == "hdf5":
        kw.update(layout=d.layout, text_key=d.text_key, fps=d.fps)
    if d.format == "rlds":
        kw.update(text_key=d.text_key, fps=d.fps, frame_cache=d.frame_cache)
    return kw


def data_sources(recipe: Recipe) -> dict[str, str]:
    """The recipe's recorded datasets, ``{recipe key of the path: path}``: ``data.path``, or every
    ``data.mix.<name>.path``; none for the synthetic task."""
    d = recipe.data
    if d.format == "synthetic":
        return {}
    if d.mix:
        return {f"data.mix.{name}.path": source.path for name, source in d.mix.items()}
    return {"data.path": str(d.path)}


def describe_data(recipe: Recipe) -> str:
    """The dataset in words, for messages: its path, the mixture's paths, or the synthetic task."""
    return ", ".join(data_sources(recipe).values()) or "the synthetic dataset"


def build_reader(recipe: Recipe):
    """The recipe's reader (a :class:`~robot_data.MixtureReader` over ``data.mix``); a missing dataset
    or a key naming no feature is a RecipeError naming the key."""
    kwargs, sources = _reader_kwargs(recipe), data_sources(recipe)
    if not sources:
        return robot_data.build_reader(recipe.data.format, **kwargs)
    readers = {key: _open(recipe.data.format, key, path, kwargs) for key, path in sources.items()}
    if not recipe.data.mix:
        return readers["data.path"]
    try:
        return MixtureReader({name: readers[f"data.mix.{name}.path"] for name in recipe.data.mix})
    except DatasetFormatError as err:  # sources that disagree: the message starts with the source's name
        raise RecipeError(f"data.mix.{err}") from None


def _open(format: str, key: str, path: str, kwargs: dict[str, Any]):
    try:
        return robot_data.build_reader(format, path=path, **kwargs)
    except FileNotFoundError as err:
        raise RecipeError(f"{key}: {err}") from None
    except UnknownFeatureError as err:  # its message starts with the data.* key
        raise RecipeError(str(err)) from None
    except DatasetFormatError as err:  # no usable metadata: not a dataset of data.format
        raise RecipeError(f"{key}: {err}") from None


def action_token_ids(tokenizer: Any, bins: int) -> list[int]:
    """The token id of each action bin: the tokenizer's last ``bins`` ids that are not special or
    added tokens. OpenVLA takes Llama's last ids; Qwen's vocabulary ends in its special tokens (eos,
    pad, <|im_start|>, ...), which an action value must never be said as."""
    reserved = {*tokenizer.all_special_ids, *getattr(tokenizer, "added_tokens_decoder", {})}
    ordinary = [i for i in range(len(tokenizer)) if i not in reserved]
    if len(ordinary) < bins:
        raise RecipeError(
            f"model.action_tokens_bins: {bins} bins, but the tokenizer has {len(ordinary)} ordinary tokens to say "
            "them with; use fewer bins or a larger vocabulary"
        )
    return ordinary[len(ordinary) - bins :]


def build_data(
    recipe: Recipe, tokenizer, stats: dict | None = None, prompt_prefix: list[int] | None = None
) -> DataBundle:
    """Reader -> episode split -> normaliser -> train/val datasets.

    Discretised action tokens (``data.language_target=action_tokens``) use the tokenizer's last
    ``model.action_tokens_bins`` ordinary ids, as OpenVLA does (:func:`action_token_ids`).
    ``stats`` (from a checkpoint) replaces fresh statistics so a resumed or evaluated run
    normalises exactly as training did; ``prompt_prefix`` (from a checkpoint) likewise replaces the
    tokenizer's own leading ids (:func:`robot_data.language.special_prefix`).
    """
    d = recipe.data
    reader = build_reader(recipe)
    skip = checked_skip_list(recipe, reader)
    episodes = [e.index for e in reader.episodes() if e.index not in skip]
    train_eps, val_eps = split_train_val(recipe, reader, episodes)
    if isinstance(reader, MixtureReader):
        check_mixture_widths(recipe, reader, episodes)
        check_mixture_cameras(recipe, reader)
        check_best_source(recipe, reader, val_eps)
        for line in reader.describe():
            say(f"data: {line}")
        for name, ids in reader.source_episodes(train_eps).items():
            if not ids:  # e.g. data.train_filter names a filter key only the other sources have
                say(f"data: warning: {_source_key(recipe, name)} gives no training episode")
    first = reader.numeric(train_eps[0])
    check_action_dims(recipe, first.action.shape[1], first.state.shape[1], reader.gripper_dims)
    if stats is not None:
        normalizer = load_normalizer(stats)
        check_stats_sources(recipe, reader, normalizer)
    else:
        normalizer = fresh_normalizer(recipe, reader, train_eps, episodes)
    if recipe.rollout.episodes or recipe.rollout.source is not None:
        try:
            normalizer.for_source(recipe.rollout.source)  # the statistics a rollout's robot uses exist
        except ValueError as err:
            raise RecipeError(f"rollout.{err}") from None
    bins = action_token_ids(tokenizer, recipe.model.action_tokens_bins) if d.language_target == "action_tokens" else []
    prompts = PromptTokenizer(tokenizer, d.prompt_template, d.language_target, bins, prompt_prefix)
    cameras = d.cameras or list(reader.cameras)
    common = dict(
        chunk=d.chunk,
        history=d.history,
        normalizer=normalizer,
        image_size=recipe.model.vision.img_size,
        prompt_tokenizer=prompts,
        cameras=cameras,
        seed=recipe.train.seed,
    )
    augment = (
        {"crop_scale": d.augment.crop_scale, "color_jitter": d.augment.color_jitter} if d.augment.enabled else None
    )
    try:
        train_set = RobotDataset(reader, train_eps, augment=augment, train=True, **common)
        val_set = RobotDataset(reader, val_eps, train=False, **common) if val_eps else None
    except ValueError as err:  # unknown camera, missing text column, ...: name the recipe key
        raise RecipeError(f"data.{err}" if str(err).startswith("cameras:") else f"data: {err}") from None
    return DataBundle(
        reader,
        train_set,
        val_set,
        normalizer,
        train_eps,
        val_eps,
        first.state.shape[1],
        first.action.shape[1],
        cameras,
        mixture_weights(recipe, reader, train_set),
    )


def fresh_normalizer(
    recipe: Recipe, reader: Any, train_eps: list[int], usable: list[int]
) -> Normalizer | PerSourceNormalizer:
    """Statistics over the training episodes only (a stats file the dataset ships is only compared,
    its disagreements said): of the whole data, or with ``data.normalize_per_source`` of each source."""
    d = recipe.data
    gripper = recipe.loss.gripper.dims if recipe.model.gripper_head else []
    raw = d.raw_dims if d.raw_dims is not None else gripper
    delta = DeltaActions.build(d.delta_action_dims, d.delta_state_dims)

    def normalizer(source: Any, train: list[int], usable: list[int], label: str) -> Normalizer:
        fresh, report = resolve_stats(source, train, usable_episodes=usable, delta=delta, chunk=d.chunk)
        for line in report:  # a shipped stats file that disagrees with the data is worth knowing about
            say(f"data stats: {label}{line}")
        return Normalizer(fresh, d.normalize, raw_action_dims=raw, delta=delta)

    if not d.normalize_per_source:
        return normalizer(reader, train_eps, usable, "")
    if not isinstance(reader, MixtureReader):
        raise RecipeError(
            f"data.normalize_per_source: {describe_data(recipe)} is one dataset, not a mixture (data.mix, or a "
            "directory of robomimic files)"
        )
    by_source, train, kept = {}, reader.source_episodes(train_eps), reader.source_episodes(usable)
    for name, source in reader.sources.items():
        if not train[name]:
            raise RecipeError(
                f"data.normalize_per_source: {_source_key(recipe, name)} has no training episode to compute its "
                "statistics from"
            )
        local = [i - reader.offsets[name] for i in train[name]], [i - reader.offsets[name] for i in kept[name]]
        by_source[name] = normalizer(source, *local, f"{name}: ")
    return PerSourceNormalizer(by_source)


def check_stats_sources(recipe: Recipe, reader: Any, normalizer: Normalizer | PerSourceNormalizer) -> None:
    """Saved per-source statistics cover every source of the data read now (a resumed or evaluated run)."""
    if not normalizer.sources:
        return
    names = list(reader.sources) if isinstance(reader, MixtureReader) else []
    lacking = [name for name in names if name not in normalizer.sources]
    if not names or lacking:
        what = f"source(s) {', '.join(lacking)}" if names else f"{describe_data(recipe)}, one dataset"
        raise RecipeError(
            f"data: the checkpoint's statistics are per source ({', '.join(normalizer.sources)}); none for {what}"
        )


def check_mixture_widths(recipe: Recipe, reader: MixtureReader, episodes: list[int]) -> None:
    """Every source's state and action widths, from its first usable episode, equal the first source's."""
    widths = reader.widths(episodes)
    (first, want), *others = widths.items()
    problems = [
        f"{_source_key(recipe, name)}: state/action dims {got}, but {_source_key(recipe, first)} has {want}: "
        "the sources must share state and action spaces"
        for name, got in others
        if got != want
    ]
    if problems:
        raise RecipeError(problems)


def check_mixture_cameras(recipe: Recipe, reader: MixtureReader) -> None:
    """The cameras training reads (``data.cameras``, else those every source has) are in every source:
    else the dataset would say the mixture has no such camera, or none at all, without naming a source."""
    wanted = recipe.data.cameras or ([] if reader.cameras else [c for r in reader.sources.values() for c in r.cameras])
    problems = [
        f"data.cameras: {_source_key(recipe, name)} has no camera {lacking}; a mixture reads the cameras every "
        f"source has: {', '.join(reader.cameras) or 'none in common'}"
        for name, missing in reader.missing_cameras.items()
        if (lacking := list(dict.fromkeys(c for c in wanted if c in missing)))
    ]
    if problems:
        raise RecipeError(problems)


def check_best_source(recipe: Recipe, reader: MixtureReader, val_eps: list[int]) -> None:
    """A ``train.best_metric`` of one source (``val/mix/<source>/...``) needs validation episodes of
    that source: else validation never logs it and the run stops at its first validation."""
    key = recipe.train.best_metric
    name = key.split("/")[2] if key.startswith("val/mix/") else None
    if val_eps and name in reader.sources and not reader.source_episodes(val_eps)[name]:
        raise RecipeError(
            f"train.best_metric: '{key}' is never logged: {_source_key(recipe, name)} has no validation episode "
            "(data.val_episodes, data.val_filter or data.train_filter leave it none)"
        )


def _source_key(recipe: Recipe, name: str) -> str:
    """How messages name a mixture's source: its recipe key, or a file of a robomimic directory."""
    return f"data.mix.{name}" if recipe.data.mix else f"data.path: {name}.hdf5"


def mixture_weights(recipe: Recipe, reader: Any, train_set: RobotDataset) -> torch.Tensor | None:
    """(len(train_set),) draw weights that give each ``data.mix`` source its weight's share of the
    training samples, spread evenly over its frames; None without weights (uniform over frames)."""
    mix = recipe.data.mix
    if not mix or mix[next(iter(mix))].weight is None:  # the config allows all weights or none
        return None
    lengths = torch.tensor([e.length for e in train_set.episodes], dtype=torch.float64)
    owner = [reader.source_name(e.index) for e in train_set.episodes]
    frames = dict.fromkeys(mix, 0.0)
    for name, n in zip(owner, lengths.tolist(), strict=True):
        frames[name] += n
    empty = [f"data.mix.{name}" for name, n in frames.items() if n == 0]
    if empty:
        raise RecipeError(
            f"{', '.join(empty)}: weighted, but no training episode left (data.train_filter, the validation split "
            "or data.skip_bad_episodes took them all)"
        )
    per_episode = torch.tensor([mix[name].weight / frames[name] for name in owner], dtype=torch.float64)
    total = sum(source.weight for source in mix.values())
    shares = ", ".join(f"{name} {source.weight / total:.0%}" for name, source in mix.items())
    say(f"data.mix: training samples drawn by weight: {shares}")
    return torch.repeat_interleave(per_episode, lengths.long())


def check_action_dims(
    recipe: Recipe, action_dim: int, state_dim: int, dataset_gripper: list[int] | None = None
) -> None:
    """Keys indexing action dims, checked as soon as the data gives the action dim: an index out of
    range would otherwise surface as an index error in the normaliser, the model or the loss.

    ``dataset_gripper`` (``reader.gripper_dims``): the dims the dataset says hold its gripper. With
    the gripper head on, ``loss.gripper.dims`` must name the same dims, or training would fit a
    joint angle with a BCE at ``loss.gripper.threshold`` and regress the real gripper.
    """
    problems = check_action_dim(recipe.loss, action_dim, recipe.model.gripper_head)
    dims = recipe.loss.gripper.dims
    if recipe.model.gripper_head and dataset_gripper and sorted(dims) != sorted(dataset_gripper):
        source = describe_data(recipe)
        problems.append(
            f"loss.gripper.dims: {list(dims)}, but {source} has its gripper at action dim(s) {list(dataset_gripper)}; "
            f"set loss.gripper.dims={list(dataset_gripper)}, or model.gripper_head=false to regress every action dim"
        )
    bad = [i for i in recipe.data.raw_dims or [] if not 0 <= i < action_dim]
    if bad:
        problems.append(f"data.raw_dims: {bad} out of range for the data's {action_dim} action dims")
    delta = DeltaActions.build(recipe.data.delta_action_dims, recipe.data.delta_state_dims)
    if delta is not None:
        problems += [f"data.{line}" for line in delta.range_problems(action_dim, state_dim)]
    problems += best_metric_problems(recipe, action_dim)
    if problems:
        raise RecipeError(problems)


def split_train_val(recipe: Recipe, reader: Any, episodes: list[int]) -> tuple[list[int], list[int]]:
    """(train, val) episode indices among the usable ``episodes``: the dataset's own filter keys
    where ``data.train_filter`` / ``data.val_filter`` name them (robomimic's ``mask/train``,
    ``mask/valid``, ``mask/20_percent``), else :func:`robot_data.split_episodes`."""
    d = recipe.data
    if not episodes:
        raise RecipeError(
            f"data.path: no episode left to train on: every episode of {describe_data(recipe)} failed its checks "
            f"and data.skip_bad_episodes leaves them out (vla-ft data check {describe_data(recipe)})"
        )
    usable = set(episodes)
    skipped = sorted(set(d.val_episodes or []) & ({e.index for e in reader.episodes()} - usable))
    if skipped:
        raise RecipeError(
            f"data.val_episodes: episode(s) {skipped} failed their checks and data.skip_bad_episodes leaves "
            f"them out (vla-ft data check {describe_data(recipe)}); drop them from data.val_episodes"
        )
    pool = [e for e in _filtered(reader, "train_filter", d.train_filter) if e in usable] if d.train_filter else episodes
    if not pool:
        raise RecipeError(f"data.train_filter: '{d.train_filter}' holds none of the dataset's usable episodes")
    if not d.val_filter:
        try:
            if isinstance(reader, MixtureReader) and not d.val_episodes:  # every source validates
                parts = [split_episodes(ids, d.val_ratio, (), d.split_seed) for ids in _by_source(reader, pool)]
                return sorted(e for train, _ in parts for e in train), sorted(e for _, val in parts for e in val)
            return split_episodes(pool, d.val_ratio, d.val_episodes, d.split_seed)
        except ValueError as err:  # an unknown or every episode in data.val_episodes: the message names it
            key = str(err).split(":", 1)[0]
            raise RecipeError(
                f"data.{err}" if key in ("val_episodes", "val_ratio") else f"data.val_ratio: {err}"
            ) from None
    val = [e for e in _filtered(reader, "val_filter", d.val_filter) if e in usable]
    shared = sorted(set(val) & set(pool)) if d.train_filter else []
    if shared:
        raise RecipeError(
            f"data.train_filter '{d.train_filter}' and data.val_filter '{d.val_filter}' share episodes {shared[:10]}"
        )
    train = [e for e in pool if e not in set(val)]
    if not train or not val:
        counts = f"{len(train)} training and {len(val)} validation episodes"
        raise RecipeError(f"data.val_filter '{d.val_filter}' leaves {counts}")
    return train, val


def _by_source(reader: MixtureReader, episodes: list[int]) -> list[list[int]]:
    return [ids for ids in reader.source_episodes(episodes).values() if ids]


def _filtered(reader: Any, key: str, name: str) -> list[int]:
    """The episodes of the dataset's filter key ``name``; an unknown name is ``data.<key>``'s error."""
    try:
        filters = reader.episode_filters()
    except DatasetFormatError as err:  # a filter key naming demos the file lacks: the message names both
        raise RecipeError(f"data.{key}: {err}") from None
    if name not in filters:
        have = f"its filter keys: {', '.join(sorted(filters))}" if filters else "no filter keys (robomimic: mask/<key>)"
        hint = did_you_mean(name, list(filters))
        raise RecipeError(f"data.{key}: no filter key '{name}'{hint}; the dataset has {have}")
    return filters[name]


def checked_skip_list(recipe: Recipe, reader: Any = None) -> set[int]:
    """Run ``robot_data.check_dataset`` (each source of ``data.mix``); refuse a failing dataset
    unless ``data.skip_bad_episodes``. ``reader``: the recipe's, when open (a mixture's episodes
    are then numbered by its offsets instead of opening every source again).

    Returns the episodes to leave out, as the reader numbers them (listed on stdout so the user
    sees what was dropped).
    """
    d = recipe.data
    if not data_sources(recipe):
        return set()
    kwargs = _reader_kwargs(recipe)
    offsets = reader.offsets if isinstance(reader, MixtureReader) else None
    try:
        if d.mix:
            paths = {name: s.path for name, s in d.mix.items()}
            sources = reader.sources if isinstance(reader, MixtureReader) else None
            problems = check_mixture(paths, d.format, offsets=offsets, opened=sources, cameras=d.cameras, **kwargs)
        else:
            problems = check_dataset(d.path, d.format, offsets=offsets, opened=reader, cameras=d.cameras, **kwargs)
        skip = episodes_to_skip(problems, d.skip_bad_episodes)
    except DatasetCheckError as err:
        key = "data.mix" if d.mix else "data.path"
        what = describe_data(recipe)
        raise RecipeError(f"{key}: {what} failed its checks (vla-ft data check {what}):\n{err}") from None
    if skip:
        say(f"data.skip_bad_episodes: skipping {len(skip)} episode(s): {sorted(skip)}")
    return skip


def _seed_worker(rank: int, worker_id: int) -> None:
    # A SIGTERM to the process group (torchrun's shutdown, SLURM's preemption) must not kill the
    # workers under the trainer while it writes its stop checkpoint: the trainer decides, and ends them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Per-sample augmentation RNGs are derived from (seed, epoch, index) in the dataset, so
    # results never depend on workers; global RNGs are seeded anyway for user transforms. torch
    # seeds each worker from the loader's generator (train.seed), anew for every epoch's iterator,
    # plus its worker id; the rank makes the ranks' workers draw differently too.
    seed = (torch.initial_seed() + rank * 1_000_003) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def worker_start(setting: str, reader: Any) -> str:
    """The start method of a loader's workers. ``auto``: ``forkserver`` for a reader that decodes
    video (a worker forked from a process that had decoded hung in its first decode on a GPU host;
    one started from the fork server inherits no FFmpeg state, for a second or two per worker,
    once per run with persistent workers), ``fork`` (no start cost, no pickling) otherwise."""
    if setting != "auto":
        return setting
    return "forkserver" if getattr(reader, "decodes_video", False) else "fork"


def make_loader(
    dataset: Dataset, recipe: Recipe, sampler: Sampler, pad_id: int, device: torch.device, train: bool
) -> DataLoader:
    d = recipe.data
    workers = d.num_workers
    return DataLoader(
        EpochDataset(dataset),
        batch_size=recipe.train.batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=d.pin_memory and device.type == "cuda",
        persistent_workers=d.persistent_workers and workers > 0,
        multiprocessing_context=worker_start(d.worker_start, getattr(dataset, "reader", None)) if workers > 0 else None,
        prefetch_factor=d.prefetch_factor if workers > 0 else None,
        worker_init_fn=partial(_seed_worker, getattr(sampler, "rank", 0)) if workers > 0 else None,
        collate_fn=partial(collate, pad_id=pad_id, pad_to_multiple=8 if recipe.train.compile else 1),
        # Own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run's dropout stream would shift relative to a straight run.
        generator=torch.Generator().manual_seed(recipe.train.seed),
    )


def step_groups(loader: DataLoader, sampler: EpochSampler, state: Any, accumulation: int):
    """Yield lists of ``accumulation`` micro-batches, one list per optimizer step, epoch after
    epoch, forever.

    The micro-batches left at an epoch's end that do not fill a step are dropped, as the loader
    drops a partial batch: every step is one global batch, and an epoch is the same steps of the
    same samples however the global batch is split (batch x accumulation x processes), so a resume
    may change the split. ``state.epoch`` and ``state.consumed`` (samples of the epoch already used,
    all ranks; the trainer adds each group's samples) say where to start, so a resumed run continues
    with the very next batch.
    """
    while True:
        sampler.set_epoch(state.epoch, state.consumed)
        group: list[dict[str, torch.Tensor]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == accumulation:
                yield group
                group = []
        state.epoch, state.consumed = state.epoch + 1, 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
