"""RLDS datasets (TFDS tfrecord layout) read without TensorFlow: TFRecord framing, tf.train.Example,
a dataset written by hand as TFDS documents it, the synthetic task round-tripped, checks and training."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICKSTART, TINY, lerobot_with_a_null_narration
from PIL import Image

from robot_data import SyntheticReader
from robot_data.check import check_dataset
from robot_data.checksum import crc32c, masked_crc
from robot_data.reader import DatasetFormatError, UnknownFeatureError
from robot_data.rlds import RLDSReader
from robot_data.rlds_writer import _png, frame_record, write_rlds
from robot_data.tfrecord import Example, parse_example, record_spans
from vla_ft.config import RecipeError, load_recipe

SYNTH = SyntheticReader(episodes=6, episode_length=8, image_size=32, seed=3)


def test_tfrecord_framing_and_checksums(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, appendix B.4)
    assert masked_crc(b"") == ((0 >> 15 | 0 << 17) + 0xA282EAD8) & 0xFFFFFFFF
    path = tmp_path / "x.tfrecord"
    path.write_bytes(frame_record(b"abc") + frame_record(b"") + frame_record(b"hello"))
    assert record_spans(path) == [(12, 3), (12 + 3 + 4 + 12, 0), (2 * 16 + 3 + 12, 5)]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{path}: record at byte 35 claims 5 bytes"):
        record_spans(path)


def _bitwise_crc32c(data: bytes) -> int:
    """CRC-32C one bit at a time, as the polynomial division reads: the reference for the fast one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_published_vectors_and_the_bitwise_definition():
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 appendix B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    data = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    for n in (63, 64, 128, 129, 1000, 4096 + 7, 20000):  # one lane, a few, and a tail after the lanes
        assert crc32c(data[:n]) == _bitwise_crc32c(data[:n]), n


def test_a_damaged_length_is_an_error_naming_the_shard_record_and_byte(synthetic_rlds, tmp_path):
    import shutil

    broken = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, broken)
    shard = broken / "vla_ft_synthetic-train.tfrecord-00001-of-00002"
    raw = bytearray(shard.read_bytes())
    second = record_spans(shard)[1][0] - 12  # where record 1's header starts
    raw[second + 9] ^= 0x01  # a bit of its length's checksum
    shard.write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match=f"{shard}: record 1 at byte {second}: its length fails its checksum"):
        RLDSReader(broken, fps=10)


def test_a_damaged_record_that_still_parses_is_found_by_the_check(synthetic_rlds, tmp_path):
    """Bit rot in episode 2's first action: the Example parses and every size is right, so only the
    data checksum tells; the check names the shard, the record and its byte."""
    import shutil

    broken = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, broken)
    shard = broken / "vla_ft_synthetic-train.tfrecord-00001-of-00002"
    raw = bytearray(shard.read_bytes())
    first_action = struct.pack("<3f", *SYNTH.numeric(2).action[0])
    at = raw.find(first_action)
    assert at > 0
    raw[at + 1] ^= 0x40
    shard.write_bytes(bytes(raw))
    reader = RLDSReader(broken, fps=10)
    assert not np.array_equal(reader.numeric(2).action, SYNTH.numeric(2).action)  # read without complaint
    problems = check_dataset(broken, "rlds", fps=10)
    assert [(p.kind, p.episode, p.file) for p in problems] == [
        ("unreadable", 2, "vla_ft_synthetic-train.tfrecord-00001-of-00002, record 0")
    ]
    assert problems[0].message.startswith("data at byte 12 fails its checksum (stored 0x")


@pytest.mark.parametrize("decode", ["all", "none"])
def test_the_check_reads_each_record_once(synthetic_rlds, monkeypatch, decode):
    """The check computes a record's checksum and decodes its frames from one read of it (it read
    twice: once for the checksum, again for the frames), so with the reader training opened each
    record is read once, and a check opening its own reader reads it once more than the open."""
    import builtins
    from collections import Counter

    import robot_data.tfrecord as tfrecord

    reads: Counter[tuple[str, int]] = Counter()

    class Seeks:
        """A file of tfrecord's that counts where it seeks: each record's read starts at its data
        (``with open(...)``: the only way tfrecord opens a file)."""

        def __init__(self, path, mode):
            self.path, self.mode = str(path), mode

        def __enter__(self):
            self.file = builtins.open(self.path, self.mode)
            return self

        def __exit__(self, *exc):
            self.file.close()

        def seek(self, offset):
            reads[self.path, offset] += 1
            return self.file.seek(offset)

        def read(self, n):
            return self.file.read(n)

    shards = sorted(synthetic_rlds.glob("*.tfrecord-*"))
    records = [(str(shard), offset) for shard in shards for offset, _ in record_spans(shard)]
    reader = RLDSReader(synthetic_rlds, fps=10)
    monkeypatch.setattr(tfrecord, "open", Seeks, raising=False)
    assert check_dataset(synthetic_rlds, "rlds", decode=decode, opened=reader, fps=10) == []
    assert len(records) == len(SYNTH.episodes()) > 2 and reads == Counter(records)  # more than the reader keeps
    reads.clear()
    assert check_dataset(synthetic_rlds, "rlds", decode=decode, fps=10) == []
    assert {r: reads[r] for r in records} == {r: 2 for r in records}  # (the open also seeks to each header)


