"""Dataset readers by name: ``data.format`` in a recipe picks one of ``READERS``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robot_data.hdf5 import HDF5Reader
from robot_data.lerobot import LeRobotReader
from robot_data.mixture import MixtureReader, robomimic_files
from robot_data.reader import Reader
from robot_data.rlds import RLDSReader
from robot_data.synthetic import SyntheticReader

READERS: dict[str, type[Reader]] = {
    "synthetic": SyntheticReader,
    "lerobot": LeRobotReader,
    "hdf5": HDF5Reader,
    "rlds": RLDSReader,
}


def build_reader(format: str, **kwargs: Any) -> Reader:
    """Instantiate the reader named ``format`` with its keyword arguments. A directory in the
    robomimic layout (a LIBERO suite: one file per task) reads as the mixture of its files."""
    if format not in READERS:
        raise ValueError(f"data.format: unknown reader '{format}'; valid: {', '.join(READERS)}")
    if is_robomimic_dir(format, kwargs):
        return MixtureReader({f.stem: HDF5Reader(**{**kwargs, "path": f}) for f in robomimic_files(kwargs["path"])})
    return READERS[format](**kwargs)


def is_robomimic_dir(format: str, kwargs: dict[str, Any]) -> bool:
    """Whether reader arguments name a directory of robomimic files."""
    layout, path = kwargs.get("layout", "robomimic"), kwargs.get("path")
    return format == "hdf5" and layout == "robomimic" and path is not None and Path(path).is_dir()
