"""Readers across formats: the same synthetic episodes written as LeRobot v3.0 (images, H.264,
AV1), v2.1, robomimic and ALOHA HDF5 read back as the same samples."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from robot_data import Normalizer, RobotDataset, SyntheticReader, build_reader, compute_stats, split_episodes
from robot_data.check import check_dataset
from robot_data.hdf5_writer import write_aloha, write_robomimic
from robot_data.lerobot_writer import write_lerobot
from robot_data.normalize import compare_stats, resolve_stats
from robot_data.reader import DatasetFormatError, Episode, EpisodeArrays, Reader, UnknownFeatureError
from robot_data.synthetic import CAMERA

N_EPISODES, LENGTH, SIZE = 5, 10, 32
GOLDEN_NUMERIC = "d10ae6efdb255717"  # sha256[:16] of state+action bytes of episodes 0..4
GOLDEN_FRAMES = "2cd1b564b3e86e21"  # sha256[:16] of every decoded frame of episodes 0..4
VIDEO_MEAN_ABS_ERROR = 8.0  # yuv420p chroma subsampling blurs 1-px edges of a 32x32 image


def _source() -> SyntheticReader:
    return SyntheticReader(episodes=N_EPISODES, episode_length=LENGTH, image_size=SIZE, seed=0)


def _digests(reader, camera: str) -> tuple[str, str]:
    numeric, frames = hashlib.sha256(), hashlib.sha256()
    for ep in range(N_EPISODES):
        arrays = reader.numeric(ep)
        numeric.update(np.ascontiguousarray(arrays.state, np.float32).tobytes())
        numeric.update(np.ascontiguousarray(arrays.action, np.float32).tobytes())
        frames.update(reader.frames(ep, camera, range(LENGTH)).tobytes())
    return numeric.hexdigest()[:16], frames.hexdigest()[:16]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[str, dict, bool]]:
    """name -> (path, build_reader kwargs, lossless)."""
    root, source = tmp_path_factory.mktemp("formats"), _source()
    out: dict[str, tuple[str, dict, bool]] = {}
    lerobot = {"text_key": "narration"}
    for name, kw in {
        "v3_image": {"video": False},
        "v3_h264": {"video": True},
        "v3_av1": {"video": True, "codec": "av1"},
        "v21_image": {"video": False, "version": "v2.1"},
        "v21_h264": {"video": True, "version": "v2.1"},
    }.items():
        write_lerobot(source, root / name, episodes_per_file=2, **kw)
        out[name] = ("lerobot", {"path": str(root / name), **lerobot}, not kw["video"])
    write_robomimic(source, root / "robomimic.hdf5")
    out["robomimic"] = (
        "hdf5",
        {"path": str(root / "robomimic.hdf5"), "layout": "robomimic", "state_key": "state", "text_key": "narration"},
        True,
    )
    write_aloha(source, root / "aloha")
    out["aloha"] = ("hdf5", {"path": str(root / "aloha"), "layout": "aloha", "text_key": "narration"}, True)
    write_aloha(source, root / "aloha_png", compress=True)
    out["aloha_png"] = ("hdf5", {"path": str(root / "aloha_png"), "layout": "aloha"}, True)
    return out


def _reader(datasets, name: str):
    fmt, kwargs, lossless = datasets[name]
    return build_reader(fmt, **kwargs), lossless


def test_synthetic_matches_golden():
    assert _digests(_source(), CAMERA) == (GOLDEN_NUMERIC, GOLDEN_FRAMES)


@pytest.mark.parametrize(
    "name", ["v3_image", "v3_h264", "v3_av1", "v21_image", "v21_h264", "robomimic", "aloha", "aloha_png"]
)
def test_reader_matches_synthetic(datasets, name):
    reader, lossless = _reader(datasets, name)
    source = _source()
    assert [(e.index, e.length, e.task) for e in reader.episodes()] == [
        (e.index, e.length, e.task) for e in source.episodes()
    ]
    assert reader.fps == source.fps and len(reader.cameras) == 1
    numeric, frames = _digests(reader, reader.cameras[0])
    assert numeric == GOLDEN_NUMERIC
    if lossless:
        assert frames == GOLDEN_FRAMES
    else:
        for ep in range(N_EPISODES):
            got = reader.frames(ep, reader.cameras[0], range(LENGTH)).astype(np.int16)
            assert np.abs(got - source.frames(ep, CAMERA, range(LENGTH))).mean() < VIDEO_MEAN_ABS_ERROR
    arrays, expected = reader.numeric(3), source.numeric(3)
    np.testing.assert_allclose(arrays.timestamp, expected.timestamp, atol=1e-6)
    if datasets[name][1].get("text_key"):
        assert arrays.text == expected.text


def _samples(reader, stats, episodes):
    ds = RobotDataset(
        reader,
        episodes,
        chunk=4,
        history=2,
        normalizer=Normalizer(stats, "mean_std", [2]),
        image_size=24,
        prompt_tokenizer=None,
    )
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("name", ["v3_image", "v21_h264", "robomimic", "aloha_png"])
def test_same_samples_across_formats(datasets, name):
    reader, lossless = _reader(datasets, name)
    source = _source()
    stats = compute_stats(source, range(N_EPISODES))
    train, _ = split_episodes([e.index for e in reader.episodes()], 0.4, [], seed=3)
    assert (train, _) == split_episodes(range(N_EPISODES), 0.4, [], seed=3)
    for got, want in zip(_samples(reader, stats, train), _samples(source, stats, train), strict=True):
        for key in want:
            if key == "images" and not lossless:
                assert (got[key].float() - want[key].float()).abs().mean() < VIDEO_MEAN_ABS_ERROR
            else:
                assert torch.equal(got[key], want[key]), key
    last = _samples(reader, stats, [train[0]])[-1]  # chunk padding at the episode end
    assert last["action_mask"].tolist() == [True, False, False, False]


def test_stats_shipped_with_the_dataset(datasets):
    x = {
        k: np.concatenate([getattr(_source().numeric(e), k) for e in range(N_EPISODES)]).astype(np.float64)
        for k in ("state", "action")
    }
    for name in ("v3_image", "v21_image"):  # v3.0: meta/stats.json; v2.1: pooled episodes_stats.jsonl
        shipped = _reader(datasets, name)[0].stats()
        for key in ("state", "action"):
            np.testing.assert_allclose(shipped[key]["mean"], x[key].mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(shipped[key]["std"], x[key].std(0), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(shipped[key]["min"], x[key].min(0))
            np.testing.assert_allclose(shipped[key]["max"], x[key].max(0))
    v3 = _reader(datasets, "v3_image")[0].stats()
    np.testing.assert_allclose(v3["action"]["q99"], np.quantile(x["action"], 0.99, axis=0), rtol=1e-5, atol=1e-6)
    assert _reader(datasets, "robomimic")[0].stats() is None


def test_resolve_stats_reports_disagreement(datasets, tmp_path):
    reader = _reader(datasets, "v21_image")[0]
    stats, report = resolve_stats(reader, [0, 1])
    assert report == [] and "q01" in stats["action"]  # filled in from a fresh computation
    path = datasets["v3_image"][1]["path"]
    stats_file = Path(path) / "meta/stats.json"
    meta = json.loads(stats_file.read_text())
    meta["action"]["mean"][1] += 1.0
    stats_file.write_text(json.dumps(meta))
    try:
        reader = _reader(datasets, "v3_image")[0]
        stats, report = resolve_stats(reader, [0, 1])
        assert len(report) == 1 and report[0].startswith("action.mean[1]: shipped")
        computed = compute_stats(reader, [0, 1])  # reported, never normalised with
        assert all(np.array_equal(stats[k][s], computed[k][s]) for k in computed for s in computed[k])
    finally:
        meta["action"]["mean"][1] -= 1.0
        stats_file.write_text(json.dumps(meta))


def test_a_nan_on_one_side_of_the_stats_is_reported(tmp_path):
    """A shipped stats.json with a NaN where the data has a number disagrees with it (NaN compares
    false, so a plain threshold would pass it); NaN on both sides agrees; a NaN std does not hide
    the other stats' differences in that dim."""
    source = SyntheticReader(episodes=2, episode_length=LENGTH, image_size=SIZE)
    root = write_lerobot(source, tmp_path / "ds", video=False)
    stats_file = root / "meta/stats.json"
    meta = json.loads(stats_file.read_text())
    meta["action"]["mean"][1] = float("nan")
    stats_file.write_text(json.dumps(meta))
    reader = build_reader("lerobot", path=str(root))
    stats, report = resolve_stats(reader, [0, 1])
    assert len(report) == 1 and report[0].startswith("action.mean[1]: shipped nan, computed ")
    fresh = {k: {s: v.copy() for s, v in stats[k].items()} for k in stats}
    fresh["action"]["mean"][1] = np.nan
    assert compare_stats(reader.stats(), fresh) == []
    assert compare_stats(stats, fresh) == [f"action.mean[1]: shipped {stats['action']['mean'][1]:.6g}, computed nan"]
    no_spread = {k: {s: v.copy() for s, v in stats[k].items()} for k in stats}
    no_spread["action"]["std"][1] = np.nan  # a difference is then measured against the floor
    moved = {k: {s: v + 1.0 for s, v in stats[k].items()} for k in stats}
    assert "action.mean[1]: shipped" in "\n".join(compare_stats(moved, no_spread))