def test_an_example_written_byte_by_byte_parses():
    """features { feature { key: "a" value { float_list { value: [1.5, -2] } } } } on the wire."""
    floats = b"\x0a\x08" + struct.pack("<2f", 1.5, -2.0)
    feature = b"\x12" + bytes([len(floats)]) + floats
    entry = b"\x0a\x01a\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    parsed = parse_example(b"\x0a" + bytes([len(features)]) + features)
    assert list(parsed) == ["a"] and parsed["a"].tolist() == [1.5, -2.0]


def _jpeg(rgb: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), rgb, np.uint8)).save(out, format="JPEG", quality=100)
    return out.getvalue()


def _hand_written(root: Path, instruction: str = "language_instruction") -> Path:
    """One episode of 3 steps, laid out as TFDS documents it (features.json as the DROID/LIBERO ones):
    a nested observation with a float64 joint vector, a JPEG camera, a raw uint8 camera, a 1-channel
    depth image and mask (not cameras), bool and Text scalars. ``instruction``: the Text feature's
    path under ``steps`` (RT-1's datasets keep it at ``observation/natural_language_instruction``)."""
    leaf = "tensorflow_datasets.core.features."
    scalar = lambda dtype: {"pythonClassName": leaf + "scalar.Scalar", "tensor": {"shape": {}, "dtype": dtype}}  # noqa: E731
    text = {"pythonClassName": leaf + "text_feature.Text", "text": {}}
    in_observation = instruction.startswith("observation/")
    features = {
        "pythonClassName": leaf + "features_dict.FeaturesDict",
        "featuresDict": {
            "features": {
                "steps": {
                    "pythonClassName": leaf + "dataset_feature.Dataset",
                    "sequence": {
                        "feature": {
                            "pythonClassName": leaf + "features_dict.FeaturesDict",
                            "featuresDict": {
                                "features": {
                                    "observation": {
                                        "pythonClassName": leaf + "features_dict.FeaturesDict",
                                        "featuresDict": {
                                            "features": {
                                                "joint_position": {
                                                    "pythonClassName": leaf + "tensor_feature.Tensor",
                                                    "tensor": {"shape": {"dimensions": ["2"]}, "dtype": "float64"},
                                                },
                                                "raw": {
                                                    "pythonClassName": leaf + "tensor_feature.Tensor",
                                                    "tensor": {
                                                        "shape": {"dimensions": ["2", "2", "3"]},
                                                        "dtype": "uint8",
                                                    },
                                                },
                                                "wrist": {
                                                    "pythonClassName": leaf + "image_feature.Image",
                                                    "image": {
                                                        "shape": {"dimensions": ["4", "6", "3"]},
                                                        "dtype": "uint8",
                                                        "encodingFormat": "jpeg",
                                                    },
                                                },
                                                "depth": {
                                                    "pythonClassName": leaf + "image_feature.Image",
                                                    "image": {
                                                        "shape": {"dimensions": ["4", "6", "1"]},
                                                        "dtype": "uint8",
                                                        "encodingFormat": "png",
                                                    },
                                                },
                                                "mask": {
                                                    "pythonClassName": leaf + "tensor_feature.Tensor",
                                                    "tensor": {
                                                        "shape": {"dimensions": ["2", "2", "1"]},
                                                        "dtype": "uint8",
                                                    },
                                                },
                                                **({instruction.split("/")[1]: text} if in_observation else {}),
                                            }
                                        },
                                    },
                                    "action": {
                                        "pythonClassName": leaf + "tensor_feature.Tensor",
                                        "tensor": {"shape": {"dimensions": ["3"]}, "dtype": "float32"},
                                    },
                                    "is_first": scalar("bool"),
                                    **({} if in_observation else {instruction: text}),
                                }
                            },
                        },
                        "length": "-1",
                    },
                }
            }
        },
    }
    version = root / "hand" / "0.1.0"
    version.mkdir(parents=True)
    (version / "features.json").write_text(json.dumps(features))
    info = {"name": "hand", "splits": [{"name": "train", "numBytes": "1", "shardLengths": ["1"]}]}
    (version / "dataset_info.json").write_text(json.dumps(info))  # no template, no fileFormat: TFDS defaults
    ex = Example()
    f = ex.features.feature
    f["steps/observation/joint_position"].float_list.value.extend([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    f["steps/observation/wrist"].bytes_list.value.extend([_jpeg((250, 0, 0)), _jpeg((0, 250, 0)), _jpeg((0, 0, 250))])
    f["steps/action"].float_list.value.extend(range(9))
    f["steps/observation/raw"].int64_list.value.extend(range(36))  # uint8 pixels as TFDS stores integers
    f["steps/is_first"].int64_list.value.extend([1, 0, 0])
    f["steps/observation/depth"].bytes_list.value.extend([_png(np.full((4, 6), 9 * k, np.uint8)) for k in range(3)])
    f["steps/observation/mask"].int64_list.value.extend([1] * 12)
    f[f"steps/{instruction}"].bytes_list.value.extend([b"open the drawer", b"open the drawer", b"close it"])
    (version / "hand-train.tfrecord-00000-of-00001").write_bytes(frame_record(ex.SerializeToString()))
    return version.parent


def test_a_dataset_laid_out_as_tfds_documents_it(tmp_path):
    reader = RLDSReader(_hand_written(tmp_path), state_key="observation.joint_position", fps=15)
    assert reader.path.name == "0.1.0"  # the only version directory
    assert [(e.index, e.length, e.task) for e in reader.episodes()] == [(0, 3, "open the drawer")]
    arrays = reader.numeric(0)
    np.testing.assert_array_equal(arrays.state, [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]])
    np.testing.assert_array_equal(arrays.action, np.arange(9, dtype=np.float32).reshape(3, 3))
    np.testing.assert_allclose(arrays.timestamp, [0, 1 / 15, 2 / 15])
    assert arrays.tasks == ["open the drawer", "open the drawer", "close it"]  # per frame: it changes
    assert reader.cameras == ["observation/raw", "observation/wrist"] and reader.episode_filters() == {"train": [0]}
    raw = reader.frames(0, "observation/raw", [1])
    assert raw.dtype == np.uint8 and raw.tolist() == [np.arange(12, 24).reshape(2, 2, 3).tolist()]
    frames = reader.frames(0, "observation/wrist", [2, 0])
    assert frames.shape == (2, 4, 6, 3) and frames.dtype == np.uint8
    assert (
        np.abs(frames[0].astype(int) - (0, 0, 250)).max() < 8 and np.abs(frames[1].astype(int) - (250, 0, 0)).max() < 8
    )
    assert check_dataset(tmp_path / "hand", "rlds", decode="all", state_key="observation/joint_position", fps=15) == []


def test_rt1s_instruction_under_observation_is_read(tmp_path):
    """RT-1 (fractal) and several other Open X datasets keep the instruction at
    ``observation/natural_language_instruction``: it is the episode's task, not an empty prompt."""
    path = _hand_written(tmp_path, "observation/natural_language_instruction")
    reader = RLDSReader(path, state_key="observation.joint_position", fps=15)
    assert [e.task for e in reader.episodes()] == ["open the drawer"]
    assert reader.numeric(0).tasks == ["open the drawer", "open the drawer", "close it"]
    assert "observation/natural_language_instruction" not in reader.cameras


@pytest.fixture(scope="module")
def synthetic_rlds(tmp_path_factory) -> Path:
    """The synthetic task as RLDS: episodes 0-3 in train (2 shards), 4-5 in val."""
    return write_rlds(SYNTH, tmp_path_factory.mktemp("rlds") / "1.0.0", splits={"train": [0, 1, 2, 3], "val": [4, 5]})


def test_the_synthetic_task_round_trips(synthetic_rlds):
    reader = RLDSReader(synthetic_rlds.parent, text_key="narration", fps=SYNTH.fps)
    assert reader.episode_filters() == {"train": [0, 1, 2, 3], "val": [4, 5]}
    assert sorted(p.name for p in synthetic_rlds.glob("*.tfrecord-*")) == [
        "vla_ft_synthetic-train.tfrecord-00000-of-00002",
        "vla_ft_synthetic-train.tfrecord-00001-of-00002",
        "vla_ft_synthetic-val.tfrecord-00000-of-00002",
        "vla_ft_synthetic-val.tfrecord-00001-of-00002",
    ]
    assert [(e.length, e.task) for e in reader.episodes()] == [(e.length, e.task) for e in SYNTH.episodes()]
    for e in SYNTH.episodes():
        want, got = SYNTH.numeric(e.index), reader.numeric(e.index)
        np.testing.assert_array_equal(got.state, want.state)
        np.testing.assert_array_equal(got.action, want.action)
        assert got.text == want.text
        frames = reader.frames(e.index, "observation/top", [5, 0, 5])
        np.testing.assert_array_equal(frames, SYNTH.frames(e.index, "observation.images.top", [5, 0, 5]))
    assert reader.location(5) == "vla_ft_synthetic-val.tfrecord-00001-of-00002, record 0"


def test_each_camera_is_declared_with_its_own_shape(tmp_path):
    """ALOHA files with a wide top camera and a smaller wrist camera, written as RLDS: features.json
    declares each camera's (H, W, 3), so the check's shape comparison passes and frames round-trip."""
    import h5py

    from robot_data.hdf5 import HDF5Reader
    from robot_data.hdf5_writer import write_aloha

    aloha = write_aloha(SyntheticReader(episodes=2, episode_length=3, image_size=32, seed=1), tmp_path / "aloha")
    for file in aloha.glob("*.hdf5"):
        with h5py.File(file, "r+") as f:
            top = f["observations/images/top"][:]
            del f["observations/images/top"]
            f["observations/images/top"] = top[:, :, :24]
            f["observations/images/wrist"] = top[:, :16, :20]
    source = HDF5Reader(aloha, layout="aloha")
    rlds = write_rlds(source, tmp_path / "rlds" / "1.0.0")
    reader = RLDSReader(rlds, fps=10)
    assert reader.camera_shapes == {"observation/top": (32, 24, 3), "observation/wrist": (16, 20, 3)}
    assert check_dataset(rlds, "rlds", fps=10) == []
    for camera in source.cameras:
        got = reader.frames(1, f"observation/{camera.rsplit('.', 1)[-1]}", [2])
        np.testing.assert_array_equal(got, source.frames(1, camera, [2]))


def test_a_frame_without_text_stays_without_text(tmp_path):
    """A LeRobot frame whose narration cell is null, written as RLDS and read back: still None (no
    language target), not "" (a target of end-of-text), and the other frames keep their text."""
    source = lerobot_with_a_null_narration(tmp_path / "lr")
    rlds = RLDSReader(write_rlds(source, tmp_path / "rlds" / "1.0.0"), text_key="narration", fps=10)
    assert rlds.numeric(0).text == source.numeric(0).text and rlds.numeric(0).text[1] is None
    assert all(isinstance(t, str) and t for t in rlds.numeric(1).text)


def test_a_dimension_declared_unknown_fits_any_size(synthetic_rlds, tmp_path):
    """TFDS declares an Image of varying size as (-1, -1, 3): the check takes -1 as any size, and
    still refuses a known dimension that differs."""
    import shutil

    broken = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, broken)
    features = broken / "features.json"
    tree = json.loads(features.read_text())
    steps = tree["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]
    top = steps["observation"]["featuresDict"]["features"]["top"]["image"]["shape"]
    top["dimensions"] = ["-1", "-1", "3"]
    features.write_text(json.dumps(tree))
    assert check_dataset(broken, "rlds", fps=10) == []
    top["dimensions"] = ["-1", "31", "3"]
    features.write_text(json.dumps(tree))
    problems = check_dataset(broken, "rlds", fps=10)
    assert {(p.kind, p.episode) for p in problems} == {("bad_feature", e) for e in range(6)}
    assert "frames are (32, 32, 3), the features say (-1, 31, 3)" in problems[0].message


def _steps(tree):
    """The per-step FeaturesDict's own features (observation, action, ...) in a features.json tree."""
    return tree["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"]


@pytest.mark.parametrize("open_dims", [["action"], ["action", "state"], ["state"]])
def test_a_numeric_feature_declared_with_an_open_dim_is_read(synthetic_rlds, tmp_path, open_dims):
    """TFDS writes a Tensor of varying size as shape (-1,): the rows are read from the data (the step
    count from another feature when the action itself is open), the same numbers as with the size
    declared, and the check passes."""
    import shutil

    opened = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, opened)
    features = opened / "features.json"
    tree = json.loads(features.read_text())
    leaves = {"action": _steps(tree)["action"], "state": _observation(tree)["state"]}
    for name in open_dims:
        leaves[name]["tensor"]["shape"]["dimensions"] = ["-1"]
    features.write_text(json.dumps(tree))
    declared, reader = RLDSReader(synthetic_rlds, fps=10), RLDSReader(opened, fps=10)
    assert reader.unreadable == {} and reader.episodes() == declared.episodes()
    for e in declared.episodes():
        np.testing.assert_array_equal(reader.numeric(e.index).state, declared.numeric(e.index).state)
        np.testing.assert_array_equal(reader.numeric(e.index).action, declared.numeric(e.index).action)
    assert check_dataset(opened, "rlds", fps=10) == []


