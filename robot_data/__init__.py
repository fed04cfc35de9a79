"""robot_data: robot datasets (synthetic, LeRobot, HDF5) as one documented sample format.

Never imports ``vla_ft``: the trainer depends on this package, not the other way round.
"""

from robot_data.dataset import RobotDataset
from robot_data.language import PromptTokenizer
from robot_data.normalize import Normalizer, compute_stats
from robot_data.reader import Episode, EpisodeArrays, Reader
from robot_data.registry import READERS, build_reader
from robot_data.sample import SAMPLE_KEYS, collate
from robot_data.splits import split_episodes
from robot_data.synthetic import SYNTHETIC_VOCAB, SyntheticReader

__all__ = [
    "READERS",
    "SAMPLE_KEYS",
    "SYNTHETIC_VOCAB",
    "Episode",
    "EpisodeArrays",
    "Normalizer",
    "PromptTokenizer",
    "Reader",
    "RobotDataset",
    "SyntheticReader",
    "build_reader",
    "collate",
    "compute_stats",
    "split_episodes",
]