class ValidationOutlier(SyntheticReader):
    """Episode 4 (validation below) moves action dim 0 by +5, about 100x its spread elsewhere."""

    def numeric(self, episode_index: int):
        arrays = super().numeric(episode_index)
        if episode_index == 4:
            arrays.action[:, 0] += 5.0
        return arrays


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_shipped_stats_never_bring_validation_episodes_into_normalisation(tmp_path, version):
    """The dataset's stats file describes every episode, the validation outlier included; the
    stats to normalise with are the training episodes' alone (v2.1's missing q01/q99 too), and
    the file, which matches the whole dataset, is reported as agreeing."""
    source = ValidationOutlier(episodes=N_EPISODES, episode_length=LENGTH, image_size=SIZE)
    reader = build_reader("lerobot", path=str(write_lerobot(source, tmp_path / "ds", video=False, version=version)))
    assert reader.stats()["action"]["max"][0] > 4.9
    stats, report = resolve_stats(reader, [0, 1, 2, 3])
    assert report == []
    for key in ("state", "action"):
        x = np.concatenate([getattr(source.numeric(e), key) for e in range(4)]).astype(np.float64)
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[key]["max"], x.max(0))
        np.testing.assert_allclose(stats[key]["q01"], np.quantile(x, 0.01, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[key]["q99"], np.quantile(x, 0.99, axis=0), rtol=1e-5, atol=1e-6)
        assert np.all(stats[key]["count"] == len(x))


def test_video_frame_cache(datasets, tmp_path):
    fmt, kwargs, _ = datasets["v3_h264"]
    plain = build_reader(fmt, **kwargs)
    cached = build_reader(fmt, **{**kwargs, "frame_cache": str(tmp_path / "cache")})
    for ep in (4, 1):
        assert np.array_equal(cached.frames(ep, CAMERA, [9, 0, 5]), plain.frames(ep, CAMERA, [9, 0, 5]))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    again = build_reader(fmt, **{**kwargs, "frame_cache": str(tmp_path / "cache")})
    assert np.array_equal(again.frames(4, CAMERA, range(LENGTH)), plain.frames(4, CAMERA, range(LENGTH)))


def test_frame_cache_misses_after_the_timestamps_are_resynced(datasets, tmp_path):
    """The parquet timestamps pick the frames: re-synced times (the videos untouched) must read the
    frames at the new times through the cache, as a reader without cache does, not the old entry."""
    path = tmp_path / "ds"
    shutil.copytree(datasets["v3_h264"][1]["path"], path)
    cached = {"path": str(path), "frame_cache": str(tmp_path / "cache")}
    before = build_reader("lerobot", **cached).frames(1, CAMERA, range(LENGTH))  # fills the cache
    data = build_reader("lerobot", path=str(path)).meta.episodes[1].data_path
    table = pq.read_table(data)
    stamps = table["timestamp"].to_numpy().copy()
    rows = table["episode_index"].to_numpy() == 1
    stamps[rows] = stamps[rows][::-1]  # the episode's frames re-synced in reverse order
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(stamps)), data)
    plain = build_reader("lerobot", path=str(path)).frames(1, CAMERA, range(LENGTH))
    assert not np.array_equal(plain, before)  # the edit moved the frames
    np.testing.assert_array_equal(build_reader("lerobot", **cached).frames(1, CAMERA, range(LENGTH)), plain)


