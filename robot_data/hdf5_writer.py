"""Write any reader in the robomimic or ALOHA HDF5 layout (see :mod:`robot_data.hdf5`).

Used for test fixtures and to try the HDF5 recipes on the synthetic task. robomimic gets
``obs/state``, ``obs/<camera>_image``, ``actions`` and robomimic's other default dataset keys
``rewards`` (zeros) and ``dones`` (1 at the last step); ALOHA gets ``observations/qpos``,
``observations/qvel`` (zeros, which ACT's loader reads),
``observations/images/<camera>`` (raw, or PNG bytes padded per row when ``compress``, channels
reversed as ``cv2.imencode`` stores them) and
``action``. Per-frame text goes to a ``narration`` string dataset, the instruction to a ``task``
attribute.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from robot_data.reader import Episode, EpisodeArrays, Reader

TEXT = "narration"


def camera_name(camera: str) -> str:
    """Dataset-friendly camera name: the last dotted part (observation.images.top -> top)."""
    return camera.rsplit(".", 1)[-1]


def _first_task(ep: Episode, arrays: EpisodeArrays) -> str:
    """The one instruction an HDF5 episode holds: its first frame's (a frame's own task, where the
    reader gives per-frame ones, is the prompt training uses)."""
    return arrays.tasks[0] if arrays.tasks else ep.task


def _strings(group: h5py.Group, name: str, text: list[str | None]) -> None:
    """A string dataset; a frame without text (None) is written "", which the reader reads back as None
    (an HDF5 string cannot be null)."""
    rows = ["" if t is None else t for t in text]
    group.create_dataset(name, data=np.array(rows, dtype=object), dtype=h5py.string_dtype())


def write_robomimic(reader: Reader, path: str | Path) -> Path:
    """One file: data/demo_<episode>/{actions, obs/state, obs/<camera>_image, narration}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "SyntheticPick", "type": 1, "env_kwargs": {}})
        data.attrs["fps"] = reader.fps
        for ep in reader.episodes():
            arrays = reader.numeric(ep.index)
            demo = data.create_group(f"demo_{ep.index}")
            demo.attrs["num_samples"], demo.attrs["task"] = ep.length, _first_task(ep, arrays)
            demo.create_dataset("actions", data=arrays.action)
            # robomimic's default train.dataset_keys: no reward is known, done only at the last step
            demo.create_dataset("rewards", data=np.zeros(ep.length))
            demo.create_dataset("dones", data=np.arange(ep.length) == ep.length - 1, dtype=np.int64)
            demo.create_dataset("obs/state", data=arrays.state)
            for camera in reader.cameras:
                images = reader.frames(ep.index, camera, range(ep.length))
                demo.create_dataset(f"obs/{camera_name(camera)}_image", data=images, chunks=(1, *images.shape[1:]))
            if arrays.text is not None:
                _strings(demo, TEXT, arrays.text)
        data.attrs["total"] = sum(e.length for e in reader.episodes())
    return path


def _png_rows(images: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T, L) uint8: PNG bytes zero-padded to the longest, as ALOHA stores JPEG
    (lossless here, with the channels reversed as ``cv2.imencode`` reads them)."""
    blobs = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(buf, format="PNG")
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    out = np.zeros((len(blobs), max(len(b) for b in blobs)), np.uint8)
    for row, blob in zip(out, blobs, strict=True):
        row[: len(blob)] = blob
    return out


def write_aloha(reader: Reader, directory: str | Path, compress: bool = False) -> Path:
    """One file per episode: episode_<i>.hdf5 with action, observations/{qpos, images/<cam>}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for ep in reader.episodes():
        arrays = reader.numeric(ep.index)
        with h5py.File(directory / f"episode_{ep.index}.hdf5", "w") as f:
            f.attrs["sim"], f.attrs["compress"], f.attrs["fps"] = True, compress, reader.fps
            f.attrs["task"] = _first_task(ep, arrays)
            f.create_dataset("action", data=arrays.action)
            f.create_dataset("observations/qpos", data=arrays.state)
            f.create_dataset("observations/qvel", data=np.zeros_like(arrays.state))  # ACT reads it; none known
            for camera in reader.cameras:
                images = reader.frames(ep.index, camera, range(ep.length))
                data = _png_rows(images) if compress else images
                f.create_dataset(f"observations/images/{camera_name(camera)}", data=data)
            if arrays.text is not None:
                _strings(f, TEXT, arrays.text)
    return directory