def test_an_open_dim_of_another_width_in_one_episode_is_kept_and_named(tmp_path):
    """State declared (-1,), episode 1 one dim wider: read from the records, and from the numbers a
    frame cache keeps (the second open), every episode has the source's numbers (saving them was
    numpy's concatenate error), and the check names episode 1 as the one of another width."""

    class Wider(SyntheticReader):
        def numeric(self, episode_index):
            arrays = super().numeric(episode_index)
            if episode_index == 1:
                arrays.state = np.concatenate([arrays.state, arrays.state[:, :1] + 1], axis=1)
            return arrays

    source = Wider(episodes=3, episode_length=5, image_size=16)
    path = write_rlds(source, tmp_path / "rlds" / "1.0.0")
    tree = json.loads((path / "features.json").read_text())
    _observation(tree)["state"]["tensor"]["shape"]["dimensions"] = ["-1"]
    (path / "features.json").write_text(json.dumps(tree))
    for _ in range(2):  # the first open saves the numbers, the second reads them back
        reader = RLDSReader(path, fps=10, frame_cache=tmp_path / "cache")
        for e in source.episodes():
            np.testing.assert_array_equal(reader.numeric(e.index).state, source.numeric(e.index).state)
            np.testing.assert_array_equal(reader.numeric(e.index).action, source.numeric(e.index).action)
    problems = check_dataset(path, "rlds", fps=10)
    assert [(p.kind, p.episode) for p in problems] == [("bad_feature", 1)]
    assert "state has 4 dims, the first sound episode 3" in problems[0].message


