"""check_dataset: each corruption gives its named problem, naming the file and the episode."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from robot_data import HDF5Reader, LeRobotReader, Normalizer, RobotDataset, SyntheticReader, compute_stats
from robot_data.check import DatasetCheckError, Problem, bad_episodes, check_dataset, episodes_to_skip
from robot_data.check_lerobot import expected_hwc
from robot_data.hdf5 import OPEN_FILES
from robot_data.hdf5_writer import write_aloha, write_robomimic
from robot_data.language import PromptTokenizer
from robot_data.lerobot_writer import write_lerobot
from robot_data.reader import DatasetFormatError, Episode, EpisodeArrays, Reader
from robot_data.synthetic import CAMERA
from robot_data.video import VideoFrameError, encode_video

FILE0, FILE1 = "data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet"  # episodes 0-1, 2-3


def _source() -> SyntheticReader:
    return SyntheticReader(episodes=4, episode_length=8, image_size=16, seed=1)


@pytest.fixture
def images(tmp_path) -> Path:
    return write_lerobot(_source(), tmp_path / "images", video=False, episodes_per_file=2)


@pytest.fixture
def videos(tmp_path) -> Path:
    return write_lerobot(_source(), tmp_path / "videos", video=True, episodes_per_file=2)


def _edit_column(path: Path, column: str, edit) -> None:
    """Rewrite one column of a parquet file through numpy: edit(values (n, D) or (n,)) -> values."""
    table = pq.read_table(path)
    col = table[column].combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        values = edit(col.flatten().to_numpy().reshape(len(col), -1).copy())
        new = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    else:
        new = pa.array(edit(col.to_numpy().copy()))
    pq.write_table(table.set_column(table.column_names.index(column), column, new), path)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _kinds(problems: list[Problem]) -> set[tuple[str, int | None]]:
    return {(p.kind, p.episode) for p in problems}


def test_clean_datasets_pass(images, videos, tmp_path):
    assert check_dataset(images, "lerobot", decode="all") == []
    assert check_dataset(videos, "lerobot", decode="all") == []
    v21 = write_lerobot(_source(), tmp_path / "v21", video=True, version="v2.1")
    assert check_dataset(v21, "lerobot") == []
    write_robomimic(_source(), tmp_path / "rm.hdf5")
    assert check_dataset(tmp_path / "rm.hdf5", "hdf5", layout="robomimic", state_key="state", decode="all") == []
    write_aloha(_source(), tmp_path / "aloha", compress=True)
    assert check_dataset(tmp_path / "aloha", "hdf5", layout="aloha", decode="all") == []
    assert check_dataset(None, "synthetic") == []
    with pytest.raises(ValueError, match="valid: lerobot, hdf5, rlds, synthetic"):
        check_dataset(images, "zarr")


def test_missing_files(images, videos):
    (images / FILE1).unlink()
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("missing_file", 2), ("missing_file", 3)}
    assert all(p.file.endswith(FILE1) for p in problems)
    video = videos / "videos" / CAMERA / "chunk-000/file-000.mp4"
    video.unlink()
    problems = check_dataset(videos, "lerobot")
    assert _kinds(problems) == {("missing_file", 0), ("missing_file", 1)} and problems[0].file == str(video)
    (images / "meta/tasks.parquet").unlink()
    assert _kinds(check_dataset(images, "lerobot")) == {("missing_file", None)}
    (images / "meta/info.json").unlink()  # no LeRobot dataset at all: refused, naming the file
    with pytest.raises(DatasetFormatError, match=r"images: no meta/info.json"):
        check_dataset(images, "lerobot")


def test_wrong_shape_and_dtype(images):
    _edit_json(images / "meta/info.json", lambda info: info["features"]["observation.state"].update(shape=[4]))
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("bad_feature", e) for e in range(4)}
    assert "observation.state: 8 row(s) not of shape [4]" in problems[0].message
    _edit_json(images / "meta/info.json", lambda info: info["features"]["observation.state"].update(shape=[3]))
    _edit_column(images / FILE0, "action", lambda a: a.astype(str))
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("bad_feature", 0), ("bad_feature", 1)}
    assert "column action holds string, the features say float32" in problems[0].message


def test_float64_columns_declared_float32_pass(images):
    """pandas-built conversions store float64 under a float32 declaration; the reader casts (as
    LeRobot does), so nothing is wrong: no problem, and the values read are the ones written."""
    for column in ("observation.state", "action"):
        _edit_column(images / FILE0, column, lambda a: a.astype(np.float64))
    _edit_column(images / FILE1, "action", lambda a: a.astype(np.float16))
    assert check_dataset(images, "lerobot") == []
    source, reader = _source(), LeRobotReader(images)
    np.testing.assert_array_equal(reader.numeric(1).state, source.numeric(1).state)
    np.testing.assert_allclose(reader.numeric(2).action, source.numeric(2).action, atol=1e-3)


def test_nan_and_inf(images):
    def poison(a):
        a[8 + 3, 1] = np.nan  # episode 1, frame 3
        return a

    _edit_column(images / FILE0, "action", poison)
    _edit_column(images / FILE1, "observation.state", lambda s: np.where(np.arange(len(s))[:, None] == 12, np.inf, s))
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("non_finite", 1), ("non_finite", 3)}
    assert "action has 1 NaN/inf value(s), first at frame 3 dim 1" in str(problems[0])
    assert str(problems[0]).startswith(f"[non_finite] {images / FILE0} (episode 1)")


def test_non_contiguous_indices(images):
    _edit_column(images / FILE1, "frame_index", lambda f: np.where(np.arange(len(f)) == 5, 7, f))
    problems = check_dataset(images, "lerobot")
    assert ("index_gap", 2) in _kinds(problems) and bad_episodes(problems) == {2}  # (timestamps then disagree too)
    assert any("frame_index not contiguous" in p.message for p in problems)
    table = pq.read_table(images / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(
        table.filter(pa.compute.not_equal(table["episode_index"], 1)),
        images / "meta/episodes/chunk-000/file-000.parquet",
    )
    problems = check_dataset(images, "lerobot")
    assert ("index_gap", None) in _kinds(problems)
    assert any("missing [1]" in p.message for p in problems)


def test_timestamps_disagree_with_fps(images):
    _edit_column(images / FILE1, "timestamp", lambda t: np.where(np.arange(len(t)) == 12, t + 0.05, t))
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("timestamp", 3)}
    assert "at frame 4 disagrees with fps 10.0" in problems[0].message


T0 = 1234.56  # a recorder's clock at an episode's first frame: no multiple of 1 / fps


def _shift_timestamps(path: Path, shift: float) -> None:
    """Every data file's timestamps + ``shift`` seconds, stored as float32 as LeRobot stores them."""
    for data in sorted((path / "data").rglob("*.parquet")):
        _edit_column(data, "timestamp", lambda t: (t.astype(np.float64) + shift).astype(np.float32))


