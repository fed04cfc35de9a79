"""robot_data: robot datasets (synthetic, LeRobot, HDF5) as one documented sample format.

Never imports ``vla_ft``: the trainer depends on this package, not the other way round.
"""

from robot_data.check import DatasetCheckError, Problem, bad_episodes, check_dataset, episodes_to_skip
from robot_data.dataset import RobotDataset
from robot_data.hdf5 import HDF5Reader
from robot_data.language import PromptTokenizer
from robot_data.lerobot import LeRobotReader
from robot_data.lerobot_writer import write_lerobot
from robot_data.mixture import MixtureReader
from robot_data.normalize import (
    Normalizer,
    PerSourceNormalizer,
    compare_stats,
    compute_stats,
    load_normalizer,
    resolve_stats,
)
from robot_data.reader import Episode, EpisodeArrays, Reader
from robot_data.registry import READERS, build_reader
from robot_data.sample import SAMPLE_KEYS, collate
from robot_data.splits import split_episodes
from robot_data.synthetic import SYNTHETIC_VOCAB, SyntheticReader
from robot_data.synthetic_env import SyntheticPickEnv

__all__ = [
    "READERS",
    "SAMPLE_KEYS",
    "SYNTHETIC_VOCAB",
    "DatasetCheckError",
    "Episode",
    "EpisodeArrays",
    "HDF5Reader",
    "LeRobotReader",
    "MixtureReader",
    "Normalizer",
    "PerSourceNormalizer",
    "Problem",
    "PromptTokenizer",
    "Reader",
    "RobotDataset",
    "SyntheticPickEnv",
    "SyntheticReader",
    "bad_episodes",
    "build_reader",
    "check_dataset",
    "collate",
    "compare_stats",
    "compute_stats",
    "episodes_to_skip",
    "load_normalizer",
    "resolve_stats",
    "split_episodes",
    "write_lerobot",
]