def test_a_raw_camera_declared_with_an_open_dim(tmp_path):
    """A raw uint8 camera tensor declared (-1, 2, 3) reads as declared (2, 2, 3); declared (-1, -1, 3)
    its frames cannot be shaped: an error naming the record and the feature, not a numpy error."""
    path = _hand_written(tmp_path)
    features = next(path.glob("*/features.json"))
    tree = json.loads(features.read_text())
    raw = _observation(tree)["raw"]["tensor"]["shape"]
    reference = RLDSReader(path, state_key="observation.joint_position", fps=15).frames(0, "observation/raw", [2, 0])
    raw["dimensions"] = ["-1", "2", "3"]
    features.write_text(json.dumps(tree))
    reader = RLDSReader(path, state_key="observation.joint_position", fps=15)
    np.testing.assert_array_equal(reader.frames(0, "observation/raw", [2, 0]), reference)
    raw["dimensions"] = ["-1", "-1", "3"]
    features.write_text(json.dumps(tree))
    reader = RLDSReader(path, state_key="observation.joint_position", fps=15)
    with pytest.raises(
        DatasetFormatError, match=r"hand-train.tfrecord-00000-of-00001, record 0: steps/observation/raw"
    ):
        reader.frames(0, "observation/raw", [0])


def test_frames_through_the_decoded_frame_cache(synthetic_rlds, tmp_path):
    cached = RLDSReader(synthetic_rlds, fps=10, frame_cache=tmp_path / "cache")
    direct = RLDSReader(synthetic_rlds, fps=10)
    for _ in range(2):  # a miss that decodes the episode, then a hit
        np.testing.assert_array_equal(
            cached.frames(3, "observation/top", [7, 1]), direct.frames(3, "observation/top", [7, 1])
        )
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1


