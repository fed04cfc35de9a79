"""Loading recipes: YAML + ``key.sub=value`` overrides -> a validated :class:`Recipe`.

Every unknown key and every wrong type is reported *in one pass*, each naming the key and
suggesting the nearest valid one; then the cross-key checks of :mod:`vla_ft.config.checks` run.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vla_ft.config.checks import name_problems, suggest, validate
from vla_ft.config.schema import Recipe, RecipeError
from vla_ft.config.training_checks import training_warnings

# PyYAML implements YAML 1.1; recipes are read as YAML 1.2 (core schema) reads them. 1.1's floats
# need a dot, so 1e-6 would be the string '1e-6' in every key the schema does not type as float
# (model.language.config, model.vision.kwargs); its integers read 010 as octal 8 and 1:00 as base-60
# 60 (data.val_episodes=[001, 010] would hold out episode 8), its booleans include yes/no/on/off.
FLOAT_1_2 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")
INT_1_2 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
BOOL_1_2 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
INT, BOOL = "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool"


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's integers, booleans and exponent floats (1e-6, 1E6)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """A key given twice in one mapping is an error naming it and its lines (PyYAML keeps the
        last silently: a second ``optim:`` section would drop the first's lr and groups)."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool | None):
                continue  # an unhashable (complex) key: the base constructor reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice (lines {seen[key]} and {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        return int(text[2:] if base != 10 else text, base)  # "010" is ten


class RecipeDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`RecipeLoader` would read back as numbers or booleans."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (INT, BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_constructor(INT, RecipeLoader.construct_yaml_int)
for _cls in (RecipeLoader, RecipeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_1_2, list("-+.0123456789"))
    _cls.add_implicit_resolver(INT, INT_1_2, list("-+0123456789"))
    _cls.add_implicit_resolver(BOOL, BOOL_1_2, list("tTfF"))


def load_yaml(text: str) -> Any:
    """YAML text -> Python, numbers as YAML 1.2 reads them (see :class:`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: no arbitrary objects


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is dict:
        return f"dict[str, {_type_name(typing.get_args(tp)[1])}]"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else tp.__name__


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return the converted value (problems appended)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return tp()
        return _build(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices])
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        key_type, item = typing.get_args(tp)
        bad = [k for k in value if key_type is str and not isinstance(k, str)]
        if bad:
            problems.append(f"{key}: keys must be names, got {', '.join(repr(k) for k in bad)}")
        return {k: _convert(v, item, f"{key}.{k}", problems) for k, v in value.items() if k not in bad}
    if tp is type(None):
        if value is not None:
            problems.append(f"{key}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 5e-4 as a string; accept the usual scientific notation.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        yaml_1_1 = tp is bool and str(value).lower() in ("yes", "no", "on", "off", "y", "n")
        hint = " (recipes are YAML 1.2: true or false)" if yaml_1_1 else ""
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = suggest(str(key), names)
            full = close.replace("'", f"'{prefix}.", 1) if close and prefix else close
            # nothing close ('wd' for weight_decay): the valid keys, so the user need not read the schema
            where = f"{prefix}" if prefix else "a recipe"
            full = full or f"; the keys of {where}: {', '.join(names)}"
            problems.append(f"unknown key '{path}'{full}")
            continue
        kwargs[key] = _convert(value, hints[key], path, problems)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Recipe (or any nested dataclass) -> plain dict, YAML-safe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like key.sub=value", "command line")
    key, value = text.split("=", 1)
    return key.strip().split("."), parse_value(value, f"override '{text}'")


def parse_value(text: str, where: str) -> Any:
    """A command-line value as YAML (empty: null); bad YAML is a RecipeError naming ``where``."""
    try:
        return load_yaml(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not a valid YAML value ({' '.join(str(err).split())})", "command line") from None


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Merge ``key.sub=value`` strings (values parsed as YAML) onto a raw recipe dict."""
    for text in overrides:
        set_key(raw, *_parse_override(text))
    return raw


def set_key(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set the dotted ``path`` of a raw recipe dict to ``value``.

    A mapping given for a section (``optim={lr: 3e-4}``, ``unfreeze.vision_encoder={at_step: 5}``)
    is merged into it key by key: replacing it would silently reset the section's other keys to
    their defaults. A mapping for a free-form key (``model.language.config``, ``unfreeze``,
    ``ablation.variants``) replaces what was there, so ``unfreeze={}`` clears it.
    """
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict) and _names_section(path):
        for key, sub in value.items():
            set_key(raw, [*path, str(key)], sub)
    else:
        node[path[-1]] = copy.deepcopy(value)


def _names_section(path: list[str]) -> bool:
    """Whether ``path`` names a dataclass section of the schema (an entry of ``unfreeze`` is one)."""
    tp: Any = Recipe
    for part in path:
        tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else _dict_entry(tp)
        if tp is None:
            return False
    return dataclasses.is_dataclass(tp)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a RecipeError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", str(path))
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:  # a weights file given for a recipe, a Latin-1 comment
        raise RecipeError(f"not a UTF-8 text file (byte {err.start}: {err.reason})", str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"invalid YAML{where}: {getattr(err, 'problem', err)}", str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(raw).__name__}", str(path))
    return raw


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe", training: bool = True) -> Recipe:
    """Build and validate a Recipe from a raw mapping; all problems are reported at once, then the
    warnings of a valid one (:func:`~vla_ft.config.training_checks.training_warnings`) as ``UserWarning``s.
    ``training=False``: a trained checkpoint's recipe read back, judged without the rules and warnings
    about how it trains (:func:`~vla_ft.config.checks.validate`)."""
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    # With type errors the cross-key rules would judge placeholder values; names of modules and terms
    # need only the keys, so they are reported with the type errors ("every problem at once").
    problems += name_problems(recipe) if problems else validate(recipe, training)
    if problems:
        raise RecipeError(problems, source)
    for warning in training_warnings(recipe) if training else []:
        warnings.warn(f"{source}: {warning}", stacklevel=2)
    return recipe


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """YAML file + ``key.sub=value`` overrides -> validated Recipe."""
    raw = apply_overrides(read_yaml(path), overrides)
    return recipe_from_dict(raw, str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(to_dict(recipe), Dumper=RecipeDumper, sort_keys=False))


def describe_keys(prefix: str = "", cls: type = Recipe, path: str = "") -> str:
    """Every recipe key with type, default and help text (``vla-ft keys``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe_keys(prefix, tp, key + "."))
            continue
        if key.startswith(prefix) or prefix.startswith(key + "."):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{key} ({_type_name(tp)}, default {default!r}): {f.metadata.get('doc', '')}")
            entry = _dict_entry(tp)  # optim.groups.<name>.lr, unfreeze.<name>.at_step, loss.schedule.<name>.end
            if entry is not None:
                lines.append(describe_keys("", entry, f"{key}.<{KEY_NAMES.get(key, 'name')}>."))
    return "\n".join(line for line in lines if line)


KEY_NAMES = {"optim.groups": "module", "unfreeze": "module", "loss.schedule": "term"}


def _dict_entry(tp: Any) -> type | None:
    """The dataclass of a ``dict[str, <dataclass>]`` section's entries, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def recipe_keys(cls: type = Recipe, path: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``model``, ``model.vision``, ``model.vision.name``)."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(f"{path}{f.name}")
        if dataclasses.is_dataclass(hints[f.name]):
            keys += recipe_keys(hints[f.name], f"{path}{f.name}.")
    return keys