def _encode_at(frames: list[np.ndarray], path: Path, times: np.ndarray) -> None:
    """An MP4 whose frames sit at ``times`` (seconds on the file's clock, whole milliseconds)."""
    path.unlink()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.pix_fmt, stream.height, stream.width = "yuv420p", *frames[0].shape[:2]
        stream.codec_context.time_base = Fraction(1, 1000)
        for image, t in zip(frames, times, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _offset_dataset(tmp_path: Path, version: str, plain: Path | None = None) -> tuple[SyntheticReader, Path]:
    """The synthetic source written as LeRobot ``version`` with every timestamp moved to start at T0
    (v3: the segments' from_timestamp lowered by T0; v2.1: the videos re-encoded with frames at
    T0 + k / fps), as a recorder's clock would leave it; ``plain``: where to copy it unshifted first (the
    very videos: an encode is not repeatable bit for bit). Returns (source, dataset path)."""
    source = _source()
    path = write_lerobot(source, tmp_path / "ds", video=True, episodes_per_file=2, version=version)
    if plain is not None:
        shutil.copytree(path, plain)
    _shift_timestamps(path, T0)
    if version == "v3.0":
        for meta in (path / "meta/episodes").rglob("*.parquet"):
            _edit_column(meta, f"videos/{CAMERA}/from_timestamp", lambda t: t - T0)
    else:
        for ep in source.episodes():
            video = path / f"videos/chunk-000/{CAMERA}/episode_{ep.index:06d}.mp4"
            _encode_at(list(source.frames(ep.index, CAMERA, range(8))), video, T0 + np.arange(8) / source.fps)
    return source, path


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_timestamps_starting_at_an_offset_pass_and_read_their_frames(tmp_path, version):
    """LeRobot's check_timestamps_sync asks only that consecutive timestamps be 1 / fps apart: an
    episode starting at t0 != 0 (converted from a recorder's clock) passes, its frames read from the
    stored times (v3: from_timestamp + timestamp, the segment's from_timestamp absorbing t0; v2.1: the
    timestamp, the video's frames at t0 + k / fps), and a frame off its neighbours is still named."""
    source, path = _offset_dataset(tmp_path, version, plain=tmp_path / "plain")
    plain = LeRobotReader(tmp_path / "plain")
    assert check_dataset(path, "lerobot", decode="all") == []
    reader = LeRobotReader(path)
    for ep in (0, 3):
        # numeric() counts from the episode start, as every reader's; the stored times place the frames.
        np.testing.assert_allclose(reader.numeric(ep).timestamp, np.arange(8) / source.fps, atol=1e-3)
        np.testing.assert_allclose(reader.stored_times(ep), T0 + np.arange(8) / source.fps, atol=1e-3)
        frames = reader.frames(ep, CAMERA, range(8))
        assert np.abs(frames.astype(int) - source.frames(ep, CAMERA, range(8))).mean() < 8.0
        if version == "v3.0":  # the very frames the unshifted dataset reads
            np.testing.assert_array_equal(frames, plain.frames(ep, CAMERA, range(8)))
    data = path / (FILE1 if version == "v3.0" else "data/chunk-000/episode_000003.parquet")
    row = 8 + 4 if version == "v3.0" else 4  # episode 3, frame 4
    _edit_column(data, "timestamp", lambda t: np.where(np.arange(len(t)) == row, t + 0.05, t).astype(np.float32))
    problems = check_dataset(path, "lerobot", decode="none")
    assert _kinds(problems) == {("timestamp", 3)} and problems[0].file == str(data)
    assert "at frame 4 disagrees with fps 10.0" in problems[0].message


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_an_offset_dataset_converted_and_back_keeps_its_frames_on_a_clock_from_0(tmp_path, version):
    """LeRobot at t0 = T0 -> ALOHA -> LeRobot: every reader's timestamps are seconds from the episode
    start (k / fps, whatever the stored t0), and each frame stays with its numbers through both ways."""
    source, path = _offset_dataset(tmp_path, version)
    offset = LeRobotReader(path)
    aloha = HDF5Reader(write_aloha(offset, tmp_path / "aloha"), layout="aloha")
    back = write_lerobot(aloha, tmp_path / "back", video=True, episodes_per_file=2)
    assert check_dataset(back, "lerobot", decode="all") == []
    final = LeRobotReader(back)
    camera = final.cameras[0]
    for reader in (offset, aloha, final):
        for ep in source.episodes():
            np.testing.assert_allclose(reader.numeric(ep.index).timestamp, np.arange(8) / source.fps, atol=1e-3)
    for ep in source.episodes():
        np.testing.assert_array_equal(final.numeric(ep.index).action, source.numeric(ep.index).action)
        want = source.frames(ep.index, CAMERA, range(8)).astype(int)
        same = np.abs(want[:, None] - want[None]).mean(axis=(2, 3, 4)) < 1  # the source repeats frames
        for got in (aloha.frames(ep.index, aloha.cameras[0], range(8)), final.frames(ep.index, camera, range(8))):
            # frame k, through H.264 twice, is nearer the source's frame k than any other source frame
            dist = np.abs(got.astype(int)[:, None] - want[None]).mean(axis=(2, 3, 4))  # (got k, source j)
            for k in range(8):
                assert dist[k, k] < dist[k][~same[k]].min(), (ep.index, k, dist[k])


def test_video_shorter_than_episode(videos):
    video = videos / "videos" / CAMERA / "chunk-000/file-001.mp4"
    source = _source()
    frames = [im for ep in (2, 3) for im in source.frames(ep, CAMERA, range(8))][:12]  # episode 3 loses 4
    video.unlink()
    encode_video(frames, video, source.fps)
    problems = check_dataset(videos, "lerobot")
    assert _kinds(problems) == {("video_short", 3)} and problems[0].file == str(video)


def test_a_video_without_a_video_stream_is_named(videos):
    """An audio-only file where a camera's video should be: the reader's error and the check name
    the file and say it has no video stream (PyAV's bare IndexError named nothing)."""
    import av

    video = videos / "videos" / CAMERA / "chunk-000/file-001.mp4"  # episodes 2-3
    video.unlink()
    with av.open(str(video), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        silence.sample_rate = 8000
        for packet in stream.encode(silence):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoFrameError, match=f"{video}: no video stream \\(streams: audio\\)"):
        LeRobotReader(videos).frames(2, CAMERA, [0])
    problems = check_dataset(videos, "lerobot")
    assert _kinds(problems) == {("undecodable", 2), ("undecodable", 3)} and problems[0].file == str(video)
    assert f"{video}: no video stream" in problems[0].message


def _shorten_first_segment(videos: Path) -> None:
    """Re-encode file-000 with episode 0 one frame short, the offsets in meta/episodes to match
    (as LeRobot writes them after a dropped frame): episode 0's last data frame has no video frame."""
    source, video = _source(), videos / "videos" / CAMERA / "chunk-000/file-000.mp4"
    video.unlink()
    encode_video([*source.frames(0, CAMERA, range(7)), *source.frames(1, CAMERA, range(8))], video, source.fps)
    meta = videos / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(meta).to_pylist()
    rows[0][f"videos/{CAMERA}/to_timestamp"] = 7 / source.fps
    rows[1][f"videos/{CAMERA}/from_timestamp"], rows[1][f"videos/{CAMERA}/to_timestamp"] = 0.7, 1.5
    pq.write_table(pa.Table.from_pylist(rows), meta)


def test_a_frame_past_its_video_segment_is_refused(videos):
    """v3 shares one MP4 between episodes; a frame at or after the episode's to_timestamp is the
    next episode's: the check reports it, the reader refuses it, and every other frame is its own."""
    _shorten_first_segment(videos)
    problems = check_dataset(videos, "lerobot", decode="all")
    assert _kinds(problems) == {("video_short", 0)} and problems[0].file.endswith("file-000.mp4")
    assert "to_timestamp" in problems[0].message
    source, reader = _source(), LeRobotReader(videos)
    with pytest.raises(ValueError, match=r"file-000\.mp4: episode 0 frame 7 needs t=0\.7000s, .*to_timestamp 0\.7000s"):
        reader.frames(0, CAMERA, [6, 7])
    for episode, t in ((0, 6), (1, 0), (1, 7)):
        error = np.abs(reader.frames(episode, CAMERA, [t]).astype(int) - source.frames(episode, CAMERA, [t])).mean()
        assert error < 8.0, (episode, t, error)


def test_overlapping_or_empty_video_segments_are_named(videos):
    """Episodes sharing a file must own disjoint segments: a segment starting inside the one before
    gives its episode the other's frames; an empty one gives it none."""
    meta = videos / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(meta).to_pylist()
    clean = [dict(r) for r in rows]
    rows[1][f"videos/{CAMERA}/from_timestamp"] = 0.5  # episode 0 owns [0, 0.8)
    pq.write_table(pa.Table.from_pylist(rows), meta)
    problems = [p for p in check_dataset(videos, "lerobot", decode="none") if p.kind == "timestamp"]
    assert _kinds(problems) == {("timestamp", 1)} and "inside episode 0's (which ends at 0.800s)" in problems[0].message
    clean[0][f"videos/{CAMERA}/to_timestamp"] = 0.0
    pq.write_table(pa.Table.from_pylist(clean), meta)
    problems = [p for p in check_dataset(videos, "lerobot", decode="none") if p.kind == "timestamp"]
    assert _kinds(problems) == {("timestamp", 0)} and "empty video segment [0.000s, 0.000s)" in problems[0].message


def test_undecodable_frames(images):
    table = pq.read_table(images / FILE0)
    cells = table[CAMERA].to_pylist()
    cells[8] = {"bytes": b"\x89PNG not really", "path": None}  # episode 1, frame 0
    column = pa.array(cells, table.schema.field(CAMERA).type)
    pq.write_table(table.set_column(table.column_names.index(CAMERA), CAMERA, column), images / FILE0)
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("undecodable", 1)} and problems[0].file.endswith(FILE0)
    assert CAMERA in problems[0].message