def test_what_a_user_gets_wrong_is_named(synthetic_rlds, tmp_path):
    with pytest.raises(
        UnknownFeatureError, match=r"data.state_key: 'observation.stat' .* \(did you mean 'observation/state'\?\)"
    ):
        RLDSReader(synthetic_rlds, state_key="observation.stat", fps=10)
    with pytest.raises(DatasetFormatError, match="RLDS records no control rate; set data.fps"):
        RLDSReader(synthetic_rlds)
    with pytest.raises(RecipeError, match="data.fps: required for data.format=rlds"):
        load_recipe(QUICKSTART, [*TINY, "data.format=rlds", f"data.path={synthetic_rlds}"])
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(synthetic_rlds, broken)
    (broken / "vla_ft_synthetic-val.tfrecord-00001-of-00002").unlink()
    with pytest.raises(DatasetFormatError, match="shard vla_ft_synthetic-val.tfrecord-00001-of-00002 listed in"):
        RLDSReader(broken, fps=10)


def _without_name(info):
    del info["name"]
    return info


def _without_split_name(info):
    del info["splits"][0]["name"]
    return info


def _shard_length_in_words(info):
    info["splits"][1]["shardLengths"] = ["two"]
    return info


@pytest.mark.parametrize(
    "edit, message",
    [
        (_without_name, "dataset_info.json: missing key 'name'"),
        (lambda info: {**info, "splits": "train"}, "dataset_info.json: 'splits' is \"train\", not a list"),
        (_without_split_name, r"dataset_info.json: splits\[0\]: missing key 'name'"),
        (_shard_length_in_words, r"dataset_info.json: splits\[1\]: 'shardLengths' holds \"two\", not an episode count"),
        (lambda info: [info], "dataset_info.json: list, not a JSON object"),
    ],
)
def test_a_malformed_dataset_info_names_the_file_and_key(synthetic_rlds, tmp_path, edit, message):
    import shutil

    broken = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, broken)
    info = broken / "dataset_info.json"
    info.write_text(json.dumps(edit(json.loads(info.read_text()))))
    with pytest.raises(DatasetFormatError, match=message):
        RLDSReader(broken, fps=10)
    problems = check_dataset(broken, "rlds", fps=10)
    assert [(p.kind, p.episode) for p in problems] == [("unreadable", None)]
    assert str(info) in problems[0].message