def _rlds_reader(tmp_path):
    from robot_data.rlds_writer import write_rlds

    return build_reader("rlds", path=str(write_rlds(_source(), tmp_path / "rlds" / "1.0.0")), fps=10)


@pytest.mark.parametrize(
    "name",
    ["v3_image", "v3_h264", "v3_av1", "v21_image", "v21_h264", "robomimic", "aloha", "aloha_png", "cached", "rlds"],
)
def test_no_frames_read_as_an_empty_batch_of_the_frame_shape(datasets, tmp_path, name):
    """Zero frame indices -> (0, H, W, 3) uint8, H and W those of a frame the reader decodes, in every format."""
    if name == "rlds":
        reader = _rlds_reader(tmp_path)
    elif name == "cached":
        reader = build_reader("lerobot", **{**datasets["v3_av1"][1], "frame_cache": str(tmp_path / "cache")})
    else:
        reader, _ = _reader(datasets, name)
    camera = reader.cameras[0]
    for indices in ([], range(0), np.zeros(0, np.int64)):
        empty = reader.frames(2, camera, indices)
        assert empty.dtype == np.uint8 and empty.shape == (0, *reader.frames(2, camera, [3]).shape[1:])


class ThreeCameras(SyntheticReader):
    """The synthetic episodes seen by three cameras (pixel (0, 0) tagged with the camera's number)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cameras = [f"observation.images.cam{k}" for k in range(3)]

    def frames(self, episode_index, camera, frame_indices):
        frames = super().frames(episode_index, CAMERA, frame_indices).copy()
        frames[:, 0, 0] = 50 * self.cameras.index(camera)
        return frames


def test_only_the_cameras_training_reads_are_checked(tmp_path):
    """A camera left out by data.cameras (a broken depth or spare view) must not refuse the dataset."""
    from conftest import QUICKSTART

    from vla_ft.config import RecipeError, load_recipe
    from vla_ft.data import checked_skip_list

    source = ThreeCameras(episodes=2, episode_length=6, image_size=16)
    path = write_lerobot(source, tmp_path / "ds", video=True, episodes_per_file=2)
    shutil.rmtree(path / "videos" / "observation.images.cam2")
    assert {(p.kind, p.episode) for p in check_dataset(path, "lerobot")} == {("missing_file", 0), ("missing_file", 1)}
    assert check_dataset(path, "lerobot", cameras=["observation.images.cam0", "observation.images.cam1"]) == []
    data = ["data.format=lerobot", f"data.path={path}", "data.text_key=null", "data.language_target=none"]
    with pytest.raises(RecipeError, match="failed its checks"):
        checked_skip_list(load_recipe(QUICKSTART, data))
    two = "data.cameras=[observation.images.cam0, observation.images.cam1]"
    assert checked_skip_list(load_recipe(QUICKSTART, [*data, two])) == set()


def test_image_cells_are_read_once_in_shuffled_multi_camera_access(tmp_path, monkeypatch):
    """Three cameras, shuffled samples over a file of 4 episodes (one row group each, as written):
    each image cell is read from parquet once, and each frame is its own episode's and camera's."""
    source = ThreeCameras(episodes=4, episode_length=6, image_size=16)
    path = write_lerobot(source, tmp_path / "ds", video=False, episodes_per_file=4)
    cells_read = []

    def counted(table):  # image cells materialised, whichever pyarrow call read them
        cells_read.append(table.num_rows * len(set(table.column_names) & set(source.cameras)))
        return table

    read_table, read_row_group = pq.read_table, pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: counted(read_table(*a, **k)))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: counted(read_row_group(self, *a, **k)))
    reader = build_reader("lerobot", path=str(path))
    samples = [(e, t) for e in range(4) for t in range(6)]
    random.Random(0).shuffle(samples)
    for episode, t in samples:
        for camera in source.cameras:
            np.testing.assert_array_equal(reader.frames(episode, camera, [t]), source.frames(episode, camera, [t]))
    assert sum(cells_read) == 4 * 6 * 3


def test_video_files_stay_open_across_episodes(datasets, monkeypatch):
    """v2.1 has one MP4 per episode and camera: reading 5 episodes round-robin, twice, opens each
    once, and the open decoders park no threads (FFmpeg's default: one per core plus one, per
    container, so at least 2 each). One stray thread from elsewhere in the process is tolerated."""
    reader, _ = _reader(datasets, "v21_h264")
    opened, real_open = [], av.open
    monkeypatch.setattr(av, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    reader.frames(0, CAMERA, [0])
    threads = len(os.listdir("/proc/self/task"))
    for t in (0, 5):
        for episode in range(N_EPISODES):
            reader.frames(episode, CAMERA, [t])
    assert len(opened) == len(set(opened)) == N_EPISODES
    assert len(os.listdir("/proc/self/task")) - threads < N_EPISODES


def _decoder_threads() -> int:
    """Threads of this process, as the kernel lists them (FFmpeg's and dav1d's too, unlike ``threading``)."""
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("name", ["v3_h264", "v3_av1"])
def test_decoding_starts_no_threads(datasets, name):
    """A forked worker inherits no thread of its parent: had the parent's decoders threads (FFmpeg's
    default, dav1d's too), a child freeing or using an inherited decoder would wait on them forever."""
    reader, _ = _reader(datasets, name)
    for ep in range(N_EPISODES):  # parquet first: pyarrow's thread pool starts on its first reads
        reader.numeric(ep)
    threads = _decoder_threads()
    for ep in range(N_EPISODES):
        reader.frames(ep, CAMERA, [0, LENGTH - 1])
    assert len(reader._decoder._open) == 3  # the files stay open, their decoders with them
    assert _decoder_threads() == threads


