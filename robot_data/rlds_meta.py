"""RLDS dataset metadata, read without TensorFlow: ``dataset_info.json`` (its splits and shards, and so
where each episode's record lies) and ``features.json`` (the per-step feature tree, each leaf's
declared shape). The layout is described in :mod:`robot_data.rlds`; every malformed piece is a
:class:`DatasetFormatError` naming the file and the key or feature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from robot_data.reader import DatasetFormatError
from robot_data.tfrecord import record_spans

DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
Record = tuple[Path, int, int, int]  # an episode's: shard file, offset and length of its data, number in the shard


def version_dir(path: Path) -> Path:
    """The directory holding dataset_info.json: ``path``, or its only version subdirectory.
    :class:`DatasetFormatError` when there is none (no RLDS dataset) or several (name one)."""
    if not path.exists():
        raise FileNotFoundError(f"RLDS dataset not found: {path}")
    if (path / "dataset_info.json").is_file() or not path.is_dir():
        return path
    versions = sorted(p for p in path.iterdir() if (p / "dataset_info.json").is_file())
    if len(versions) == 1:
        return versions[0]
    if not versions:
        raise DatasetFormatError(f"{path}: no dataset_info.json here or in a version subdirectory (1.0.0/)")
    raise DatasetFormatError(f"{path}: several versions ({', '.join(p.name for p in versions)}); name one")


def read_json(path: Path) -> dict[str, Any]:
    """dataset_info.json or features.json; missing, it is no RLDS dataset version directory."""
    if not path.is_file():
        raise DatasetFormatError(f"{path.parent}: no {path.name}; not an RLDS (TFDS) dataset version directory")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetFormatError(f"{path}: unreadable ({err})") from None


def shard_records(path: Path, info: dict[str, Any]) -> tuple[list[Record], dict[str, list[int]]]:
    """Every episode's :data:`Record` in the dataset version directory ``path`` (``info``: its
    dataset_info.json), numbered across the splits in their order, and the episode ids of each split."""
    records, filters = [], {}
    info_file = path / "dataset_info.json"
    file_format = json_field(info, "fileFormat", str, str(info_file), "tfrecord")
    if file_format != "tfrecord":
        raise DatasetFormatError(f"{info_file}: fileFormat {file_format}; only tfrecord is read")
    dataset = json_field(info, "name", str, str(info_file))
    for i, split in enumerate(json_field(info, "splits", list, str(info_file), [])):
        where = f"{info_file}: splits[{i}]"
        split_name = json_field(split, "name", str, where)
        lengths = shard_lengths(split, where)
        template = json_field(split, "filepathTemplate", str, where, DEFAULT_TEMPLATE)
        names = shard_names(template, dataset, split_name, file_format, len(lengths))
        first = len(records)
        for name, expected in zip(names, lengths, strict=True):
            file = path / name
            if not file.is_file():
                raise DatasetFormatError(f"{path}: shard {name} listed in dataset_info.json is missing")
            try:
                spans = record_spans(file)
            except ValueError as err:
                raise DatasetFormatError(str(err)) from None
            if len(spans) != expected:
                raise DatasetFormatError(f"{file}: {len(spans)} episodes, dataset_info.json says {expected}")
            records += [(file, offset, length, k) for k, (offset, length) in enumerate(spans)]
        filters[split_name] = list(range(first, len(records)))
    if not records:
        raise DatasetFormatError(f"{path}: dataset_info.json lists no episodes")
    return records, filters


def shard_names(template: str, dataset: str, split: str, file_format: str, shards: int) -> list[str]:
    """A split's shard file names from its ``filepathTemplate`` (TFDS's placeholders)."""
    return [
        template.replace("{DATASET}", dataset)
        .replace("{SPLIT}", split)
        .replace("{FILEFORMAT}", file_format)
        .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{shards:05d}")
        .replace("{SHARD_INDEX}", f"{i:05d}")
        .replace("{NUM_SHARDS}", f"{shards:05d}")
        for i in range(shards)
    ]


def shard_lengths(split: dict[str, Any], where: str) -> list[int]:
    """A split's ``shardLengths`` (TFDS writes the counts as strings) as ints."""
    lengths = json_field(split, "shardLengths", list, where, [])
    bad = [n for n in lengths if not (isinstance(n, int) or (isinstance(n, str) and n.isdigit()))]
    if bad:
        raise DatasetFormatError(f"{where}: 'shardLengths' holds {json.dumps(bad[0])}, not an episode count")
    return [int(n) for n in lengths]


_REQUIRED = object()


def json_field(obj: Any, key: str, kind: type, where: str, default: Any = _REQUIRED) -> Any:
    """``obj[key]``, a ``kind``; ``default`` when absent and given. A DatasetFormatError naming
    ``where`` (the file and the place in it) and the key otherwise: a malformed dataset_info.json
    is the dataset's fault, not a KeyError in the reader."""
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: {type(obj).__name__}, not a JSON object")
    if key not in obj:
        if default is _REQUIRED:
            raise DatasetFormatError(f"{where}: missing key '{key}'")
        return default
    value = obj[key]
    if not isinstance(value, kind):
        raise DatasetFormatError(f"{where}: '{key}' is {json.dumps(value)}, not a {kind.__name__}")
    return value


def step_features(features: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """The per-step leaf features of features.json, by path under ``steps``; a malformed tree is a
    DatasetFormatError naming the file and the feature (not a KeyError from deep in the reader)."""
    where = f"{path}/features.json"
    steps = _nested(features, "featuresDict", "features", "steps", "sequence", "feature")
    if not isinstance(steps, dict):
        raise DatasetFormatError(f"{where}: no 'steps' Dataset feature; not an RLDS dataset")
    leaves = _leaves(steps, where)
    for name, leaf in leaves.items():
        try:
            feature_shape(leaf)
        except (AttributeError, TypeError, ValueError):
            raise DatasetFormatError(f"{where}: steps/{name}: its shape is not a list of integers") from None
    return leaves


def _nested(tree: Any, *keys: str) -> Any:
    """``tree[k0][k1]...``, or None where a level is missing or not a JSON object."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _leaves(spec: Any, where: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    """A features.json FeaturesDict -> {path: leaf spec} (nested names joined with '/'), each level
    checked to be a JSON object (``where``: the file, for messages)."""
    if not isinstance(spec, dict):
        raise DatasetFormatError(f"{where}: feature steps/{prefix} is {json.dumps(spec)}, not a JSON object")
    if "featuresDict" not in spec:
        return {prefix: spec}
    subs = json_field(spec["featuresDict"], "features", dict, f"{where}: steps/{prefix} featuresDict")
    out = {}
    for name, sub in subs.items():
        out.update(_leaves(sub, where, f"{prefix}/{name}" if prefix else name))
    return out


def feature_shape(leaf: dict[str, Any]) -> tuple[int, ...]:
    body = leaf.get("tensor") or leaf.get("image") or {}
    return tuple(int(d) for d in body.get("shape", {}).get("dimensions", []))


def is_camera(leaf: dict[str, Any]) -> bool:
    """An RGB frame per step: an Image feature or a uint8 (H, W, 3) tensor; depth maps and masks
    (one channel) are not cameras."""
    shape = feature_shape(leaf)
    rgb = len(shape) == 3 and shape[2] == 3
    return rgb and ("image" in leaf or ("tensor" in leaf and leaf["tensor"].get("dtype") == "uint8"))
