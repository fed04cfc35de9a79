"""``vla-ft`` command line: thin wrappers over the library.

User errors (bad recipe, missing file, occupied output directory, unusable data, a halted run) print
one clear message and exit with status 2, without a traceback; bugs still show theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from vla_ft.config import RecipeError, describe_keys, load_recipe
from vla_ft.config.checks import suggest
from vla_ft.config.loader import recipe_keys

USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, FileNotFoundError, FileExistsError)
OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("vla_ft", "robot_data"))


def _recipe(args: argparse.Namespace):
    return load_recipe(args.recipe, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from vla_ft.train import main

    main(_recipe(args))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    variants = ""
    if recipe.ablation.variants:  # `vla-ft ablate` trains the variants, not the base: check them as it does
        from vla_ft.ablate_variants import plan

        variants = f", {len(plan(args.recipe, args.overrides, [])[1])} ablation variants"
    print(f"ok: {args.recipe} is a valid recipe (output_dir={recipe.output_dir}{variants})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    text = describe_keys(args.section)
    if not text:  # a typo would otherwise print nothing and look like an empty section
        sections = [k for k in recipe_keys() if "." not in k]
        raise RecipeError(
            f"no recipe key starts with '{args.section}'{suggest(args.section, recipe_keys())}; "
            f"sections: {', '.join(sections)}",
            "command line",
        )
    print(text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vla_ft.report import inspect_recipe

    print(inspect_recipe(_recipe(args)))
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, bool]] = {
    "train": (cmd_train, "train a recipe (output_dir=DIR sets the run directory; train.resume=true continues)", True),
    "validate": (cmd_validate, "check a recipe and overrides without training", True),
    "inspect": (cmd_inspect, "print the per-module parameter report of a recipe", True),
}

EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_data(sub: argparse._SubParsersAction) -> None:
    from vla_ft.data_cli import add_data_commands

    add_data_commands(sub)


EXTRA_COMMANDS.append(_add_data)


def cmd_export(args: argparse.Namespace) -> int:
    from vla_ft.export import export_policy
    from vla_ft.policy import resolve_directory

    source = resolve_directory(args.checkpoint)  # the checkpoint a run directory or best/latest names
    out = export_policy(source, args.out, args.ema)
    print(f"exported {source} -> {out} (load it with vla_ft.VLAPolicy.from_pretrained('{out}'))")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from vla_ft.evaluate import CHECKPOINT_HELP

    text = "merge LoRA and write a deployable policy directory (see vla_ft.export)"
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the weight average of a run with train.ema_decay (--no-ema: the trained weights)",
    )
    p.set_defaults(func=cmd_export)


EXTRA_COMMANDS.append(_add_export)


def _add_ablate_eval_plot(sub: argparse._SubParsersAction) -> None:
    from vla_ft import ablate, evaluate, plots, rollout, serve  # light: torch and matplotlib load when a command runs

    for module in (ablate, evaluate, plots, rollout, serve):
        module.add_parser(sub)


EXTRA_COMMANDS.append(_add_ablate_eval_plot)


def cmd_consolidate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vla_ft.distributed import consolidate

    out = consolidate(Path(args.checkpoint), Path(args.out) if args.out else None)
    print(f"consolidated {args.checkpoint} -> {out}")
    return 0


def _add_consolidate(sub: argparse._SubParsersAction) -> None:
    text = "merge an FSDP checkpoint's shards (model_dcp/) into one model.safetensors (see vla_ft.distributed)"
    p = sub.add_parser("consolidate", help=text, description=text)
    p.add_argument("checkpoint", help="checkpoint directory written with distributed.strategy=fsdp")
    p.add_argument("--out", default=None, help="output file (default: model.safetensors inside the checkpoint)")
    p.set_defaults(func=cmd_consolidate)


EXTRA_COMMANDS.append(_add_consolidate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-ft", description="Fine-tune vision-language-action robot policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, text, takes_recipe) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if takes_recipe:
            _add_recipe_args(p)
        p.set_defaults(func=fn)
    keys = sub.add_parser("keys", help="list every recipe key with its type, default and meaning")
    keys.add_argument("section", nargs="?", default="", help="only keys under this prefix, e.g. optim")
    keys.set_defaults(func=cmd_keys)
    for add in EXTRA_COMMANDS:
        add(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from vla_ft.checkpoint import CheckpointError
    from vla_ft.train import TrainingHalted

    return (*USER_ERRORS, CheckpointError, TrainingHalted)


def _stdout_closed() -> int:
    """The reader of stdout went away (`vla-ft keys | head`): stop quietly, as Unix tools do.

    stdout is pointed at /dev/null so that the interpreter's last flush does not raise again, and
    the status is the one of a process ended by SIGPIPE (128 + 13), which shells expect there.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


@contextlib.contextmanager
def plain_warnings(command: str) -> Iterator[None]:
    """vla-ft's own warnings (a recipe changed on resume, a best checkpoint gone) as one line each,
    like its errors: ``vla-ft train: warning: ...``. Python's format shows a file, a line and a
    source line, which reads like a crash; a library's warnings keep it (it says where they come from)."""
    python_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        if str(Path(filename).resolve()).startswith(OUR_PACKAGES):
            return f"vla-ft {command}: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`ablate R --grid k=v1,v2 train.steps=5`) land here:
    # argparse gives positionals one stretch only. Anything else stays an error.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        with plain_warnings(command):
            status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except user_errors() as err:
        print(f"vla-ft {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