def test_unknown_task_index(images):
    _edit_column(images / FILE1, "task_index", lambda t: np.where(np.arange(len(t)) < 8, 42, t))
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("unknown_task", 2)} and "[42]" in problems[0].message


def test_every_problem_at_once_and_the_skip_policy(images):
    _edit_column(images / FILE0, "action", lambda a: np.where(np.arange(len(a))[:, None] == 2, np.nan, a))
    _edit_column(images / FILE1, "task_index", lambda t: np.where(np.arange(len(t)) >= 8, 42, t))
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("non_finite", 0), ("unknown_task", 3)}
    assert bad_episodes(problems) == {0, 3}
    refused = r"2 problem\(s\)[\s\S]*skip_bad_episodes=true to skip episodes \[0, 3\]"
    with pytest.raises(DatasetCheckError, match=refused):
        episodes_to_skip(problems, skip_bad_episodes=False)
    assert episodes_to_skip(problems, skip_bad_episodes=True) == {0, 3}
    assert episodes_to_skip([], skip_bad_episodes=False) == set()
    whole = [*problems, Problem("missing_file", "meta/tasks.parquet", None, "missing")]
    with pytest.raises(DatasetCheckError, match="3 problem"):
        episodes_to_skip(whole, skip_bad_episodes=True)  # a dataset-level problem is never skippable


