"""MP4 video through PyAV: frames located by timestamp, and encoding for the writer.

Decoding seeks to the keyframe before the first wanted timestamp and decodes forward, so the
cost of one frame is the distance to the previous keyframe: writers should use a short GOP (the
writer here uses 2, like LeRobot). A frame matches a wanted timestamp when its presentation time
is within ``tolerance_s`` of it; anything else is an error naming the file and the timestamp.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

ENCODERS = {"h264": ("libx264", "h264"), "av1": ("libsvtav1", "libaom-av1", "av1")}
"""Codec name -> PyAV encoders tried in order (the first one this PyAV build has wins)."""


_INHERITED: list[Any] = []
"""Handles a forked child inherited from its parent. They are kept alive, never used or closed:
closing an FFmpeg/dav1d context whose threads live only in the parent can crash the child."""


def drop_if_forked(owner_pid: int, handles: OrderedDict[Any, Any]) -> int:
    """In a forked DataLoader worker, move the parent's open handles aside; returns this pid."""
    if owner_pid != os.getpid():
        _INHERITED.extend(handles.values())
        handles.clear()
    return os.getpid()


class VideoFrameError(ValueError):
    """A wanted frame is missing from a video or cannot be decoded."""


def video_stream(container: Any, path: str | Path) -> Any:
    """The first video stream of an open ``container``; a file with none (audio only, a mislabelled
    file) is a VideoFrameError naming ``path``, not PyAV's bare IndexError."""
    if not container.streams.video:
        streams = ", ".join(s.type for s in container.streams) or "none"
        raise VideoFrameError(f"{path}: no video stream (streams: {streams})")
    return container.streams.video[0]


MAX_OPEN = 64
"""Containers kept open per process (LRU). Reopening costs a file open and a header parse per
frame; a v2.1 dataset has one file per episode and camera, so shuffled samples over 3 cameras
with a handful open reopened a file for 9 frames in 10. An open container that has decoded
holds its decoder (frame buffers, and the decoder's threads, see DECODE_THREADS)."""

DECODE_THREADS = 1
"""Decoder threads per open container. FFmpeg's default (0: one per core, plus one) would park
cores+1 idle threads in each of the ``MAX_OPEN`` containers of each DataLoader worker (thousands
on a large node, past many containers' process limits), and on one 224x224 H.264 frame it cost as
much CPU as one thread or more; the loader's workers are the parallelism. At 1, neither FFmpeg's
H.264 decoder nor libdav1d (AV1) starts a thread, so a parent that decoded forks its DataLoader
workers with no decoder thread alive: at 0, a forked child that frees or uses an inherited
decoder waits forever on threads that exist only in the parent (tests/test_data_formats.py)."""