def test_video_reader_in_workers(datasets):
    """The parent decodes first (its containers open when the workers start), several times. On a
    GPU host a worker *forked* then hung in its first decode (a child's own, fresh container), so a
    video reader's workers start from the fork server (``data.worker_start=auto``), which inherits
    nothing of this process; the loader's timeout turns a stalled worker into an error."""
    from vla_ft.data import worker_start

    reader, _ = _reader(datasets, "v3_av1")
    assert reader.decodes_video and worker_start("auto", reader) == "forkserver"
    stats = compute_stats(reader, range(N_EPISODES))
    ds = RobotDataset(
        reader, [0, 3], chunk=2, history=1, normalizer=Normalizer(stats), image_size=16, prompt_tokenizer=None
    )
    from robot_data import collate

    want = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate))
    assert reader._decoder._open  # the parent holds open decoders when the workers start
    for _ in range(2):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, collate_fn=collate, num_workers=2, timeout=30, multiprocessing_context="forkserver"
        )
        for a, b in zip(want, loader, strict=True):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["actions"], b["actions"])


def test_video_decoder_returns_the_nearest_frame_within_the_tolerance(tmp_path):
    """A tolerance wider than a frame holds several candidates: the nearest wins, not the first."""
    from robot_data.video import VideoDecoder, encode_video

    frames = [np.full((16, 16, 3), 20 * k, np.uint8) for k in range(10)]
    encode_video(frames, tmp_path / "v.mp4", fps=10)
    decoded = VideoDecoder(tolerance_s=0.15).decode(tmp_path / "v.mp4", [0.5, 0.44, 0.0, 0.86])
    assert [int(round(f.mean() / 20)) for f in decoded] == [5, 4, 0, 9]


def test_a_video_tolerance_of_half_a_frame_is_refused(datasets):
    path = datasets["v3_h264"][1]["path"]
    with pytest.raises(ValueError, match=r"video_tolerance_s 0.05 must be under half a frame \(0.5 / fps 10"):
        build_reader("lerobot", path=path, video_tolerance_s=0.05)


def test_reader_errors(datasets, tmp_path):
    path = datasets["v3_image"][1]["path"]
    with pytest.raises(ValueError, match="state_key: 'obs.joints' is not a feature"):
        build_reader("lerobot", path=path, state_key="obs.joints")
    with pytest.raises(FileNotFoundError):
        build_reader("lerobot", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="valid: robomimic, aloha"):
        build_reader("hdf5", path=datasets["aloha"][1]["path"], layout="rlds")
    with pytest.raises(UnknownFeatureError, match="data.state_key: 'joints' is not a key of .*; keys: obs/state"):
        build_reader("hdf5", path=datasets["robomimic"][1]["path"], state_key="joints")


def test_hdf5_path_of_another_layout_is_a_format_error(datasets, tmp_path):
    """A path that is no dataset of the layout: DatasetFormatError naming it and what the layout
    expects (the trainer's one line), an 'unreadable' problem for the checks, except a file that is
    no HDF5 file at all, which the checks raise too."""
    with h5py.File(tmp_path / "no_data.hdf5", "w") as f:
        f["actions"] = np.zeros((4, 7), np.float32)
    with h5py.File(tmp_path / "no_demos.hdf5", "w") as f:
        f.create_group("data")
    (tmp_path / "junk.hdf5").write_bytes(b"not an HDF5 file")
    (tmp_path / "empty").mkdir()
    aloha = datasets["aloha"][1]["path"]
    for layout, path, why in (
        ("robomimic", tmp_path / "no_data.hdf5", "no 'data' group, so not a robomimic file"),
        ("robomimic", tmp_path / "no_demos.hdf5", "no episodes found (no data/demo_<i> groups)"),
        ("robomimic", tmp_path / "junk.hdf5", "unreadable HDF5 file (Unable to"),
        ("aloha", tmp_path / "empty", "no episodes found (no episode_<i>.hdf5 files)"),
        ("aloha", tmp_path / "junk.hdf5", "no episode file can be opened (junk.hdf5: unreadable HDF5 file"),
    ):
        with pytest.raises(DatasetFormatError) as caught:
            build_reader("hdf5", path=str(path), layout=layout)
        message = str(caught.value)
        assert message.startswith(f"{path}: {why}") and f"; the {layout} layout expects " in message, message
        assert "\n" not in message and not isinstance(caught.value, UnknownFeatureError)
        if path.name == "junk.hdf5":  # no HDF5 file at all: raised by the check too (as a LeRobot path without meta/)
            with pytest.raises(DatasetFormatError, match=re.escape(message)):
                check_dataset(path, "hdf5", layout=layout)
            continue
        assert [(p.kind, p.file, p.message) for p in check_dataset(path, "hdf5", layout=layout)] == [
            ("unreadable", str(path), message)
        ]
    # a directory in the robomimic layout is a LIBERO suite, one file per task: each file is named
    first = Path(aloha) / "episode_0.hdf5"
    with pytest.raises(DatasetFormatError, match=f"^{first}: no 'data' group, so not a robomimic file"):
        build_reader("hdf5", path=aloha, layout="robomimic")
    problems = check_dataset(aloha, "hdf5", layout="robomimic")
    assert [(p.kind, p.file, p.episode) for p in problems] == [
        ("unreadable", str(f), None) for f in sorted(Path(aloha).glob("*.hdf5"))
    ]


def test_robomimic_hand_written(tmp_path):
    """A file written with plain h5py, robomimic's default keys, no fps/task attributes."""
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "demo.hdf5", "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift"})
        for i, n in ((2, 6), (0, 4)):
            demo = data.create_group(f"demo_{i}")
            demo["actions"] = rng.normal(size=(n, 7)).astype(np.float32)
            demo["obs/robot0_eef_pos"] = rng.normal(size=(n, 3))
            demo["obs/robot0_eef_quat"] = rng.normal(size=(n, 4))
            demo["obs/robot0_gripper_qpos"] = rng.normal(size=(n, 2))
            demo["obs/agentview_image"] = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    reader = build_reader("hdf5", path=str(tmp_path / "demo.hdf5"))
    assert [(e.index, e.length, e.task) for e in reader.episodes()] == [(0, 4, "Lift"), (2, 6, "Lift")]
    assert reader.cameras == ["agentview_image"] and reader.fps == 20.0 and reader.gripper_dims == [6]
    with h5py.File(tmp_path / "demo.hdf5") as f:
        demo = f["data/demo_2"]
        want = np.concatenate(
            [demo["obs/robot0_eef_pos"], demo["obs/robot0_eef_quat"], demo["obs/robot0_gripper_qpos"]], 1
        ).astype(np.float32)
        np.testing.assert_array_equal(reader.numeric(2).state, want)
        images = demo["obs/agentview_image"][[1, 5]]
        np.testing.assert_array_equal(reader.frames(2, "agentview_image", [5, 1]), images[::-1])


