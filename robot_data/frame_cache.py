"""On-disk cache of decoded video frames, one ``.npy`` file per (camera, episode).

Random access into a video costs a seek plus decoding from the previous keyframe; a training
run reads every frame many times. The first access decodes the whole episode sequentially (the
cheap way) and stores it; later accesses memory-map the file. Entries are written to a temporary
name and renamed, so DataLoader workers that race on the same episode never see a partial file.
The key hashes the video path, size and mtime, so a re-encoded video never hits a stale entry,
plus the reader's ``extra``: whatever else picks the frames (LeRobot: the episode's segment start
and a digest of its parquet timestamps, so re-synced timestamps never hit one either).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


class FrameCache:
    """``get(video, camera, episode, decode_all)`` -> (T, H, W, 3) uint8, memory-mapped."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _entry(self, video: Path, camera: str, episode: int, extra: str) -> Path:
        st = video.stat()
        key = f"{video.resolve()}|{st.st_size}|{st.st_mtime_ns}|{extra}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.root / camera / f"episode_{episode:06d}_{digest}.npy"

    def get(
        self, video: Path, camera: str, episode: int, decode_all: Callable[[], np.ndarray], extra: str = ""
    ) -> np.ndarray:
        """``extra`` adds to the key whatever else selects the frames (e.g. the episode's time range)."""
        entry = self._entry(video, camera, episode, extra)
        if not entry.exists():
            frames = np.ascontiguousarray(decode_all(), dtype=np.uint8)
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, frames)
                os.replace(tmp, entry)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return np.load(entry, mmap_mode="r")
