"""Head-only fine-tunes on cached trunk features (``train.cache_features: true``).

With every trunk module frozen (vision encoder, projector, proprio encoder, LM, action queries;
checked by :func:`vla_ft.config.cache_problems`) and no augmentation, the trunk's readout
``(C, D)`` is a fixed function of a sample. It is computed once per sample of the train and
validation sets, and the loaders are swapped for ones that yield only what the heads and the
loss need: ``readout, actions, action_mask, episode_index, frame_index, index``. No image is
decoded and no prompt tokenised after that; :meth:`vla_ft.model.VLA.forward` runs the heads only
when a batch carries ``readout``. The training loop itself is unchanged: batches come in the
order of the run's own :class:`vla_ft.samplers.EpochSampler`, so a cached run sees exactly the
samples, in the order, of the uncached run, and resumes the same way.

In memory by default; with ``train.feature_cache_dir`` on disk, reused across runs while the
fingerprint (trunk weights, data recipe, normaliser, episodes, precision) matches. A ``train/`` or
``val/`` there that holds anything but cache files is refused, never replaced
(:func:`check_cache_dir`)::

    <feature_cache_dir>/
      train/
        manifest.json             fingerprint, samples, shard size, readout shape and dtype
        labels.safetensors        actions (N, C, A), action_mask (N, C), episode_index, frame_index, index (N,)
        readout_00000.safetensors readout (S, C, D) of samples 0 .. S-1 (memory-mapped when read)
        readout_00001.safetensors ...
      val/
        ...

The readout is stored in the dtype the trunk produces under the run's precision (bf16 under
autocast), i.e. exactly what the uncached heads would receive. Under torchrun every rank builds the
in-memory cache of the whole set (batches are still sharded by the sampler); a disk cache is
written by rank 0 and read by all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import vla_ft
from vla_ft import checkpoint as ck
from vla_ft.config import TRUNK_MODULES, RecipeError, cache_problems, to_dict
from vla_ft.data import data_sources, make_loader, to_device
from vla_ft.model import pad_token_id
from vla_ft.model_files import base_language_model
from vla_ft.samplers import EpochSampler, ValidationSampler

if TYPE_CHECKING:
    from robot_data import RobotDataset
    from vla_ft.run_setup import Run

LABEL_KEYS = ("actions", "action_mask", "episode_index", "frame_index", "index", "source")
SHARD_BYTES = 256 * 2**20  # readout bytes per shard file: bounds the memory used while writing
LOADER_ONLY_KEYS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
HEAD_ONLY_KEYS = ("action_head_hidden", "gripper_head")  # model.*: the heads, which train on the cache
TRUNK_LIBRARIES = ("torch", "timm", "transformers", "peft")  # whose upgrade may change the trunk's forward


# ----------------------------------------------------------------------------- refusals
def stochastic_trunk_layers(model: nn.Module) -> list[str]:
    """Trunk layers that would run stochastically while the model trains: dropout and drop-path with
    p > 0, attention dropout > 0, batch-norm (updates running statistics). Names like
    ``language_model.model.layers.0.self_attn``.

    Checked in train mode, because that is how the uncached loop runs the trunk: a frozen module
    is kept in eval mode there (:meth:`vla_ft.model.VLA.train`), so dropout configured in a frozen
    trunk is inactive and does not block the cache; a trunk that would still sample does.
    """
    was_training = model.training
    model.train()
    try:
        found = []
        for name in TRUNK_MODULES:
            module = getattr(model, name, None)
            if module is None:
                continue
            for sub_name, sub in module.named_modules():
                if sub.training and _is_stochastic(sub):
                    found.append(f"{name}.{sub_name}" if sub_name else name)
        return found
    finally:
        model.train(was_training)


def _is_stochastic(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats
    for attr in ("drop_prob", "attention_dropout"):  # timm DropPath; transformers attention modules
        value = getattr(module, attr, None)
        if isinstance(value, float) and value > 0:
            return True
    return False


def check_cacheable(run: Run) -> None:
    """Raise a RecipeError naming the key when cached features would differ from the live trunk."""
    problems = cache_problems(run.recipe)
    layers = stochastic_trunk_layers(run.model)
    if layers:
        shown = ", ".join(layers[:4]) + (f" (+{len(layers) - 4} more)" if len(layers) > 4 else "")
        problems.append(f"train.cache_features: refused because dropout is active in the trunk while training: {shown}")
    if problems:
        raise RecipeError(problems)


# ----------------------------------------------------------------------------- stores
class FeatureStore(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]: ...


class MemoryFeatures:
    """Every cached tensor in host memory, indexed along dim 0 by sample index."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.tensors.items()}