def test_an_empty_robomimic_demo_reads_as_no_frames(tmp_path):
    """A demo with no steps (a recording stopped at once) reads as (0, D) arrays of the dims its
    datasets declare: it adds nothing to the statistics, and the check passes (both ended in numpy's
    'cannot reshape array of size 0' before)."""
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "demo.hdf5", "w") as f:
        for i, n in ((0, 5), (1, 0)):
            demo = f.create_group(f"data/demo_{i}")
            demo["actions"] = rng.normal(size=(n, 7)).astype(np.float32)
            demo["obs/state"] = rng.normal(size=(n, 2, 3))
            demo["obs/agentview_image"] = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    reader = build_reader("hdf5", path=str(tmp_path / "demo.hdf5"), state_key="state")
    empty = reader.numeric(1)
    assert empty.state.shape == (0, 6) and empty.action.shape == (0, 7) and empty.timestamp.shape == (0,)
    both, first = compute_stats(reader, [0, 1]), compute_stats(reader, [0])
    for key in both:
        for stat in both[key]:
            np.testing.assert_array_equal(both[key][stat], first[key][stat], err_msg=f"{key}.{stat}")
    assert check_dataset(tmp_path / "demo.hdf5", "hdf5", state_key="state") == []


def _png(image: np.ndarray) -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_an_aloha_depth_map_is_not_a_camera(tmp_path):
    """ALOHA files with a depth map beside the RGB camera (observations/images/<cam>_depth, (T, H, W)
    uint16): the cameras are those of the same files without it (as robomimic's and RLDS's readers
    leave 1-channel images out), and the check passes (it refused every episode: 'bad_feature')."""
    plain = write_aloha(SyntheticReader(episodes=2, episode_length=4, image_size=16), tmp_path / "plain")
    shutil.copytree(plain, tmp_path / "depth")
    for file in (tmp_path / "depth").glob("*.hdf5"):
        with h5py.File(file, "r+") as f:
            f["observations/images/top_depth"] = np.ones((4, 16, 16), np.uint16)
    reader = build_reader("hdf5", path=str(tmp_path / "depth"), layout="aloha")
    assert reader.cameras == build_reader("hdf5", path=str(plain), layout="aloha").cameras
    assert check_dataset(tmp_path / "depth", "hdf5", layout="aloha") == []


def test_aloha_compressed_frames_read_as_the_array_recorded(tmp_path):
    """ALOHA compresses with cv2.imencode, which reads the array as BGR: the stored image holds the
    recorded array's channels reversed, and cv2.imdecode (ALOHA's and LeRobot's loaders) gives the
    array back. A compressed episode must read as the same array as an uncompressed one."""
    recorded = np.random.default_rng(0).integers(0, 255, (3, 6, 8, 3), dtype=np.uint8)
    recorded[..., 0] = 220  # strongly red in the recorded array's channel order
    blobs = [_png(image[..., ::-1]) for image in recorded]  # what cv2.imencode(".png", image) writes
    rows = np.zeros((3, max(map(len, blobs)) + 7), np.uint8)  # zero-padded, as ALOHA stores them
    for row, blob in zip(rows, blobs, strict=True):
        row[: len(blob)] = blob
    for name, images, compress in (("raw", recorded, False), ("jpg", rows, True)):
        (tmp_path / name).mkdir()
        with h5py.File(tmp_path / name / "episode_0.hdf5", "w") as f:
            f.attrs["compress"] = compress
            f["action"], f["observations/qpos"] = np.zeros((3, 14)), np.zeros((3, 14))
            f["observations/images/cam_high"] = images
        reader = build_reader("hdf5", path=str(tmp_path / name), layout="aloha")
        np.testing.assert_array_equal(reader.frames(0, "cam_high", [2, 0, 1]), recorded[[2, 0, 1]], err_msg=name)


def test_v21_ignores_a_stats_json_left_from_v20(datasets, tmp_path):
    """LeRobot reads meta/stats.json only below v2.1; from v2.1 on it pools episodes_stats.jsonl."""
    import shutil

    copy = tmp_path / "v21"
    shutil.copytree(datasets["v21_image"][1]["path"], copy)
    (copy / "meta/stats.json").write_text(json.dumps({"action": {"mean": [9.0] * 3, "std": [1.0] * 3}}))
    pooled = _reader(datasets, "v21_image")[0].stats()
    stale = build_reader("lerobot", path=str(copy)).stats()
    np.testing.assert_array_equal(stale["action"]["mean"], pooled["action"]["mean"])
    assert not np.allclose(stale["action"]["mean"], 9.0)


