"""Write any reader as an RLDS dataset in TFDS's tfrecord layout (see :mod:`robot_data.rlds`).

Used for test fixtures and to try RLDS recipes on the synthetic task. Per step: ``observation/state``,
``observation/<camera>`` (PNG), ``action``, ``language_instruction``, the per-frame text as
``narration`` when the reader has one (a frame without text, None, as "": TFDS Text has no null,
and :class:`~robot_data.rlds.RLDSReader` reads "" back as None), and RLDS's ``is_first``,
``is_last``, ``is_terminal``, ``reward`` and ``discount``; per episode ``episode_metadata/file_path``.
Records carry TFRecord's masked CRC32C checksums, so TensorFlow's own reader accepts the files.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from robot_data.checksum import masked_crc
from robot_data.hdf5_writer import TEXT, camera_name
from robot_data.reader import Episode, Reader
from robot_data.rlds import INSTRUCTION
from robot_data.rlds_meta import DEFAULT_TEMPLATE, shard_names
from robot_data.tfrecord import Example


def frame_record(data: bytes) -> bytes:
    """One TFRecord frame around ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def _tensor(shape: Sequence[int], dtype: str, cls: str = "tensor_feature.Tensor") -> dict[str, Any]:
    body = {"shape": {"dimensions": [str(d) for d in shape]} if shape else {}, "dtype": dtype, "encoding": "none"}
    return {"pythonClassName": f"tensorflow_datasets.core.features.{cls}", "tensor": body}


def _text() -> dict[str, Any]:
    return {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}


def _dict(features: dict[str, Any]) -> dict[str, Any]:
    cls = "tensorflow_datasets.core.features.features_dict.FeaturesDict"
    return {"pythonClassName": cls, "featuresDict": {"features": features}}


def _image(shape: Sequence[int]) -> dict[str, Any]:
    """A PNG Image feature of ``shape`` (H, W, 3)."""
    return {
        "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
        "image": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": "uint8", "encodingFormat": "png"},
    }


def features_json(
    reader: Reader, state_dim: int, action_dim: int, has_text: bool, camera_shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """The features.json tree; ``camera_shapes``: each of the reader's cameras -> its (H, W, 3)."""
    observation = {"state": _tensor([state_dim], "float32")}
    observation.update({camera_name(c): _image(camera_shapes[c]) for c in reader.cameras})
    scalar = "scalar.Scalar"
    step = {
        "observation": _dict(observation),
        "action": _tensor([action_dim], "float32"),
        INSTRUCTION: _text(),
        **{k: _tensor([], "bool", scalar) for k in ("is_first", "is_last", "is_terminal")},
        **{k: _tensor([], "float32", scalar) for k in ("reward", "discount")},
        **({TEXT: _text()} if has_text else {}),
    }
    steps = {
        "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
        "sequence": {"feature": _dict(step), "length": "-1"},
    }
    return _dict({"steps": steps, "episode_metadata": _dict({"file_path": _text()})})


def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def episode_example(reader: Reader, ep: Episode) -> bytes:
    """One episode as a serialised tf.train.Example, every step feature one flat list."""
    episode, n = ep.index, ep.length
    arrays = reader.numeric(episode)
    example = Example()
    feature = example.features.feature
    feature["steps/observation/state"].float_list.value.extend(arrays.state.reshape(-1).tolist())
    feature["steps/action"].float_list.value.extend(arrays.action.reshape(-1).tolist())
    for camera in reader.cameras:
        frames = reader.frames(episode, camera, range(n))
        feature[f"steps/observation/{camera_name(camera)}"].bytes_list.value.extend(_png(f) for f in frames)
    tasks = arrays.tasks or [ep.task] * n
    feature[f"steps/{INSTRUCTION}"].bytes_list.value.extend(t.encode() for t in tasks)
    if arrays.text is not None:
        feature[f"steps/{TEXT}"].bytes_list.value.extend((t or "").encode() for t in arrays.text)
    last = [int(i == n - 1) for i in range(n)]
    feature["steps/is_first"].int64_list.value.extend(int(i == 0) for i in range(n))
    feature["steps/is_last"].int64_list.value.extend(last)
    feature["steps/is_terminal"].int64_list.value.extend(last)
    feature["steps/reward"].float_list.value.extend(map(float, last))
    feature["steps/discount"].float_list.value.extend([1.0] * n)
    feature["episode_metadata/file_path"].bytes_list.value.append(f"episode_{episode}".encode())
    return example.SerializeToString()


def write_rlds(
    reader: Reader,
    directory: str | Path,
    name: str = "vla_ft_synthetic",
    splits: dict[str, list[int]] | None = None,
    shards: int = 2,
) -> Path:
    """``directory`` (a version directory) with dataset_info.json, features.json and ``shards``
    tfrecord shards per split (``splits``: name -> episode ids; default every episode in ``train``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    episodes = {e.index: e for e in reader.episodes()}
    splits = splits or {"train": list(episodes)}
    first_episode = reader.episodes()[0].index
    first = reader.numeric(first_episode)
    shapes = {c: tuple(reader.frames(first_episode, c, [0]).shape[1:]) for c in reader.cameras}
    features = features_json(reader, first.state.shape[1], first.action.shape[1], first.text is not None, shapes)
    (directory / "features.json").write_text(json.dumps(features, indent=1))
    info_splits = []
    for split, ids in splits.items():
        parts = [list(part) for part in np.array_split(np.asarray(ids, dtype=np.int64), shards) if len(part)]
        for file, part in zip(shard_names(DEFAULT_TEMPLATE, name, split, "tfrecord", len(parts)), parts, strict=True):
            (directory / file).write_bytes(b"".join(frame_record(episode_example(reader, episodes[i])) for i in part))
        info_splits.append(
            {"name": split, "shardLengths": [str(len(p)) for p in parts], "filepathTemplate": DEFAULT_TEMPLATE}
        )
    info = {"name": name, "version": directory.name, "fileFormat": "tfrecord", "splits": info_splits}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return directory
