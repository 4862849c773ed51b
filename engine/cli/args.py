"""Command-line flags generated from the config dataclasses (engine.options), so every
option, its default and its help text are written once, on the field."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import Option, options, set_flat


def _parser_for(o: Option):
    def parse(text: str) -> Any:
        if o.optional and text.strip().lower() == "none":
            return None
        try:
            return o.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {o.kind.__name__}, got {text!r}") from None

    parse.__name__ = o.kind.__name__  # argparse names the type in its messages
    return parse


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per option of config class `cls` (nested configs included), in field order; a
    name that occurs twice (the stream's and the trainer's seed) is one flag setting both."""
    seen: set[str] = set()
    for o in options(cls, skip):
        if o.name in seen:
            continue
        seen.add(o.name)
        flags = [o.flag, *o.field.metadata.get("aliases", ())]
        help_ = o.doc
        if o.kind is bool:
            parser.add_argument(*flags, dest=o.name, action=argparse.BooleanOptionalAction,
                                default=o.default, help=help_)
            continue
        if o.default not in (None, ""):
            help_ += f" (default: {o.default})"
        parser.add_argument(*flags, dest=o.name, type=_parser_for(o), default=o.default,
                            metavar=o.field.metadata.get("metavar"),
                            choices=o.field.metadata.get("choices"), help=help_)


def config_from_args(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> Any:
    """An instance of `cls` with every option taken from the parsed flags."""
    values = {o.name: getattr(args, o.name) for o in options(cls, skip) if hasattr(args, o.name)}
    return set_flat(cls(), values)