def test_v3_tasks_cell_written_as_one_string(datasets, tmp_path):
    """LeRobot writes an episode's ``tasks`` as a list; a third-party writer's plain string is one task."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = tmp_path / "v3"
    shutil.copytree(datasets["v3_image"][1]["path"], copy)
    for path in (copy / "meta/episodes").rglob("*.parquet"):
        table = pq.read_table(path)
        strings = pa.array([tasks[0] for tasks in table.column("tasks").to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("tasks"), "tasks", strings), path)
    want = [e.task for e in _reader(datasets, "v3_image")[0].episodes()]
    assert [e.task for e in build_reader("lerobot", path=str(copy)).episodes()] == want
    assert all(len(task) > 1 for task in want)


PICK, PLACE = "pick up the cube", "place it in the bin"


class _TwoTasks(Reader):
    """Two synthetic episodes: 0 picks then places (its instruction changes at frame 3), 1 places."""

    def __init__(self):
        self.inner = SyntheticReader(episodes=2, episode_length=6, image_size=16, seed=0)
        self.fps, self.cameras, self.gripper_dims = self.inner.fps, self.inner.cameras, self.inner.gripper_dims

    def episodes(self) -> list[Episode]:
        return [Episode(0, 6, PICK), Episode(1, 6, PLACE)]

    def numeric(self, episode_index: int) -> EpisodeArrays:
        arrays = self.inner.numeric(episode_index)
        arrays.tasks = [PICK] * 3 + [PLACE] * 3 if episode_index == 0 else None
        return arrays

    def frames(self, episode_index: int, camera: str, frame_indices) -> np.ndarray:
        return self.inner.frames(episode_index, camera, frame_indices)


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_an_episode_listing_several_tasks_is_its_first_frames(tmp_path, version):
    """LeRobot lists an episode's tasks from a set (any order): the episode's task is its first
    frame's (task_index), whatever the order listed, also when the listing names a task no frame
    has (then every frame's prompt is the episode's task)."""
    source = _TwoTasks()
    path = write_lerobot(source, tmp_path / "ds", video=False, version=version)
    listed = {0: [PLACE, PICK], 1: [PICK, PLACE]}  # as a set may order them; episode 1 lists a stale one
    if version == "v3.0":
        for meta in (path / "meta/episodes").rglob("*.parquet"):
            table = pq.read_table(meta)
            cells = pa.array([listed[e] for e in table["episode_index"].to_pylist()], pa.list_(pa.string()))
            pq.write_table(table.set_column(table.schema.get_field_index("tasks"), "tasks", cells), meta)
    else:
        rows = [json.loads(line) for line in (path / "meta/episodes.jsonl").read_text().splitlines()]
        lines = [json.dumps({**row, "tasks": listed[row["episode_index"]]}) for row in rows]
        (path / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    reader = build_reader("lerobot", path=str(path))
    assert [m.tasks for m in reader.meta.episodes] == [listed[0], listed[1]]  # the premise: the edit read back
    first = [(source.numeric(e.index).tasks or [e.task])[0] for e in source.episodes()]
    assert [e.task for e in reader.episodes()] == first == [PICK, PLACE]
    assert reader.numeric(0).tasks == source.numeric(0).tasks and reader.numeric(1).tasks is None


def test_data_rows_out_of_frame_order_read_in_frame_order(datasets, tmp_path):
    """A data parquet whose rows are not sorted (a third-party writer, a concatenation): each
    episode still reads frame 0, 1, ... by frame_index, numbers and images alike."""
    copy = tmp_path / "v3"
    shutil.copytree(datasets["v3_image"][1]["path"], copy)
    for path in (copy / "data").rglob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.take(np.random.default_rng(0).permutation(len(table))), path, row_group_size=7)
    reader, source = build_reader("lerobot", path=str(copy)), _source()
    for ep in (0, 3):
        np.testing.assert_array_equal(reader.numeric(ep).action, source.numeric(ep).action)
        np.testing.assert_array_equal(reader.frames(ep, CAMERA, [7, 0, 2]), source.frames(ep, CAMERA, [7, 0, 2]))


def _robomimic_file(path: Path, demos: list[int], **data_attrs: str) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for key, value in data_attrs.items():
            data.attrs[key] = value
        for i in demos:
            data[f"demo_{i}/actions"] = rng.normal(size=(4, 7)).astype(np.float32)
            data[f"demo_{i}/obs/state"] = rng.normal(size=(4, 3)).astype(np.float32)
    return path


def test_robomimic_attributes_that_are_not_json_are_named(tmp_path):
    path = _robomimic_file(tmp_path / "r.hdf5", [0], env_args="{'env_name': 'Lift'}")  # a Python repr
    with pytest.raises(DatasetFormatError, match=r"r.hdf5: data.attrs\['env_args'\] is not JSON"):
        build_reader("hdf5", path=str(path), layout="robomimic", state_key="state")


def test_robomimic_libero_instruction_from_problem_info(tmp_path):
    """LIBERO's robomimic-layout files keep the instruction in data.attrs['problem_info'] (JSON)."""
    problem = json.dumps({"problem_name": "libero_tabletop", "language_instruction": "put the bowl on the plate"})
    env = json.dumps({"env_name": "Libero_Tabletop_Manipulation"})
    path = _robomimic_file(tmp_path / "libero.hdf5", [0, 1], env_args=env, problem_info=problem)
    reader = build_reader("hdf5", path=str(path), state_key="state")
    assert [e.task for e in reader.episodes()] == ["put the bowl on the plate"] * 2
    plain = _robomimic_file(tmp_path / "lift.hdf5", [0], env_args=json.dumps({"env_name": "Lift"}))
    assert build_reader("hdf5", path=str(plain), state_key="state").episodes()[0].task == "Lift"


def test_robomimic_filter_keys(tmp_path):
    """robomimic ships its splits as mask/<key>: lists of demo names (bytes), in any order."""
    shipped = {"train": [b"demo_10", b"demo_2", b"demo_0", b"demo_2"], "valid": [b"demo_1"]}  # demo_2 twice: once
    for name, masks in (("rm", shipped), ("bad", {"broken": [b"demo_7"]})):
        path = _robomimic_file(tmp_path / f"{name}.hdf5", [10, 2, 0, 1])
        with h5py.File(path, "a") as f:
            for key, demos in masks.items():
                f[f"mask/{key}"] = np.array(demos)
    reader = build_reader("hdf5", path=str(tmp_path / "rm.hdf5"), state_key="state")
    assert reader.episode_filters() == {"train": [0, 2, 10], "valid": [1]}
    broken = build_reader("hdf5", path=str(tmp_path / "bad.hdf5"), state_key="state")
    with pytest.raises(DatasetFormatError, match="mask/broken names demos the file lacks: \\['demo_7'\\]"):
        broken.episode_filters()
    assert build_reader("hdf5", path=str(_source_aloha(tmp_path)), layout="aloha").episode_filters() == {}