def _observation(tree):
    """The observation FeaturesDict's own features (state, top) in a features.json tree."""
    return _steps(tree)["observation"]["featuresDict"]["features"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda tree: tree.update(featuresDict=[]), "no 'steps' Dataset feature"),
        (lambda tree: _observation(tree).update(top=[]), "feature steps/observation/top is [], not a JSON object"),
        (
            lambda tree: _observation(tree).update(x={"featuresDict": {}}),
            "steps/observation/x featuresDict: missing key 'features'",
        ),
        (
            lambda tree: _observation(tree)["state"]["tensor"].update(shape=[7]),
            "steps/observation/state: its shape is not a list of integers",
        ),
    ],
)
def test_a_malformed_features_json_names_the_file_and_feature(synthetic_rlds, tmp_path, edit, message):
    import shutil

    broken = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, broken)
    features = broken / "features.json"
    tree = json.loads(features.read_text())
    edit(tree)
    features.write_text(json.dumps(tree))
    with pytest.raises(DatasetFormatError, match=f"{features}: .*{re.escape(message)}"):
        RLDSReader(broken, fps=10)


def test_a_broken_episode_is_reported_by_the_check_and_skipped_on_request(synthetic_rlds, tmp_path, monkeypatch):
    """Episode 2's action list loses a value: the check names its shard and record, training refuses the
    dataset, and with data.skip_bad_episodes trains on the others."""
    import shutil

    from vla_ft.data import build_reader, checked_skip_list

    broken = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, broken)
    shard = broken / "vla_ft_synthetic-train.tfrecord-00001-of-00002"
    spans = record_spans(shard)
    records = [shard.read_bytes()[o : o + n] for o, n in spans]
    example = Example.FromString(records[0])
    del example.features.feature["steps/action"].float_list.value[-1]
    shard.write_bytes(frame_record(example.SerializeToString()) + frame_record(records[1]))
    problems = check_dataset(broken, "rlds", fps=10)
    assert [(p.kind, p.episode) for p in problems] == [("unreadable", 2)]
    assert problems[0].file == "vla_ft_synthetic-train.tfrecord-00001-of-00002, record 0"
    assert "steps/action holds 23 values, not a multiple of 3" in problems[0].message
    overrides = [*TINY, "data.format=rlds", f"data.path={broken}", "data.fps=10", "data.text_key=narration"]
    with pytest.raises(RecipeError, match="episode 2"):
        checked_skip_list(load_recipe(QUICKSTART, overrides))
    recipe = load_recipe(QUICKSTART, [*overrides, "data.skip_bad_episodes=true"])
    reader, opened = build_reader(recipe), []
    real_init = RLDSReader.__init__
    monkeypatch.setattr(RLDSReader, "__init__", lambda self, *a, **k: (opened.append(1), real_init(self, *a, **k))[1])
    assert checked_skip_list(recipe, reader) == {2}
    assert opened == []  # the check reads the reader training opened: one pass over the records, not two