def test_hdf5_corruptions(tmp_path):
    write_robomimic(_source(), tmp_path / "rm.hdf5")
    with h5py.File(tmp_path / "rm.hdf5", "a") as f:
        f["data/demo_1/actions"][4, 0] = np.nan
        del f["data/demo_2/obs/state"]
    problems = check_dataset(tmp_path / "rm.hdf5", "hdf5", layout="robomimic", state_key="state")
    assert _kinds(problems) == {("non_finite", 1), ("bad_feature", 2)}
    assert problems[0].file.endswith("rm.hdf5:data/demo_1")
    write_aloha(_source(), tmp_path / "aloha", compress=True)
    with h5py.File(tmp_path / "aloha/episode_1.hdf5", "a") as f:
        images = f["observations/images/top"][:5]
        del f["observations/images/top"]
        f["observations/images/top"] = images
    with h5py.File(tmp_path / "aloha/episode_2.hdf5", "a") as f:
        f["observations/images/top"][7] = 7  # garbage bytes in the last frame
    problems = check_dataset(tmp_path / "aloha", "hdf5", layout="aloha")
    assert _kinds(problems) == {("video_short", 1), ("undecodable", 2)}
    assert problems[1].file.endswith("episode_2.hdf5:/")
    assert _kinds(check_dataset(tmp_path / "nowhere", "hdf5")) == {("missing_file", None)}