def test_aloha_episodes_keep_the_numbers_in_their_file_names(tmp_path):
    """ACT's recorder names files episode_<i>.hdf5. A stray file, or two files of one number,
    used to renumber every episode by name order (episode_10 before episode_2), silently moving
    the episodes that data.val_episodes and the splits name; now it is refused, naming the files."""
    source = write_aloha(SyntheticReader(episodes=1, episode_length=4, image_size=8), tmp_path / "src")
    aloha = tmp_path / "aloha"
    aloha.mkdir()
    for name in ("episode_2.hdf5", "episode_10.hdf5"):
        shutil.copy(source / "episode_0.hdf5", aloha / name)
    assert [e.index for e in build_reader("hdf5", path=str(aloha), layout="aloha").episodes()] == [2, 10]

    shutil.copy(source / "episode_0.hdf5", aloha / "calibration.hdf5")
    with pytest.raises(DatasetFormatError, match="calibration.hdf5: no episode number in the name, unlike episode_"):
        build_reader("hdf5", path=str(aloha), layout="aloha")
    (aloha / "calibration.hdf5").rename(aloha / "retake_episode_2.hdf5")
    with pytest.raises(DatasetFormatError, match="episode_2.hdf5, retake_episode_2.hdf5 share episode number 2"):
        build_reader("hdf5", path=str(aloha), layout="aloha")

    for old, new in {"episode_2": "b", "episode_10": "a", "retake_episode_2": "c"}.items():  # no numbers at all
        (aloha / f"{old}.hdf5").rename(aloha / f"{new}.hdf5")
    assert [e.index for e in build_reader("hdf5", path=str(aloha), layout="aloha").episodes()] == [0, 1, 2]


def test_a_dataset_without_cameras_is_refused_naming_the_file(tmp_path):
    """A robomimic low-dim file (no image observations) used to pass setup and fail in the first
    batch with numpy's 'need at least one array to stack'."""
    path = tmp_path / "low_dim.hdf5"
    with h5py.File(path, "w") as f:  # robomimic's layout: data/demo_<i>/{actions, obs/<key>}
        demo = f.create_group("data/demo_0")
        demo.attrs["num_samples"] = 4
        demo.create_dataset("actions", data=np.zeros((4, 7), np.float32))
        demo.create_dataset("obs/robot0_eef_pos", data=np.zeros((4, 3), np.float32))
    reader = build_reader("hdf5", path=str(path), state_key="robot0_eef_pos")
    normalizer = Normalizer(compute_stats(reader, [0]), "mean_std")
    for cameras in (None, ["agentview_image"]):
        with pytest.raises(ValueError, match=f"cameras: {path} has no camera \\(no image or video feature\\)"):
            RobotDataset(reader, [0], 2, 1, normalizer, 16, None, cameras=cameras)


def _source_aloha(tmp_path: Path) -> Path:
    return write_aloha(SyntheticReader(episodes=2, episode_length=4, image_size=8), tmp_path / "aloha")


def _lerobot_stats_shapes(stats: dict, where: str) -> None:
    """LeRobot's ``aggregate_stats`` runs ``_assert_type_and_shape`` on every stats dict it pools
    (huggingface/lerobot src/lerobot/datasets/compute_stats.py): ``count`` must have shape (1,),
    the frame count ``np.array([len(array)])`` of ``get_feature_stats``; every stat at least 1-D."""
    for feature, values in stats.items():
        for stat, value in values.items():
            assert np.asarray(value).ndim >= 1, f"{where}: {feature}/{stat} is a scalar"
        assert np.asarray(values["count"]).shape == (1,), f"{where}: {feature}/count is {values['count']}"