def test_training_on_rlds_validates_on_its_val_split(synthetic_rlds, tmp_path):
    from vla_ft.train import main

    overrides = [
        *TINY,
        "data.format=rlds",
        f"data.path={synthetic_rlds.parent}",
        "data.fps=10",
        "data.text_key=narration",
        "data.val_filter=val",
        "data.cameras=[observation/top]",
        "train.steps=2",
        "logging.tensorboard=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    from vla_ft.data import build_reader, split_train_val

    recipe = load_recipe(QUICKSTART, overrides)
    reader = build_reader(recipe)
    assert split_train_val(recipe, reader, list(range(6))) == ([0, 1, 2, 3], [4, 5])
    result = main(recipe)
    assert np.isfinite(result["val/action_l1"])


def test_data_fps_overrides_an_hdf5_files_rate(tmp_path):
    from robot_data.hdf5_writer import write_robomimic
    from vla_ft.data import build_reader

    write_robomimic(SYNTH, tmp_path / "rm.hdf5")  # the file records the synthetic task's 10 Hz
    base = [*TINY, "data.format=hdf5", f"data.path={tmp_path / 'rm.hdf5'}", "data.state_key=state"]
    base += ["data.action_key=actions", "data.language_target=none", "data.cameras=[top_image]"]
    assert build_reader(load_recipe(QUICKSTART, base)).fps == 10
    assert build_reader(load_recipe(QUICKSTART, [*base, "data.fps=30"])).fps == 30


def test_two_rlds_datasets_train_as_one_mixture(synthetic_rlds, tmp_path):
    """data.mix over RLDS sources: episodes numbered source after source, each source checked."""
    from vla_ft.data import build_reader

    other = write_rlds(SyntheticReader(episodes=3, episode_length=8, image_size=32, seed=9), tmp_path / "b" / "1.0.0")
    overrides = [*TINY, "data.format=rlds", "data.fps=10", "data.text_key=narration", "data.cameras=[observation/top]"]
    overrides += [f"data.mix.a.path={synthetic_rlds}", f"data.mix.b.path={other}"]
    recipe = load_recipe(QUICKSTART, [*overrides, "train.steps=1", f"output_dir={tmp_path / 'run'}"])
    reader = build_reader(recipe)
    assert [reader.source_name(e.index) for e in reader.episodes()] == ["a"] * 6 + ["b"] * 3
    assert reader.episode_filters() == {"train": [0, 1, 2, 3, 6, 7, 8], "val": [4, 5]}
    from vla_ft.data import checked_skip_list
    from vla_ft.train import main

    opened, real_init = [], RLDSReader.__init__
    with pytest.MonkeyPatch.context() as m:
        m.setattr(RLDSReader, "__init__", lambda self, *a, **k: (opened.append(1), real_init(self, *a, **k))[1])
        assert checked_skip_list(recipe, reader) == set() and opened == []  # each source's open reader is checked

    assert np.isfinite(main(recipe)["val/action_l1"])


def test_vla_ft_data_check_reads_rlds(synthetic_rlds, capsys):
    from vla_ft.cli import main as cli

    assert cli(["data", "check", str(synthetic_rlds), "--format", "rlds", "--fps", "10", "--decode", "all"]) == 0
    assert "passed every check" in capsys.readouterr().out
    assert cli(["data", "check", str(synthetic_rlds), "--format", "rlds"]) == 2
    assert "--fps: required with --format rlds" in capsys.readouterr().err


def test_vla_ft_data_convert_writes_rlds_as_lerobot(synthetic_rlds, tmp_path, capsys):
    """Every episode's numbers, text and frames (PNG: lossless) read back from the LeRobot copy; the
    camera becomes observation.images.<name>; a changing instruction stays per frame."""
    from robot_data.lerobot import LeRobotReader
    from vla_ft.cli import main as cli

    out = tmp_path / "lerobot"
    args = ["data", "convert", str(synthetic_rlds), str(out), "--format", "rlds", "--fps", "10"]
    assert cli([*args, "--text-key", "narration"]) == 0
    src, copy = RLDSReader(synthetic_rlds, text_key="narration", fps=10), LeRobotReader(out, text_key="narration")
    assert copy.cameras == ["observation.images.top"] and copy.fps == 10
    assert [(e.index, e.length, e.task) for e in copy.episodes()] == [
        (e.index, e.length, e.task) for e in src.episodes()
    ]
    for e in src.episodes():
        a, b = src.numeric(e.index), copy.numeric(e.index)
        np.testing.assert_array_equal(b.state, a.state)
        np.testing.assert_array_equal(b.action, a.action)
        assert b.text == a.text
        np.testing.assert_array_equal(
            copy.frames(e.index, "observation.images.top", [0, 7]), src.frames(e.index, "observation/top", [0, 7])
        )
    hand = _hand_written(tmp_path / "h")
    args = ["data", "convert", str(hand), str(tmp_path / "hand_lerobot"), "--format", "rlds", "--fps", "15"]
    assert cli([*args, "--state-key", "observation/joint_position"]) == 0
    converted = LeRobotReader(tmp_path / "hand_lerobot")
    assert converted.numeric(0).tasks == ["open the drawer", "open the drawer", "close it"]
    assert sorted(converted.cameras) == ["observation.images.raw", "observation.images.wrist"]


def test_vla_ft_data_convert_writes_robomimic_as_lerobot(tmp_path):
    from robot_data.hdf5 import HDF5Reader
    from robot_data.hdf5_writer import write_robomimic
    from robot_data.lerobot import LeRobotReader
    from vla_ft.cli import main as cli

    write_robomimic(SYNTH, tmp_path / "rm.hdf5")
    args = ["data", "convert", str(tmp_path / "rm.hdf5"), str(tmp_path / "out"), "--format", "hdf5"]
    assert cli([*args, "--state-key", "state", "--action-key", "actions"]) == 0
    src, copy = (
        HDF5Reader(tmp_path / "rm.hdf5", state_key="state", action_key="actions"),
        LeRobotReader(tmp_path / "out"),
    )
    assert copy.cameras == ["observation.images.top_image"]
    for e in src.episodes():
        np.testing.assert_array_equal(copy.numeric(e.index).action, src.numeric(e.index).action)
        np.testing.assert_array_equal(
            copy.frames(e.index, "observation.images.top_image", [3]), src.frames(e.index, "top_image", [3])
        )


def test_the_numbers_read_at_open_are_kept_in_the_frame_cache(synthetic_rlds, tmp_path, monkeypatch):
    """A second open of an unchanged dataset parses no record (broken episodes stay broken); a shard
    that changed is read again."""
    import os
    import shutil

    import robot_data.rlds as rlds

    data = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, data)
    shard = data / "vla_ft_synthetic-val.tfrecord-00000-of-00002"
    example = Example.FromString(shard.read_bytes()[12 : 12 + record_spans(shard)[0][1]])
    del example.features.feature["steps/action"].float_list.value[-1]
    shard.write_bytes(frame_record(example.SerializeToString()))  # episode 4 broken
    open_ = lambda: RLDSReader(data, text_key="narration", fps=10, frame_cache=tmp_path / "cache")  # noqa: E731
    first = open_()
    parsed, real = [], rlds.parse_example
    monkeypatch.setattr(rlds, "parse_example", lambda b: (parsed.append(1), real(b))[1])
    again = open_()
    assert parsed == [] and list((tmp_path / "cache" / "rlds_index").glob("*.json"))
    assert (
        again.episodes() == first.episodes() and again.unreadable == first.unreadable and list(first.unreadable) == [4]
    )
    for e in first.episodes():
        if e.index in first.unreadable:
            continue
        a, b = first.numeric(e.index), again.numeric(e.index)
        for field in ("state", "action", "timestamp"):
            np.testing.assert_array_equal(getattr(b, field), getattr(a, field))
        assert (b.text, b.tasks) == (a.text, a.tasks)
    np.testing.assert_array_equal(again.frames(1, "observation/top", [2]), first.frames(1, "observation/top", [2]))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    parsed.clear()
    open_()
    assert len(parsed) == len(first.episodes())  # read again: its numbers may have changed


def test_no_frames_are_shaped_as_the_episodes_frames(synthetic_rlds, tmp_path):
    """An image declared (-1, -1, 3) (TFDS: any size): asking for no frames gives (0, H, W, 3) with the
    H, W of a decoded frame, as the LeRobot and HDF5 readers answer, not a width of 0."""
    import shutil

    open_dims = tmp_path / "1.0.0"
    shutil.copytree(synthetic_rlds, open_dims)
    features = open_dims / "features.json"
    tree = json.loads(features.read_text())
    top = _observation(tree)["top"]["image"]["shape"]
    top["dimensions"] = ["-1", "-1", "3"]
    features.write_text(json.dumps(tree))
    for path in (synthetic_rlds, open_dims):
        reader = RLDSReader(path, fps=10)
        decoded = reader.frames(2, "observation/top", [3])
        assert reader.frames(2, "observation/top", []).shape == (0, *decoded.shape[1:])