def _resize_rows(path: Path, column: str, resize: dict[int, int]) -> None:
    """Give rows ``i`` of a list column ``resize[i]`` extra (>0) or fewer (<0) values."""
    table = pq.read_table(path)
    rows = table[column].to_pylist()
    for i, extra in resize.items():
        rows[i] = rows[i] + [7.0] * extra if extra > 0 else rows[i][:extra]
    new = pa.array(rows, pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.column_names.index(column), column, new), path)


def test_a_malformed_row_leaves_the_rest_of_its_file_intact(tmp_path):
    """Rows of episodes 1 and 3 of one file lose/gain a value (the total still divides by the row
    count); only they are flagged, and episodes 0 and 2 of the same file read exactly as written."""
    source = _source()
    ds = write_lerobot(source, tmp_path / "one_file", video=False, episodes_per_file=4)
    _resize_rows(ds / FILE0, "observation.state", {8 + 3: 1, 24 + 5: -1})  # 8 frames per episode
    problems = check_dataset(ds, "lerobot", decode="none")
    assert _kinds(problems) == {("bad_feature", 1), ("bad_feature", 3)}
    reader = LeRobotReader(ds)
    for episode in (0, 2):
        np.testing.assert_array_equal(reader.numeric(episode).state, source.numeric(episode).state)
    state = reader.numeric(1).state
    assert state.shape == source.numeric(1).state.shape and np.isnan(state[3]).all() and np.isfinite(state[4:]).all()


def test_damaged_files_are_problems_of_their_episodes(videos):
    """A corrupt parquet file and a truncated video: per-episode problems (skippable), not a crash."""
    (videos / FILE1).write_bytes(b"not a parquet file")
    video0 = next((videos / "videos").rglob("file-000.mp4"))
    video0.write_bytes(video0.read_bytes()[:200])
    problems = check_dataset(videos, "lerobot")
    assert _kinds(problems) == {("unreadable", 2), ("unreadable", 3), ("undecodable", 0), ("undecodable", 1)}
    assert episodes_to_skip(problems, skip_bad_episodes=True) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"file-001\.parquet: unreadable parquet file"):
        LeRobotReader(videos).numeric(2)


def test_hdf5_damage_stays_with_its_episode(tmp_path):
    """The first demo's state datasets disagree in length, a later demo lacks its actions, an ALOHA
    episode file is truncated: each is one episode's problem, and the reader names it."""
    write_robomimic(_source(), tmp_path / "rm.hdf5")
    with h5py.File(tmp_path / "rm.hdf5", "a") as f:
        for demo in range(4):
            f[f"data/demo_{demo}/obs/extra"] = np.zeros((7 if demo == 0 else 8, 2), np.float32)
        del f["data/demo_3/actions"]
    kwargs = {"layout": "robomimic", "state_key": "state,extra"}
    problems = check_dataset(tmp_path / "rm.hdf5", "hdf5", **kwargs)
    assert _kinds(problems) == {("index_gap", 0), ("bad_feature", 3)}
    reader = HDF5Reader(tmp_path / "rm.hdf5", **kwargs)
    assert reader.numeric(1).state.shape == (8, 5)
    with pytest.raises(ValueError, match=r"demo_3: missing dataset\(s\) \['actions'\]"):
        reader.numeric(3)
    with pytest.raises(ValueError, match=r"demo_0: datasets of different lengths"):
        reader.numeric(0)

    write_aloha(_source(), tmp_path / "aloha")
    broken = tmp_path / "aloha/episode_1.hdf5"
    broken.write_bytes(broken.read_bytes()[:100])
    problems = check_dataset(tmp_path / "aloha", "hdf5", layout="aloha")
    assert _kinds(problems) == {("unreadable", 1)} and problems[0].file.endswith("episode_1.hdf5:/")
    with pytest.raises(ValueError, match="episode_1.hdf5:/: unreadable HDF5 file"):
        HDF5Reader(tmp_path / "aloha", layout="aloha").numeric(1)


def test_hdf5_text_missing_or_short_is_a_problem_of_its_episode(tmp_path):
    """data.text_key is per-frame text: a demo without it, or with a row short, is that demo's
    problem (file:group named, skippable), and reading it is an error naming file:group and key."""
    rm = write_robomimic(_source(), tmp_path / "rm.hdf5")  # narration: 8 rows per demo
    with h5py.File(rm, "a") as f:
        del f["data/demo_1/narration"]
        short = f["data/demo_2/narration"][:7]
        del f["data/demo_2/narration"]
        f["data/demo_2/narration"] = short
    kwargs = {"layout": "robomimic", "state_key": "state", "text_key": "narration"}
    problems = check_dataset(rm, "hdf5", **kwargs)
    assert _kinds(problems) == {("bad_feature", 1), ("index_gap", 2)}
    assert [(p.file, p.message) for p in problems] == [
        (f"{rm}:data/demo_1", "missing dataset(s) ['narration']"),
        (f"{rm}:data/demo_2", "narration has 7 rows, actions 8"),
    ]
    assert episodes_to_skip(problems, skip_bad_episodes=True) == {1, 2}
    reader = HDF5Reader(rm, **kwargs)
    assert len(reader.numeric(0).text) == 8
    for episode, message in (
        (1, r"missing text dataset narration \(data.text_key\)"),
        (2, "text dataset narration has 7 rows, actions 8"),
    ):
        with pytest.raises(DatasetFormatError, match=rf"^{rm}:data/demo_{episode}: {message}$"):
            reader.numeric(episode)


