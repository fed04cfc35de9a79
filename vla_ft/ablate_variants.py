"""The variants of an ablation: the recipe's ``ablation.variants`` crossed with ``--grid key=v1,v2``,
each resolved to a validated recipe in ``<output_dir>/<variant>`` (:func:`plan`), with every problem
(bad keys, reserved keys, two variants that are one recipe, a run directory trained with another
recipe) reported before anything trains."""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_ft.ablate_table import SWEEP_FILES
from vla_ft.config import LOADER_KEYS, Recipe, RecipeError, apply_overrides, read_yaml, recipe_from_dict, to_dict
from vla_ft.config.loader import parse_value, set_key

NAME_OK = re.compile(r"^[A-Za-z0-9_.=+-]+$")
# What ablate sets for every variant itself: a variant setting it would be silently undone.
RESERVED = {
    "output_dir": "each variant runs in <output_dir>/<variant>; set output_dir once, for the whole sweep",
    "train.resume": "every variant resumes (rerunning the command goes on where it stopped)",
    "ablation": "the ablation section configures the sweep, not a variant",
}
# What a rerun may change in a variant's recipe: how long it trains (a sweep run longer) and how it
# logs, saves and loads. They change no result the summary lists under the variant's name.
RERUN_MAY_CHANGE = (
    "train.steps",
    "logging.",
    "checkpoint.",
    *LOADER_KEYS,
    "train.threads",
)


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value


