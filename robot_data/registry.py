"""Dataset readers by name: ``data.format`` in a recipe picks one of ``READERS``."""

from __future__ import annotations

from typing import Any

from robot_data.hdf5 import HDF5Reader
from robot_data.lerobot import LeRobotReader
from robot_data.reader import Reader
from robot_data.synthetic import SyntheticReader

READERS: dict[str, type[Reader]] = {
    "synthetic": SyntheticReader,
    "lerobot": LeRobotReader,
    "hdf5": HDF5Reader,
}


def build_reader(format: str, **kwargs: Any) -> Reader:
    """Instantiate the reader named ``format`` with its keyword arguments."""
    if format not in READERS:
        raise ValueError(f"data.format: unknown reader '{format}'; valid: {', '.join(READERS)}")
    return READERS[format](**kwargs)