class VideoDecoder:
    """Decodes frames by timestamp, keeping up to ``max_open`` containers open in this process.

    Each DataLoader worker opens its own containers: they are dropped on pickling (spawn) and
    set aside after a fork (see ``drop_if_forked``).
    """

    def __init__(self, tolerance_s: float = 1e-3, max_open: int = MAX_OPEN):
        self.tolerance_s, self.max_open = tolerance_s, max_open
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"tolerance_s": self.tolerance_s, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _container(self, path: str) -> Any:
        self._pid = drop_if_forked(self._pid, self._open)
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        container = av.open(path)
        for stream in container.streams.video:
            stream.thread_count = DECODE_THREADS
        self._open[path] = container
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return container

    def close(self) -> None:
        self._pid = drop_if_forked(self._pid, self._open)
        while self._open:
            self._open.popitem()[1].close()

    def __del__(self) -> None:
        # PyAV containers sit in reference cycles, so without this they would wait for the cyclic
        # GC, which may run in a forked worker, where freeing them crashes (see _INHERITED).
        if hasattr(self, "_open"):
            self.close()

    def decode(self, path: str | Path, timestamps: Sequence[float], slack: Sequence[float] | None = None) -> np.ndarray:
        """Frames at ``timestamps`` (seconds from the file start) -> (n, H, W, 3) uint8, in the order asked.

        ``slack`` (n,): seconds added to the tolerance of each timestamp, the rounding of a time
        stored in lower precision (LeRobot's float32 timestamps, see ``lerobot.storage_slack``).
        """
        path = str(path)
        extra = np.zeros(len(timestamps)) if slack is None else np.asarray(slack, np.float64)
        tolerances: dict[float, float] = {}
        for t, s in zip(timestamps, extra, strict=True):
            tolerances[float(t)] = max(tolerances.get(float(t), 0.0), self.tolerance_s + float(s))
        try:
            container = self._container(path)
            stream = video_stream(container, path)
            if not len(timestamps):  # the frame size from the header, as every reader answers no frames
                return np.zeros((0, stream.codec_context.height, stream.codec_context.width, 3), np.uint8)
            found = self._scan(container, stream, dict(sorted(tolerances.items())))
        except (av.error.FFmpegError, OSError) as err:
            broken = self._open.pop(path, None)
            if broken is not None:
                broken.close()
            raise VideoFrameError(f"{path}: cannot decode ({err})") from None
        missing = [t for t in timestamps if float(t) not in found]
        if missing:
            raise VideoFrameError(
                f"{path}: no frame within {tolerances[float(missing[0])]:.3g}s of t={missing[0]:.4f}s "
                f"({len(missing)} of {len(timestamps)} wanted frames missing; video shorter than the episode?)"
            )
        return np.stack([found[float(t)] for t in timestamps])

    def _scan(self, container: Any, stream: Any, wanted: dict[float, float]) -> dict[float, np.ndarray]:
        """The nearest frame within its tolerance for each of ``wanted`` (sorted seconds -> tolerance)."""
        best: dict[float, tuple[float, np.ndarray]] = {}
        first, last = next(iter(wanted)), next(reversed(wanted))
        # Times are pts * time_base, as LeRobot stores them; seek lands on the keyframe before.
        container.seek(max(0, int((first - wanted[first]) / float(stream.time_base))), stream=stream)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base)
            # Frames come in presentation order: one at or past w is the last that can be nearest to w.
            nearer = [w for w, tol in wanted.items() if abs(w - t) <= tol and abs(w - t) < best.get(w, (np.inf,))[0]]
            if nearer:
                image = frame.to_ndarray(format="rgb24")
                best.update({w: (abs(w - t), image) for w in nearer})
            if t >= last:
                break
        return {w: image for w, (_, image) in best.items()}


def encode_video(frames: Iterable[np.ndarray], path: str | Path, fps: float, codec: str = "h264", gop: int = 2) -> str:
    """Write (H, W, 3) uint8 frames as an MP4 (yuv420p). Returns the encoder used.

    ``gop``: keyframe interval; short keeps random access cheap (see the module docstring).
    """
    if codec not in ENCODERS:
        raise ValueError(f"codec: unknown '{codec}'; valid: {', '.join(ENCODERS)}")
    encoder = next((e for e in ENCODERS[codec] if e in av.codecs_available), None)
    if encoder is None:
        raise RuntimeError(f"this PyAV build has no {codec} encoder (tried {', '.join(ENCODERS[codec])})")
    if encoder == "libsvtav1":
        # SVT-AV1 prints a config banner per file to stderr; 1 = errors only (a user's setting wins).
        os.environ.setdefault("SVT_LOG", "1")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        stream.pix_fmt, stream.codec_context.gop_size = "yuv420p", gop
        if encoder == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for i, image in enumerate(frames):
            if i == 0:
                stream.height, stream.width = image.shape[:2]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return encoder


def video_duration(path: str | Path) -> tuple[int, float]:
    """(frames, seconds) of the first video stream, from the container header (0 when unknown).

    ``seconds`` is where the stream ends on the file's clock, its start time plus its duration: a
    video whose first frame sits at t0 > 0 (a recorder's clock, as its timestamps) holds frames up
    to t0 + duration, the times a reader asks for."""
    with av.open(str(path)) as container:
        stream = video_stream(container, path)
        if not stream.duration:
            return int(stream.frames or 0), 0.0
        start = stream.start_time if stream.start_time is not None and stream.start_time > 0 else 0
        return int(stream.frames or 0), float((start + stream.duration) * stream.time_base)