# ----------------------------------------------------------------------------- variants
def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets/braces/quotes: ``[1,2],[3]`` -> ``['[1,2]', '[3]']``.
    A quote opens only at the start of a value (YAML's rule): ``what's,next`` is two values."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"" and not current.strip():
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    if quote:
        raise RecipeError(f"--grid values '{text}': a quote {quote} is never closed", "command line")
    return [*parts, current]


def grid_variants(specs: Sequence[str]) -> list[Variant]:
    """``["optim.lr=1e-3,3e-4", "freeze.vision_encoder=true,false"]`` -> every combination (values parsed as YAML)."""
    if not specs:
        return []
    axes, swept, problems = [], {}, []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise RecipeError(f"--grid '{spec}' must look like key.sub=v1,v2", "command line")
        if why := reserved_key_problem(key):
            problems.append(f"--grid '{spec}': {why}")
        elif key in swept:
            problems.append(
                f"--grid '{spec}': {key} is swept by --grid '{swept[key]}' already; give all its values "
                f"in one --grid {key}=v1,v2"
            )
        swept.setdefault(key, spec)
        axes.append([(key, parse_value(v, f"--grid '{spec}'"), v.strip()) for v in split_top_level(values)])
    if problems:
        raise RecipeError(problems, "command line")
    variants = []
    for combo in itertools.product(*axes):
        # A float is named as typed (1e-3, not 0.001): the run directory matches the command line.
        name = "+".join(f"{key}={_short(text if isinstance(value, float) else value)}" for key, value, text in combo)
        variants.append(Variant(name, {key: value for key, value, _ in combo}))
    return variants


def reserved_key_problem(key: str) -> str | None:
    """Why a variant may not set ``key`` (ablate sets it for every variant), or None."""
    for reserved, why in RESERVED.items():
        if key == reserved or key.startswith(reserved + "."):
            return f"{key} cannot differ between variants: {why}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def combine(recipe_variants: list[Variant], grid: list[Variant]) -> list[Variant]:
    """The recipe's variants, the grid's, or (both given) every recipe variant x every grid point."""
    if recipe_variants and grid:
        return [Variant(f"{a.name}+{b.name}", {**a.overrides, **b.overrides}) for a in recipe_variants for b in grid]
    return recipe_variants or grid


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    set_key(raw, dotted.split("."), value)


def variant_recipe(base_raw: dict[str, Any], variant: Variant, root: Path) -> Recipe:
    """Base recipe + the variant's overrides, in ``root/<name>``, resumable. Errors name the variant."""
    raw = copy.deepcopy(base_raw)
    raw.pop("ablation", None)  # a variant is a plain training run
    for key, value in variant.overrides.items():
        _set(raw, key, value)
    _set(raw, "output_dir", str(root / variant.name))
    _set(raw, "train.resume", True)
    if not raw.get("logging", {}).get("wandb", {}).get("group"):  # the sweep's runs side by side in W&B
        _set(raw, "logging.wandb.group", root.name)
    return recipe_from_dict(raw, f"variant '{variant.name}'")


def plan(
    recipe_path: str | Path, overrides: Sequence[str], grid: Sequence[str]
) -> tuple[Recipe, list[tuple[Variant, Recipe]]]:
    """Validate the base recipe and every variant (all problems at once) before anything trains."""
    base_raw = apply_overrides(read_yaml(recipe_path), list(overrides))
    from vla_ft.metrics import direction_problems  # torch: only when a sweep is planned

    base = recipe_from_dict(base_raw, str(recipe_path))
    a = base.ablation
    if mode_problems := direction_problems(a.metric, a.mode, ("ablation.metric", "ablation.mode")):
        raise RecipeError(mode_problems, str(recipe_path))
    named = [Variant(name, dict(ov or {})) for name, ov in base.ablation.variants.items()]
    variants = combine(named, grid_variants(grid))
    if not variants:
        raise RecipeError(
            "ablation.variants: no variants; name them in the recipe or pass --grid key=v1,v2", str(recipe_path)
        )
    problems = [f"ablation.variants.{v.name}: {why}" for v in variants if (why := name_problem(v.name))]
    problems += [
        f"ablation.variants.{v.name}: {why}" for v in named for k in v.overrides if (why := reserved_key_problem(k))
    ]
    seen = [v.name for v in variants]
    problems += [f"ablation.variants: duplicate variant '{n}'" for n in sorted({n for n in seen if seen.count(n) > 1})]
    planned = []
    root = Path(base.output_dir)
    for variant in variants:
        try:
            planned.append((variant, variant_recipe(base_raw, variant, root)))
        except RecipeError as err:
            problems += [f"variant '{variant.name}': {p}" for p in err.problems]
    problems += same_recipe_problems(planned) + trained_elsewhere_problems(planned)
    if problems:
        raise RecipeError(problems, str(recipe_path))
    return base, planned


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a variant's run directory ``<output_dir>/<name>``, or None: '..' is
    the sweep root's parent, '.' the root, a leading '.' a hidden or temporary directory, and the
    summary's files are the sweep's own."""
    if not NAME_OK.match(name):
        return "use letters, digits and _ . = + - in variant names"
    if name.startswith("."):
        return "a variant name may not start with '.' ('..' is output_dir's parent, '.' output_dir, '.x' hidden)"
    if name in SWEEP_FILES:
        return f"{name} is a file the sweep writes in output_dir; choose another name"
    return None


def same_recipe_problems(planned: list[tuple[Variant, Recipe]]) -> list[str]:
    """Variants that resolve to one recipe (``--grid optim.lr=1e-3,0.001``) would train it twice
    under two names."""
    first: dict[str, Variant] = {}
    problems = []
    for variant, recipe in planned:
        resolved = {**to_dict(recipe), "output_dir": None}
        other = first.setdefault(json.dumps(resolved, sort_keys=True), variant)
        if other is not variant:
            problems.append(
                f"variants '{other.name}' and '{variant.name}' are the same recipe"
                f"{_override_difference(other, variant)}; drop one"
            )
    return problems


def _override_difference(a: Variant, b: Variant) -> str:
    """`` (optim.lr: '1e-3' vs 0.001)``: the overrides that differ in writing only."""
    keys = sorted(k for k in a.overrides.keys() | b.overrides.keys() if a.overrides.get(k) != b.overrides.get(k))
    shown = [f"{k}: {_written(a, k)} vs {_written(b, k)}" for k in keys]
    return f" ({'; '.join(shown)})" if shown else ""


def _written(variant: Variant, key: str) -> str:
    return repr(variant.overrides[key]) if key in variant.overrides else "unset"


def trained_elsewhere_problems(planned: list[tuple[Variant, Recipe]]) -> list[str]:
    """A variant's run directory with checkpoints of another recipe (a changed override, base
    key or --grid value): resuming or skipping it would report those results as this recipe's."""
    from vla_ft.checkpoint import latest_checkpoint, step_of
    from vla_ft.run_state import read_saved_recipe, recipe_changes

    problems = []
    for variant, recipe in planned:
        run_dir = Path(recipe.output_dir)
        path = latest_checkpoint(run_dir / "checkpoints")
        changes = recipe_changes(read_saved_recipe(path), recipe, RERUN_MAY_CHANGE) if path is not None else []
        step = step_of(path) if path is not None else 0
        if step > recipe.train.steps:  # its row would compare more steps than the other variants train
            problems.append(
                f"variant '{variant.name}': {run_dir} trained to step {step} already, beyond train.steps="
                f"{recipe.train.steps}; set train.steps >= {step}, delete {run_dir}, or choose a new output_dir"
            )
        if changes:
            problems.append(
                f"variant '{variant.name}': {run_dir} was trained with another recipe ({'; '.join(changes)}); "
                f"rerun with that recipe, delete {run_dir} to train the variant afresh, or choose a new output_dir"
            )
    return problems