def test_writer_stats_and_info_load_in_lerobot(datasets):
    """What our writer ships must load in LeRobot itself.

    v2.1: ``LeRobotDatasetMetadata.load_metadata`` pools ``meta/episodes_stats.jsonl`` with
    ``aggregate_stats`` (huggingface/lerobot src/lerobot/datasets/lerobot_dataset.py, v2.1), which
    refuses a ``count`` of any shape but (1,). v3.0: ``save_episode`` pools ``meta/stats.json`` with
    each new episode's stats the same way, and appending reads ``info["data_files_size_in_mb"]`` /
    ``info["video_files_size_in_mb"]``, which ``create_empty_dataset_info`` always writes
    (huggingface/lerobot src/lerobot/datasets/utils.py)."""
    v21 = Path(datasets["v21_image"][1]["path"])
    for row in (json.loads(line) for line in (v21 / "meta/episodes_stats.jsonl").read_text().splitlines()):
        _lerobot_stats_shapes(row["stats"], f"episodes_stats.jsonl episode {row['episode_index']}")
    v3 = Path(datasets["v3_h264"][1]["path"])
    _lerobot_stats_shapes(json.loads((v3 / "meta/stats.json").read_text()), "stats.json")
    episodes = pq.read_table(v3 / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    for row in episodes:
        flat = {k.split("/")[1]: {} for k in row if k.startswith("stats/")}
        for key, value in row.items():
            if key.startswith("stats/"):
                flat[key.split("/")[1]][key.split("/")[2]] = value
        _lerobot_stats_shapes(flat, f"meta/episodes episode {row['episode_index']}")
        assert flat["action"]["count"] == [row["length"]]
    info = json.loads((v3 / "meta/info.json").read_text())
    assert info["data_files_size_in_mb"] == 100 and info["video_files_size_in_mb"] == 500


def test_hdf5_writer_has_the_keys_the_real_loaders_read(tmp_path):
    """Files from our HDF5 writer must load in the tools of their layout, not only in our reader.

    ALOHA: ACT's ``EpisodicDataset.__getitem__`` and ``get_norm_stats`` read ``root.attrs['sim']``,
    ``/observations/qpos``, ``/observations/qvel`` and ``/action`` of every episode_<i>.hdf5
    (tonyzhaozh/act utils.py). robomimic: ``SequenceDataset`` reads ``config.train.dataset_keys``,
    by default ("actions", "rewards", "dones"), from each data/demo_<i> of ``attrs['num_samples']``
    rows (ARISE-Initiative/robomimic robomimic/config/base_config.py, robomimic/utils/dataset.py)."""
    source = SyntheticReader(episodes=2, episode_length=5, image_size=8)
    aloha = write_aloha(source, tmp_path / "aloha")
    for ep in source.episodes():
        with h5py.File(aloha / f"episode_{ep.index}.hdf5") as f:
            assert "sim" in f.attrs
            for key in ("/observations/qpos", "/observations/qvel", "/action"):
                assert key in f and len(f[key]) == ep.length, key
    with h5py.File(write_robomimic(source, tmp_path / "rm.hdf5")) as f:
        for ep in source.episodes():
            demo = f[f"data/demo_{ep.index}"]
            for key in ("actions", "rewards", "dones"):
                assert key in demo and len(demo[key]) == demo.attrs["num_samples"] == ep.length, key
            assert demo["dones"][-1] == 1 and not demo["dones"][:-1].any()


def test_a_converted_dataset_numbers_its_episodes_from_0_on_a_clock_from_0(tmp_path):
    """ALOHA episodes 2 and 10, with a recorder's clock (seconds since boot): LeRobot finds an
    episode's metadata and video segment by position and time from the episode start, so the
    written episodes are 0 and 1 at frame_index / fps; their frames and numbers are the source's."""
    from robot_data.lerobot_writer import LeRobotCameraNames, renumbering

    source = write_aloha(SyntheticReader(episodes=2, episode_length=5, image_size=16), tmp_path / "src")
    aloha = tmp_path / "aloha"
    aloha.mkdir()
    for old, new in ((0, 2), (1, 10)):
        shutil.copy(source / f"episode_{old}.hdf5", aloha / f"episode_{new}.hdf5")
        with h5py.File(aloha / f"episode_{new}.hdf5", "a") as f:
            f.create_dataset("timestamp", data=1000.0 * new + np.arange(5) / 50)
    reader = LeRobotCameraNames(build_reader("hdf5", path=str(aloha), layout="aloha"))
    np.testing.assert_allclose(reader.numeric(10).timestamp, np.arange(5) / 50)  # from the episode start
    assert renumbering(reader) == {2: 0, 10: 1}
    out = write_lerobot(reader, tmp_path / "lerobot", video=True, text_name=None)
    assert check_dataset(str(out), "lerobot") == []
    written = build_reader("lerobot", path=str(out))
    assert [e.index for e in written.episodes()] == [0, 1]
    for new, old in ((0, 2), (1, 10)):
        np.testing.assert_array_equal(written.numeric(new).action, reader.numeric(old).action)
        np.testing.assert_allclose(written.numeric(new).timestamp, np.arange(5) / reader.fps, atol=1e-6)
        camera = written.cameras[0]
        got, want = written.frames(new, camera, [4]), reader.frames(old, camera, [4])
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 8  # the same frame, through h264


def test_hdf5_timestamps_of_another_length_and_1d_actions(tmp_path):
    """A timestamp dataset one row short is an error naming the file; a (T,) action dataset is one
    action dim (it crashed at open with an IndexError naming nothing)."""
    short, flat = (write_aloha(SyntheticReader(episodes=1, episode_length=4, image_size=8), tmp_path / n) for n in "ab")
    with h5py.File(short / "episode_0.hdf5", "a") as f:
        f.create_dataset("timestamp", data=np.arange(3) / 50)
    with pytest.raises(DatasetFormatError, match=r"episode_0.hdf5:/: timestamp has 3 rows, action 4"):
        build_reader("hdf5", path=str(short), layout="aloha").numeric(0)
    with h5py.File(flat / "episode_0.hdf5", "a") as f:
        action = f["action"][:, 0]
        del f["action"]
        f.create_dataset("action", data=action)
    reader = build_reader("hdf5", path=str(flat), layout="aloha")
    assert reader.gripper_dims == []
    np.testing.assert_array_equal(reader.numeric(0).action, action[:, None])


def test_a_2d_lerobot_feature_reads_row_major(tmp_path):
    """LeRobot stores a feature of shape [2, 2] as datasets.Array2D, a list of lists per row; it
    read as NaN rows, and the check blamed the column type."""
    import pyarrow as pa

    out = write_lerobot(SyntheticReader(episodes=2, episode_length=3, image_size=8), tmp_path / "ds", video=False)
    path = out / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    state = np.arange(table.num_rows * 4, dtype=np.float32).reshape(-1, 2, 2)
    column = pa.array(state.tolist(), pa.list_(pa.list_(pa.float32())))
    pq.write_table(
        table.set_column(table.schema.get_field_index("observation.state"), "observation.state", column), path
    )
    info = json.loads((out / "meta/info.json").read_text())
    info["features"]["observation.state"]["shape"] = [2, 2]
    (out / "meta/info.json").write_text(json.dumps(info))
    reader = build_reader("lerobot", path=str(out))
    np.testing.assert_array_equal(reader.numeric(1).state, state[3:].reshape(3, 4))
    assert check_dataset(str(out), "lerobot") == []


def test_lerobot_meta_that_cannot_be_read_names_the_file_or_key(tmp_path):
    """fps 0 divided by zero; a state key naming a camera failed in float() with a TypeError."""
    out = write_lerobot(SyntheticReader(episodes=1, episode_length=3, image_size=8), tmp_path / "ds", video=False)
    with pytest.raises(DatasetFormatError, match=r"data.state_key: 'observation.images.top' of .* has dtype image"):
        build_reader("lerobot", path=str(out), state_key="observation.images.top")
    info = json.loads((out / "meta/info.json").read_text())
    for fps in (0, "30", None):
        (out / "meta/info.json").write_text(json.dumps({**info, "fps": fps}))
        with pytest.raises(DatasetFormatError, match=r"meta/info.json: (fps is .*, not a positive number|missing)"):
            build_reader("lerobot", path=str(out))


def test_a_frame_without_text_round_trips_through_hdf5(tmp_path):
    """A LeRobot frame whose narration cell is null, converted to robomimic and ALOHA HDF5 (the writers
    raised TypeError on it) and read back: still None (no language target), not "" (a target of
    end-of-text); the other frames keep their text."""
    from conftest import lerobot_with_a_null_narration

    from robot_data.hdf5 import HDF5Reader

    source = lerobot_with_a_null_narration(tmp_path / "lr")
    robomimic = HDF5Reader(
        write_robomimic(source, tmp_path / "r.hdf5"), layout="robomimic", state_key="state", text_key="narration"
    )
    aloha = HDF5Reader(write_aloha(source, tmp_path / "aloha"), layout="aloha", text_key="narration")
    for reader in (robomimic, aloha):
        assert reader.numeric(0).text == source.numeric(0).text and reader.numeric(0).text[1] is None
        assert all(isinstance(t, str) and t for t in reader.numeric(1).text)
