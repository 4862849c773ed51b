"""Options: every configurable value is one field of one config dataclass.

Configs nest — `TrainConfig.sae` is an `SAEConfig`, `BuildConfig.train` a `TrainConfig` — so
each option and its default exist exactly once. Users see them flat: a leaf field's own name
is its command-line flag (`width` → `--width`) and its key in a `moesae build` TOML file
(`width = 4608`), wherever it sits in the tree. The help text of an option is the docstring
written under its field, as in EleutherAI sparsify's configs.

Field metadata understood here:
- `derived=True`: set by the engine (e.g. `d_in`, read from the data), never by a user;
- `aliases=("--max-tokens",)`: extra command-line spellings of the flag;
- `metavar="E"`: the placeholder shown in `--help`.

When a flat name occurs at several places of one tree (`seed` of the harvest and of training
in a build), setting it sets all of them; that is how a build shares one seed.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One leaf field of a config tree."""

    name: str
    """The flat name: the field's own name (flag `--name-with-dashes`, TOML key `name`)."""
    path: tuple[str, ...]
    """Attribute path from the root config, e.g. ('sae', 'width')."""
    field: Field
    kind: type
    """The value's type: bool, int, float or str (None is always allowed where the default is)."""
    optional: bool
    """Whether None is a valid value (`int | None`)."""
    doc: str
    """The docstring under the field, on one line."""

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return f.default_factory()
        return None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (the string literal under each field) of a dataclass,
    inherited fields included."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if is_dataclass(base):
            docs.update(field_docs(base))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _leaf_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation like `int | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(tp))
    return tp, False


@functools.cache
def _tree(cls: type) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[Option] = []
    for f in fields(cls):
        tp, optional = _leaf_type(hints[f.name])
        if f.metadata.get("derived"):
            continue
        if is_dataclass(tp):
            out += [
                Option(o.name, (f.name, *o.path), o.field, o.kind, o.optional, o.doc)
                for o in _tree(tp)
            ]
        else:
            kind = tp if tp in (bool, int, float, str) else None
            if kind is None:
                continue  # lists and tables (e.g. a build's [[sae]] entries) are not flat options
            out.append(Option(f.name, (f.name,), f, kind, optional, docs.get(f.name, "")))
    return tuple(out)


def options(cls: type, skip: Iterable[str] = ()) -> list[Option]:
    """The leaf options of config class `cls`, in field order, nested configs expanded in place."""
    skip = set(skip)
    return [o for o in _tree(cls) if o.name not in skip and o.path[0] not in skip]


def names(cls: type) -> set[str]:
    return {o.name for o in _tree(cls)}


def get(cfg: Any, name: str) -> Any:
    """The value of flat option `name` in config `cfg` (the first place it occurs)."""
    for o in _tree(type(cfg)):
        if o.name == name:
            return _get_path(cfg, o.path)
    raise KeyError(name)


def set_flat(cfg: Any, values: Mapping[str, Any], where: str = "") -> Any:
    """Set flat options on `cfg` in place (every place a name occurs) and return it.

    An unknown name or a value of the wrong type raises ConfigError naming `where`.
    """
    tree = _tree(type(cfg))
    by_name: dict[str, list[Option]] = {}
    for o in tree:
        by_name.setdefault(o.name, []).append(o)
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)}{' in ' + where if where else ''}; "
            f"known: {', '.join(sorted(by_name))}."
        )
    for name, value in values.items():
        for o in by_name[name]:
            _set_path(cfg, o.path, _coerce(o, value, where))
    return cfg


def to_flat(cfg: Any) -> dict[str, Any]:
    """{flat name: value} of every option of `cfg` (a name shared by several leaves: the first)."""
    out: dict[str, Any] = {}
    for o in _tree(type(cfg)):
        out.setdefault(o.name, _get_path(cfg, o.path))
    return out


def _coerce(o: Option, value: Any, where: str) -> Any:
    if value is None and o.optional:
        return None
    ok = (
        isinstance(value, bool) if o.kind is bool
        else isinstance(value, int) and not isinstance(value, bool) if o.kind is int
        else isinstance(value, int | float) and not isinstance(value, bool) if o.kind is float
        else isinstance(value, str)
    )
    if not ok:
        raise ConfigError(
            f"Option {o.name}{' in ' + where if where else ''} must be "
            f"{'a ' + o.kind.__name__ if o.kind is not int else 'an int'}, got {value!r}."
        )
    return float(value) if o.kind is float else value


def _get_path(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


def _set_path(obj: Any, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = getattr(obj, p)
    setattr(obj, path[-1], value)