def _list_tasks(path: Path, listed: dict[int, list[str]]) -> None:
    """Set the ``tasks`` cell of the v3 episode metadata of each episode in ``listed``."""
    for meta in (path / "meta/episodes").rglob("*.parquet"):
        table = pq.read_table(meta)
        old = zip(table["episode_index"].to_pylist(), table["tasks"].to_pylist(), strict=True)
        cells = pa.array([listed.get(e, tasks) for e, tasks in old], pa.list_(pa.string()))
        pq.write_table(table.set_column(table.schema.get_field_index("tasks"), "tasks", cells), meta)


def test_a_listed_task_no_frame_has_is_named_and_frames_keep_their_own(images, tmp_path):
    """Episode 1's metadata lists its task, its frames' task_index points to episode 0's: the check
    names both (task_mismatch), and every frame's prompt is its own task, as LeRobot's ``task`` is
    (it got the listed one), also through a conversion to ALOHA."""
    listed, frames = "pick up the purple block", "pick up the blue block"  # the synthetic source's tasks 1, 0
    reader = LeRobotReader(images)
    assert reader.meta.tasks[0] == frames and reader.meta.episodes[1].tasks == [listed]  # the premise
    _edit_column(images / FILE0, "task_index", lambda t: np.where(np.arange(len(t)) >= 8, 0, t))  # episode 1
    problems = check_dataset(images, "lerobot", decode="none")
    assert _kinds(problems) == {("task_mismatch", 1)} and problems[0].file.endswith(FILE0)
    assert (
        problems[0].message
        == f"episode 1's metadata lists task(s) ['{listed}'], its frames' task_index gives ['{frames}']"
    )
    _list_tasks(images, {1: [frames]})
    assert check_dataset(images, "lerobot", decode="none") == []  # listed as the frames say: no mismatch
    _list_tasks(images, {1: [listed, frames]})
    assert check_dataset(images, "lerobot", decode="none") == []  # a stale extra listing misleads no frame
    _list_tasks(images, {1: [listed]})

    class SeenTasks:
        target, seen = "none", []

        def __call__(self, task, text, actions, mask):
            self.seen.append(task)
            return np.zeros(1, np.int64), np.zeros(0, np.int64)

    reader = LeRobotReader(images)
    assert reader.numeric(1).tasks == [frames] * 8 and reader.numeric(0).tasks is None
    prompts = SeenTasks()
    dataset = RobotDataset(reader, [1], 2, 1, Normalizer(compute_stats(reader, [1]), "mean_std"), 16, prompts)
    for t in (0, 7):
        dataset[t]
    assert prompts.seen == [frames, frames]
    with h5py.File(write_aloha(reader, tmp_path / "aloha") / "episode_1.hdf5") as f:
        assert f.attrs["task"] == frames