class DiskFeatures:
    """Labels in memory (small); readout rows read from memory-mapped safetensors shards per batch."""

    def __init__(self, directory: Path):
        manifest = json.loads((directory / "manifest.json").read_text())
        self.labels = load_file(str(directory / "labels.safetensors"))
        self.shard_size = manifest["shard_size"]
        self.shards = [safe_open(str(directory / name), framework="pt") for name in manifest["shards"]]

    def __len__(self) -> int:
        return len(self.labels["index"])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: v[indices] for k, v in self.labels.items()}
        rows = []
        for i in indices.tolist():
            shard, row = divmod(i, self.shard_size)
            rows.append(self.shards[shard].get_slice("readout")[row : row + 1])
        out["readout"] = torch.cat(rows)
        return out


class CachedLoader:
    """Batches of a FeatureStore in the order of ``sampler`` (an EpochSampler yielding (epoch, index)).

    Stands in for the run's DataLoader: the loop calls ``sampler.set_epoch`` and iterates this.
    """

    def __init__(
        self, store: FeatureStore, sampler: EpochSampler | ValidationSampler, batch_size: int, drop_last: bool
    ):
        self.store, self.sampler, self.batch_size, self.drop_last = store, sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.tensor([key[1] for key in self.sampler], dtype=torch.long)  # (epoch, index[, draw])
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield self.store.batch(order[start : start + self.batch_size])

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


# ----------------------------------------------------------------------------- computing
@torch.no_grad()
def trunk_features(run: Run, dataset: RobotDataset) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield (labels, readout) per batch of ``dataset`` in index order; readout (B, C, D) on the host,
    in the dtype the trunk produces under the run's precision (what the uncached heads would see)."""
    model = run.model
    loader = make_loader(
        dataset,
        run.recipe,
        EpochSampler(len(dataset), run.recipe.train.seed, False),
        pad_token_id(run.tokenizer),
        run.rt.device,
        train=False,
    )
    was_training, wants_language = model.training, model.wants_language
    model.eval()
    model.wants_language = False  # the readout sits before the language target (causal): not needed
    try:
        for batch in loader:
            batch = to_device(batch, run.rt.device)
            with run.rt.autocast():
                readout = model.trunk(batch)["readout"]
            yield {k: batch[k].cpu() for k in LABEL_KEYS}, readout.cpu()
    finally:
        model.train(was_training)
        model.wants_language = wants_language


def build_memory(run: Run, dataset: RobotDataset) -> MemoryFeatures:
    parts = list(trunk_features(run, dataset))
    tensors = {k: torch.cat([labels[k] for labels, _ in parts]) for k in LABEL_KEYS}
    tensors["readout"] = torch.cat([readout for _, readout in parts])
    _check_order(tensors["index"])
    return MemoryFeatures(tensors)


def write_disk(run: Run, dataset: RobotDataset, directory: Path, fingerprint: str) -> None:
    """Compute and write the cache of ``dataset`` (:func:`~vla_ft.checkpoint.write_dir_atomically`)."""
    ck.write_dir_atomically(directory, partial(_write_cache, run, dataset, fingerprint))


