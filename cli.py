"""Command-line options made from configuration dataclasses, so that each option is written once.

A dataclass field made with :func:`opt` carries its help text beside its default (and, where needed, an
argparse ``type`` or ``choices``). :func:`add_options` turns every such field of a class into one
``--field-name`` option, and :func:`options_from_args` builds the class back from the parsed arguments: the
default, the help text, the check of the value and the name are the field's, in one place.

    @dataclass
    class DecodeConfig:
        beam_size: int = opt(3, "beams per image (1 = greedy)", type=positive_int)

A ``bool`` field becomes a ``--name`` / ``--no-name`` pair; a ``tuple[int, ...]`` field takes any number of
values. :class:`HelpFormatter` writes each default as the user reads it ("on"/"off" for switches, nothing for
a plain flag such as ``--no-figures``, which is off until given).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field with ``default`` whose command-line option has ``help`` (and ``argparse_kwargs``,
    e.g. ``type=positive_int`` or ``choices=[...]``)."""
    return dataclasses.field(default=default, metadata={"help": help, "argparse": argparse_kwargs})


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (made with :func:`opt`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag(name: str) -> str:
    """The option string of a field: ``beam_size`` -> ``--beam-size``."""
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, exclude: tuple = ()) -> None:
    """Add one option per :func:`opt` field of ``cls`` (except those named in ``exclude``)."""
    for f in option_fields(cls):
        if f.name in exclude:
            continue
        kwargs = {"default": f.default, "help": f.metadata["help"], **f.metadata["argparse"]}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif str(f.type).startswith("tuple"):
            kwargs.setdefault("type", _TYPES[str(f.type)[6:].split(",")[0]])
            kwargs["nargs"] = "*"
        else:
            kwargs.setdefault("type", _TYPES.get(str(f.type), str))
        parser.add_argument(flag(f.name), **kwargs)


def options_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of ``cls`` from the parsed ``args`` (its :func:`opt` fields) and the other ``values``."""
    for f in option_fields(cls):
        if f.name not in values and hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if str(f.type).startswith("tuple") else value
    return cls(**values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default, written for people: "(default: on)" / "(default: off)" for
    ``--x/--no-x`` switches, and no default at all for a plain flag (it is off until given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # (Python < 3.12's BooleanOptionalAction appends its own "(default: True)" to the help.)
        text = (action.help or "").replace(" (default: %(default)s)", "")
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "%(default)" in text:
            return text  # store_true/store_false flags, and options without a default
        return super()._get_help_string(action)