def test_an_instruction_that_changes_within_an_episode_reaches_each_frame(images):
    """LeRobot keeps a task_index per frame: frames 4-7 of episode 0 get episode 1's task."""
    reader = LeRobotReader(images)
    first, second = (reader.episodes()[i].task for i in (0, 1))
    assert first != second
    second_id = next(i for i, t in reader.meta.tasks.items() if t == second)
    _edit_column(images / FILE0, "task_index", lambda t: np.where(np.arange(len(t)) // 4 == 1, second_id, t))
    _list_tasks(images, {0: [first, second]})  # as LeRobot lists them, from the frames'
    assert not check_dataset(images, "lerobot", decode="none")
    reader = LeRobotReader(images)
    assert reader.numeric(0).tasks == [first] * 4 + [second] * 4 and reader.numeric(1).tasks is None

    class SeenTasks:
        target, seen = "none", []

        def __call__(self, task, text, actions, mask):
            self.seen.append(task)
            return np.zeros(1, np.int64), np.zeros(0, np.int64)

    prompts = SeenTasks()
    normalizer = Normalizer(compute_stats(reader, [0, 1]), "mean_std")
    dataset = RobotDataset(reader, [0], 2, 1, normalizer, 16, prompts)
    for t in (3, 4):
        dataset[t]
    assert prompts.seen == [first, second]


def test_aloha_with_more_episode_files_than_open_handles(tmp_path):
    write_aloha(SyntheticReader(episodes=OPEN_FILES + 1, episode_length=4, image_size=16), tmp_path / "aloha")
    assert check_dataset(tmp_path / "aloha", "hdf5", layout="aloha") == []
    assert len(HDF5Reader(tmp_path / "aloha", layout="aloha").episodes()) == OPEN_FILES + 1


def _drop(path: Path, column: str) -> None:
    pq.write_table(pq.read_table(path).drop_columns([column]), path)


def _null_cell(path: Path, column: str, row: int) -> None:
    table = pq.read_table(path)
    cells = table[column].to_pylist()
    cells[row] = None
    new = pa.array(cells, table.schema.field(column).type)
    pq.write_table(table.set_column(table.column_names.index(column), column, new), path)


def test_malformed_metadata_names_the_file_and_episode(videos, tmp_path):
    """A missing or null cell of the episode index is a DatasetFormatError naming the file and the
    episode (the trainer's one line; an 'unreadable' problem for the checks), never a KeyError;
    a null from_timestamp is never read as 0 (the first episode's frames)."""
    episodes = videos / "meta/episodes/chunk-000/file-000.parquet"
    v21 = write_lerobot(_source(), tmp_path / "v21", video=False, version="v2.1")
    lines = (v21 / "meta/episodes.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["length"]
    stats = write_lerobot(_source(), tmp_path / "v21_stats", video=False, version="v2.1") / "meta/episodes_stats.jsonl"
    stats_rows = stats.read_text().splitlines()
    cases = [
        (
            lambda: _null_cell(episodes, f"videos/{CAMERA}/from_timestamp", 3),
            videos,
            f"{episodes} (episode 3): videos/{CAMERA}/from_timestamp is null",
        ),
        (lambda: _drop(episodes, "length"), videos, f"{episodes} (episode 0): length is missing"),
        (
            lambda: _edit_json(videos / "meta/info.json", lambda info: info.update(video_path=None)),
            videos,
            f"{videos / 'meta/info.json'}: video_path is None, but ['{CAMERA}'] are videos",
        ),
        (
            lambda: (v21 / "meta/episodes.jsonl").write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]])),
            v21,
            f"{v21 / 'meta/episodes.jsonl'} row 3 (episode 2): length is missing",
        ),
        (
            lambda: stats.write_text("\n".join([*stats_rows[:1], json.dumps({"episode_index": 1}), *stats_rows[2:]])),
            stats.parents[1],
            f"{stats}: malformed statistics (KeyError: 'stats')",
        ),
    ]
    for damage, root, message in cases:
        damage()
        with pytest.raises(DatasetFormatError) as caught:
            LeRobotReader(root)
        assert str(caught.value) == message
        problems = check_dataset(root, "lerobot")
        assert [(p.kind, p.episode) for p in problems] == [("unreadable", None)] and message in problems[0].message


def test_camera_shape_declared_channel_first(images):
    """(C, H, W) with names channel/channels/rgb, or no names, stands for the (H, W, 3) frames."""
    camera = images / "meta/info.json"
    for names in (["channel", "height", "width"], ["rgb", "height", "width"], None):
        _edit_json(camera, lambda info, n=names: info["features"][CAMERA].update(shape=[3, 16, 16], names=n))
        assert check_dataset(images, "lerobot") == [], names
    _edit_json(
        camera, lambda info: info["features"][CAMERA].update(shape=[3, 16, 20], names=["channel", "height", "width"])
    )
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("bad_feature", e) for e in range(4)}
    assert "frames are (16, 16, 3), the features say (16, 20, 3)" in problems[0].message
    for shape, names, hwc in (
        ([3, 48, 64], ["channel", "height", "width"], (48, 64, 3)),
        ([3, 48, 64], ["channels", "width", "height"], (64, 48, 3)),
        ([48, 64, 3], ["height", "width", "rgb"], (48, 64, 3)),
        ([3, 48, 64], None, (48, 64, 3)),
        ([48, 64, 3], ["h", "w", "c"], (48, 64, 3)),
        ([48, 64, 3], ["a", "b", "c"], (48, 64, 3)),
    ):
        assert expected_hwc({"shape": shape, "names": names}) == hwc, (shape, names)


def test_a_frame_without_text_is_reported_by_every_format_as_lerobot_reports_it(tmp_path):
    """The LeRobot check reports a null narration cell as missing_text; the same dataset written as
    RLDS and as HDF5 (where the frame's text is an empty string) is reported by their checks with
    the same kind, episode and words (those checks were silent, and training gave the frame no target)."""
    from conftest import lerobot_with_a_null_narration

    from robot_data.rlds_writer import write_rlds

    source = lerobot_with_a_null_narration(tmp_path / "lr")
    expected = check_dataset(source.path, "lerobot", text_key="narration")
    assert [(p.kind, p.episode) for p in expected] == [("missing_text", 0)]
    written = {
        "rlds": (write_rlds(source, tmp_path / "rlds" / "1.0.0"), {"fps": 10}),
        "robomimic": (write_robomimic(source, tmp_path / "rm.hdf5"), {"state_key": "state", "action_key": "actions"}),
        "aloha": (write_aloha(source, tmp_path / "aloha"), {"layout": "aloha"}),
    }
    for name, (path, kwargs) in written.items():
        fmt = "rlds" if name == "rlds" else "hdf5"
        problems = check_dataset(path, fmt, text_key="narration", **kwargs)
        got = [(p.kind, p.episode, p.message.removeprefix("obs/")) for p in problems]
        assert got == [(p.kind, p.episode, p.message) for p in expected], name


