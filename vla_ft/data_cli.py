"""``vla-ft data synth OUT`` and ``vla-ft data check PATH``: dataset tools on the command line.

``synth`` writes the embedded synthetic task as a LeRobot dataset (v3.0 by default), so the
quickstart can run from disk and every reader has a file fixture. ``check`` reports every
problem of a dataset at once, each naming the file and the episode; a key naming nothing in the
dataset is the user's typo, not a problem of the data: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> int:
    from robot_data import SyntheticReader
    from robot_data.lerobot_writer import write_lerobot

    reader = SyntheticReader(
        episodes=args.episodes, episode_length=args.length, image_size=args.image_size, seed=args.seed
    )
    if args.format == "rlds":
        from robot_data.rlds_writer import write_rlds

        out = write_rlds(reader, Path(args.out) / "1.0.0")
        print(
            f"wrote {args.episodes} synthetic episodes (RLDS, PNG frames; read with data.fps={reader.fps:g}) to {out}"
        )
        return 0
    out = write_lerobot(reader, args.out, video=args.video, codec=args.codec, version=args.version)
    kind = f"{args.codec} video" if args.video else "images in parquet"
    print(f"wrote {args.episodes} synthetic episodes ({kind}, LeRobot {args.version}) to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Any dataset the readers take, written as a LeRobot dataset (cameras as observation.images.<name>)."""
    from robot_data import build_reader
    from robot_data.lerobot_writer import LeRobotCameraNames, renumbering, write_lerobot

    kwargs: dict = {"path": args.src, "state_key": args.state_key, "action_key": args.action_key}
    kwargs |= {"text_key": args.text_key} if args.text_key else {}
    kwargs |= {"layout": args.layout} if args.format == "hdf5" else {}
    kwargs |= _fps(args)
    with _named_errors(args, args.src, kwargs):
        source = LeRobotCameraNames(build_reader(args.format, **kwargs))
    for index in sorted(source.skipped):
        print(f"skipped episode {index}: {source.reader.unreadable[index]}", file=sys.stderr)
    out = write_lerobot(source, args.out, video=args.video, codec=args.codec, version=args.version)
    moved = renumbering(source)
    if moved:
        pairs = ", ".join(f"{old} -> {new}" for old, new in moved.items())
        print(f"episode ids renumbered 0..N-1, as LeRobot needs them (source -> written): {pairs}")
    kind = f"{args.codec} video" if args.video else "images in parquet"
    print(f"wrote {len(source.episodes())} episodes of {args.src} ({kind}, LeRobot {args.version}) to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from robot_data.check import check_dataset

    kwargs: dict = {"layout": args.layout} if args.format == "hdf5" else {}
    kwargs |= _fps(args)
    if args.state_key:
        kwargs["state_key"] = args.state_key
    if args.action_key:
        kwargs["action_key"] = args.action_key
    if args.text_key:  # frames without text are then reported (missing_text), as training's check does
        kwargs["text_key"] = args.text_key
    if not Path(args.path).exists():  # one line, exit 2: nothing to check (was "1 problem(s)", exit 1)
        raise FileNotFoundError(f"dataset not found: {args.path}")
    with _named_errors(args, args.path, kwargs):
        problems = check_dataset(args.path, args.format, decode=args.decode, **kwargs)
    if not problems:
        print(f"ok: {args.path} passed every check")
        return 0
    for p in problems:
        print(p, file=sys.stderr)
    episodes = sorted({p.episode for p in problems if p.episode is not None})
    where = f" in {len(episodes)} episode(s) {episodes[:20]}" if episodes else ""
    print(f"{len(problems)} problem(s){where}", file=sys.stderr)
    return 1


def _fps(args: argparse.Namespace) -> dict[str, float]:
    """``--fps`` as the reader's keyword: required for RLDS, refused for LeRobot (it records its own)."""
    from vla_ft.config import RecipeError

    if args.format == "rlds" and args.fps is None:
        raise RecipeError("--fps: required with --format rlds (RLDS records no control rate)", "command line")
    if args.format == "lerobot" and args.fps is not None:
        raise RecipeError("--fps: a LeRobot dataset records its own (meta/info.json); drop --fps", "command line")
    return {"fps": args.fps} if args.fps is not None else {}


@contextlib.contextmanager
def _named_errors(args: argparse.Namespace, path: str, kwargs: dict) -> Iterator[None]:
    """A mistyped key or a path that is no dataset of ``--format``: one line naming the option or
    the file, exit status 2, instead of a traceback."""
    from robot_data.reader import DatasetFormatError, UnknownFeatureError
    from vla_ft.config import RecipeError

    try:
        yield
    except UnknownFeatureError as err:
        option = f"--{err.role.replace('_', '-')}"
        if err.role in kwargs:
            raise RecipeError(f"{option}: {err.detail}", "command line") from None
        where = f"the {args.layout} layout's" if args.format == "hdf5" else "the"
        raise RecipeError(f"{where} default {err.role}: {err.detail}; name yours with {option}", path) from None
    except DatasetFormatError as err:
        hdf5 = args.format != "hdf5" and _looks_like_hdf5(Path(path))
        hint = "; it holds HDF5 data: use --format hdf5 (--layout aloha for episode files)" if hdf5 else ""
        raise RecipeError(f"not a {args.format} dataset ({str(err).removeprefix(f'{path}: ')}){hint}", path) from None


def positive(text: str) -> float:
    """An argparse type for a rate: finite and > 0."""
    value = _float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """An argparse type for a decay or a weight: finite and >= 0 (nan and inf are refused too)."""
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _float(text: str) -> float:
    """``text`` as a float; nan where it is none, which every range check then refuses."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _looks_like_hdf5(path: Path) -> bool:
    """An .hdf5/.h5 file, or a directory of them (ALOHA): what --format lerobot cannot read."""
    suffixes = (".hdf5", ".h5")
    return path.suffix in suffixes if path.is_file() else path.is_dir() and any(path.glob("*.hdf5"))


def at_least(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type for a size option: a value below ``least`` (or above ``most``) is refused
    naming the option, before anything is written, instead of failing later with a traceback."""
    wanted = f">= {least}" if most is None else f"in {least}..{most}"

    def parse(text: str) -> int:
        value = _integer(text)
        if value is None or value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be an integer {wanted}, got {text!r}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type for a seed: in [0, 2**32), as the recipe's seeds (numpy refuses a negative one,
    which ended ``data synth --seed -1`` in a traceback after the output directory was made)."""
    value = _integer(text)
    if value is None or not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
    return value


def _integer(text: str) -> int | None:
    """``text`` as an integer, or None when it is not one."""
    return int(text) if text.strip().lstrip("+-").isdigit() else None


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools: write the synthetic task, check a dataset")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="write the synthetic task as a LeRobot dataset")
    synth.add_argument("out", help="output directory (must not exist or be empty)")
    synth.add_argument("--episodes", type=at_least(1), default=64)
    synth.add_argument("--length", type=at_least(1), default=32, help="frames per episode")
    synth.add_argument("--image-size", type=at_least(8), default=64)
    synth.add_argument("--seed", type=seed, default=0)
    synth.add_argument("--video", action="store_true", help="MP4 videos instead of PNG bytes in parquet")
    synth.add_argument("--codec", choices=["h264", "av1"], default="h264")
    synth.add_argument("--version", choices=["v3.0", "v2.1"], default="v3.0")
    synth.add_argument("--format", choices=["lerobot", "rlds"], default="lerobot", help="rlds: TFDS tfrecord layout")
    synth.set_defaults(func=cmd_synth)
    convert = dsub.add_parser("convert", help="write an HDF5 or RLDS dataset as a LeRobot dataset")
    convert.add_argument("src", help="the dataset to read")
    convert.add_argument("out", help="output directory (must not exist or be empty)")
    convert.add_argument("--format", choices=["hdf5", "rlds", "lerobot"], required=True)
    convert.add_argument("--layout", choices=["robomimic", "aloha"], default="robomimic")
    convert.add_argument("--fps", type=positive, default=None, help="control rate (rlds records none)")
    convert.add_argument("--state-key", default="observation.state")
    convert.add_argument("--action-key", default="action")
    convert.add_argument("--text-key", default=None, help="per-frame text to keep (written as 'narration')")
    convert.add_argument("--video", action="store_true", help="MP4 videos instead of PNG bytes in parquet")
    convert.add_argument("--codec", choices=["h264", "av1"], default="h264")
    convert.add_argument("--version", choices=["v3.0", "v2.1"], default="v3.0")
    convert.set_defaults(func=cmd_convert)
    check = dsub.add_parser("check", help="report every problem of a dataset at once")
    check.add_argument("path")
    check.add_argument("--format", choices=["lerobot", "hdf5", "rlds"], default="lerobot")
    check.add_argument("--fps", type=positive, default=None, help="control rate (rlds records none)")
    check.add_argument("--layout", choices=["robomimic", "aloha"], default="robomimic")
    check.add_argument("--state-key", default=None)
    check.add_argument("--action-key", default=None)
    check.add_argument("--text-key", default=None, help="per-frame text (data.text_key): report frames without any")
    check.add_argument(
        "--decode",
        choices=["ends", "all", "none"],
        default="ends",
        help="which frames to decode: first/last of each episode, all, or none",
    )
    check.set_defaults(func=cmd_check)