def _write_cache(run: Run, dataset: RobotDataset, fingerprint: str, tmp: Path) -> None:
    """Readout shards, labels, then the manifest that names them, into ``tmp``."""
    labels: list[dict[str, torch.Tensor]] = []
    pending: list[torch.Tensor] = []
    shards: list[str] = []
    shard_size = None

    def flush(rows: torch.Tensor) -> None:
        name = f"readout_{len(shards):05d}.safetensors"
        save_file({"readout": rows.contiguous()}, str(tmp / name))
        shards.append(name)

    for batch_labels, readout in trunk_features(run, dataset):
        labels.append(batch_labels)
        if shard_size is None:
            shard_size = max(1, SHARD_BYTES // (readout[0].numel() * readout.element_size()))
        pending.append(readout)
        rows = torch.cat(pending)
        while len(rows) >= shard_size:
            flush(rows[:shard_size])
            rows = rows[shard_size:]
        pending = [rows]
    rows = torch.cat(pending)
    if len(rows):
        flush(rows)
    merged = {k: torch.cat([b[k] for b in labels]).contiguous() for k in LABEL_KEYS}
    _check_order(merged["index"])
    save_file(merged, str(tmp / "labels.safetensors"))
    manifest = {
        "fingerprint": fingerprint,
        "samples": len(merged["index"]),
        "shard_size": shard_size,
        "shards": shards,
        "readout_shape": list(rows.shape[1:]),
        "dtype": str(rows.dtype),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _check_order(index: torch.Tensor) -> None:
    # Stores are indexed by position; the sequential loader must have produced sample i at row i.
    if not torch.equal(index, torch.arange(len(index))):
        raise RuntimeError("feature cache: samples arrived out of order")


def fingerprint(run: Run, split: str, dataset: RobotDataset) -> str:
    """Hash of everything the cached readout depends on: trunk weights, the data recipe (minus
    loader settings), the model recipe (minus the heads': a sweep over head widths shares one
    cache), the LM's config, normalisation, episodes, tokenizer (vocabulary and rules), precision and the
    versions of the libraries that compute the trunk (an upgraded timm may build or run a backbone
    otherwise). Not the seed: the trunk's weights and the split it drew are hashed themselves, so a
    seed sweep on a pretrained trunk shares one cache.

    The LM's config is hashed as loaded: with ``model.language.name`` the recipe holds only a
    path or hub name, and a ``config.json`` edited there (rope, norm eps) changes the readout
    without changing a weight."""
    h = hashlib.blake2b(digest_size=16)
    data = {k: v for k, v in to_dict(run.recipe.data).items() if k not in LOADER_ONLY_KEYS}
    meta = {
        "split": split,
        "data": data,
        "model": {k: v for k, v in to_dict(run.recipe.model).items() if k not in HEAD_ONLY_KEYS},
        "lm_config": base_language_model(run.model).config.to_json_string(use_diff=False),
        "normalizer": run.data.normalizer.to_dict(),
        "episodes": [e.index for e in dataset.episodes],
        "precision": str(run.rt.amp_dtype),
        "vocab": sorted(run.tokenizer.get_vocab().items()),
        "tokenizer": tokenizer_rules(run.tokenizer),
        "prompt_prefix": run.data.prompt_prefix,
        "files": data_files(run.recipe),
        "libraries": {name: importlib.metadata.version(name) for name in TRUNK_LIBRARIES},
        "vla_ft": vla_ft.__version__,  # a release may change how the trunk computes the readout
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in TRUNK_MODULES:
        module = getattr(run.model, name, None)
        for key, tensor in module.state_dict().items() if module is not None else ():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}.{key}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def tokenizer_rules(tokenizer) -> str | None:
    """A fast tokenizer's whole definition (normaliser, pre-tokeniser, model, post-processor): an
    edited ``tokenizer.json`` with the same vocabulary still gives other prompt ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None


def data_files(recipe) -> list[tuple[str, int, int]]:
    """(path relative to its dataset, size, mtime in ns) of every file of ``data.path`` (or of each
    ``data.mix`` source, prefixed with its key): a dataset edited in place (same path, same
    episodes) must not be served from features of its old contents.
    The caches' own directories are left out (they change as they fill). Symlinked folders are
    followed (a ``videos/`` linked to another disk is part of the data; ``rglob`` skips them)."""
    skip = [Path(d).resolve() for d in (recipe.data.frame_cache, recipe.train.feature_cache_dir) if d]
    out = []
    for key, path in data_sources(recipe).items():
        root = Path(path)
        prefix = f"{key}:" if recipe.data.mix else ""
        for f in [root] if root.is_file() else sorted(_walk_files(root)):
            if any(f.resolve().is_relative_to(d) for d in skip):
                continue
            stat = f.stat()
            out.append((prefix + (str(f.relative_to(root)) if f != root else f.name), stat.st_size, stat.st_mtime_ns))
    return out


def _walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root``, through symlinked folders, each real folder once (no link cycles)."""
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        yield from (Path(folder, name) for name in names if Path(folder, name).is_file())


CACHE_FILE = re.compile(r"manifest\.json|labels\.safetensors|readout_\d{5}\.safetensors")  # all a cache holds


def check_cache_dir(root: Path, splits: list[str]) -> None:
    """Refuse a ``train.feature_cache_dir`` whose ``<split>`` entries are not feature caches.

    A rebuild replaces ``<root>/<split>`` whole, so a user's own ``train/`` or ``val/`` folder
    there would be deleted. A split folder is taken for a cache (possibly damaged, then rebuilt)
    only while every entry in it carries a name the cache writes; anything else is refused, and
    on every rank, so no rank waits at a barrier for one that raised."""
    problems = []
    for split in splits:
        directory = root / split
        if not directory.exists() and not directory.is_symlink():
            continue
        if not directory.is_dir():
            problems.append(f"train.feature_cache_dir: {directory} is not a folder; choose another folder")
            continue
        foreign = sorted(p.name for p in directory.iterdir() if not CACHE_FILE.fullmatch(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
            problems.append(
                f"train.feature_cache_dir: {directory} holds files that are not a feature cache ({shown}); "
                "a cache rebuild would delete them: choose an empty or new train.feature_cache_dir"
            )
    if problems:
        raise RecipeError(problems)


def disk_store(run: Run, split: str, dataset: RobotDataset, root: Path) -> tuple[DiskFeatures, bool]:
    """Open the cache of ``split`` under ``root``, (re)computing it on rank 0 when missing or stale.
    Returns (store, built_now)."""
    check_cache_dir(root, [split])
    directory = root / split
    key = fingerprint(run, split, dataset)
    state = cache_state(directory, key)
    fresh = state == "fresh"
    if not fresh and run.rt.is_main:
        if state != "missing":
            run.progress.write(f"feature cache: {directory} {state}; rebuilding")
        write_disk(run, dataset, directory, key)
    run.rt.barrier()
    return DiskFeatures(directory), not fresh


def cache_state(directory: Path, key: str) -> str:
    """ "fresh" when ``directory`` holds a whole cache for fingerprint ``key``, "missing" when it holds
    none, else why it cannot serve (a damaged manifest or a lost shard is rebuilt, not a traceback)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return "missing"
    try:
        meta = json.loads(manifest.read_text())
        names = ["labels.safetensors", *meta["shards"]]
        built_for = meta["fingerprint"]
    except (ValueError, KeyError, TypeError) as err:
        return f"has an unreadable manifest.json ({type(err).__name__}: {err})"
    if built_for != key:
        return "was built for other weights or data"
    lost = [name for name in names if not (directory / str(name)).is_file()]
    return f"lacks {', '.join(map(str, lost))}" if lost else "fresh"


# ----------------------------------------------------------------------------- the installer
def install(run: Run) -> None:
    """Swap the run's loaders for cached-feature loaders when ``train.cache_features`` is on."""
    r = run.recipe
    if not r.train.cache_features:
        return
    check_cacheable(run)
    t0 = time.perf_counter()
    splits = {"train": run.data.train_set, "val": run.data.val_set}
    stores: dict[str, FeatureStore] = {}
    if r.train.feature_cache_dir:  # before computing either split: refuse without writing anything
        check_cache_dir(Path(r.train.feature_cache_dir), [k for k, v in splits.items() if v is not None])
    for split, dataset in splits.items():
        if dataset is None:
            continue
        if r.train.feature_cache_dir:
            stores[split], _ = disk_store(run, split, dataset, Path(r.train.feature_cache_dir))
        else:
            stores[split] = build_memory(run, dataset)
    run.train_loader = CachedLoader(stores["train"], run.sampler, r.train.batch_size, drop_last=True)
    if "val" in stores:
        val_sampler = run.val_loader.sampler  # the samples validation reads without the cache
        run.val_loader = CachedLoader(stores["val"], val_sampler, r.train.batch_size, drop_last=False)
    where = r.train.feature_cache_dir or "memory"
    counts = " + ".join(f"{len(s)} {k}" for k, s in stores.items())
    run.progress.write(
        f"feature cache ({where}): {counts} samples ready in {time.perf_counter() - t0:.1f}s; "
        "training runs the heads only"
    )