def test_a_null_text_cell_is_a_frame_without_narration(images):
    """A null text cell is a frame without narration (None, not the string 'None'): the check
    names the episode and frame, and the dataset gives that frame an empty language target."""
    _null_cell(images / FILE0, "narration", 8 + 3)  # episode 1, frame 3
    problems = check_dataset(images, "lerobot", text_key="narration")
    assert _kinds(problems) == {("missing_text", 1)} and problems[0].file.endswith(FILE0)
    assert "1 null text cell(s), first at frame 3" in problems[0].message
    reader = LeRobotReader(images, text_key="narration")
    text = reader.numeric(1).text
    assert text[3] is None and all(isinstance(t, str) and t != "None" for i, t in enumerate(text) if i != 3)

    class Words:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    prompts = PromptTokenizer(Words(), "do {instruction}", "text")
    dataset = RobotDataset(reader, [1], 2, 1, Normalizer(compute_stats(reader, [1]), "mean_std"), 16, prompts)
    assert len(dataset[3]["target_ids"]) == 0
    assert len(dataset[2]["target_ids"]) > 1 and len(dataset[4]["target_ids"]) > 1


@pytest.mark.parametrize("column", ["episode_index", "frame_index", "timestamp", "task_index"])
def test_a_null_index_cell_is_named_by_the_check_and_the_reader(images, column):
    """Which episode, frame, video time or instruction a row with a null index cell has is
    unknowable: the check names the file and column for each of its episodes, the reader refuses
    the file (a NaN cast to an integer would place the row at random)."""
    _null_cell(images / FILE0, column, 8 + 3)
    problems = check_dataset(images, "lerobot")
    assert _kinds(problems) == {("bad_feature", 0), ("bad_feature", 1)}
    assert all(f"column {column}: 1 null cell(s), first at row 11" in p.message for p in problems)
    with pytest.raises(DatasetFormatError, match=f"file-000.parquet: column {column}: 1 null cell"):
        LeRobotReader(images).numeric(0)
    assert len(LeRobotReader(images).numeric(2).state) == 8  # the other file reads


class _LongTimeline(Reader):
    """A short episode then one past 2048 s at 0.9 fps (16x16 frames, each its own grey), for
    timestamps whose float32 storage is off from k / fps by more than 1e-4 s."""

    fps, cameras, gripper_dims = 0.9, ["observation.images.top"], []
    lengths = (3, 1900)

    def episodes(self) -> list[Episode]:
        return [Episode(i, n, "wait") for i, n in enumerate(self.lengths)]

    def numeric(self, episode_index: int) -> EpisodeArrays:
        n = self.lengths[episode_index]
        ramp = np.linspace(0, 1, n, dtype=np.float32)[:, None]
        return EpisodeArrays(ramp, ramp, np.arange(n) / self.fps)

    def frames(self, episode_index: int, camera: str, frame_indices) -> np.ndarray:
        grey = [(37 * t + 90 * episode_index) % 200 + 20 for t in frame_indices]
        return np.stack([np.full((16, 16, 3), g, np.uint8) for g in grey])


def test_float32_timestamps_of_a_long_episode_are_within_a_tight_tolerance(tmp_path):
    """LeRobot stores timestamps as float32: past 2048 s its steps are 2.4e-4 s, so k / fps itself is
    stored up to 1.2e-4 s off. With video_tolerance_s 1e-4 the check passes such an episode and the
    reader finds its frames (behind another episode in a shared v3 file); a wrong time still fails."""
    source = _LongTimeline()
    path = write_lerobot(source, tmp_path / "long", video=True, episodes_per_file=2)
    k = np.arange(source.lengths[1])
    rounding = np.abs(np.float32(k / source.fps).astype(np.float64) - k / source.fps)
    assert rounding.max() > 1e-4  # the premise: LeRobot's own float32 timestamps exceed the tolerance
    assert check_dataset(path, "lerobot", video_tolerance_s=1e-4, decode="all") == []
    reader = LeRobotReader(path, video_tolerance_s=1e-4)
    worst = [int(t) for t in np.argsort(rounding)[-5:]]
    error = np.abs(reader.frames(1, source.cameras[0], worst).astype(int) - source.frames(1, "", worst)).max()
    assert error <= 4, error
    _edit_column(path / FILE0, "timestamp", lambda t: np.where(np.arange(len(t)) == 3 + 1880, t + 1e-3, t))
    problems = check_dataset(path, "lerobot", video_tolerance_s=1e-4, decode="none")
    assert _kinds(problems) == {("timestamp", 1)} and "at frame 1880 disagrees" in problems[0].message
