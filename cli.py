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
import math
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def opt(
    default: Any,
    help: str,
    group: str = "",
    flags: tuple[str, ...] = (),
    resumable: bool = False,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field with ``default`` whose command-line option has ``help`` (and ``argparse_kwargs``,
    e.g. ``type=positive_int``, ``choices=[...]``, or ``cli_default=None`` where the command line's default
    means "decided later"). ``group`` titles the option's section of ``--help``; ``flags`` replaces the option string
    made from the name (e.g. ``("--plain-loop",)`` with ``action="store_false"``); ``resumable`` marks a
    model option that a resumed training run may change."""
    if "cli_default" in argparse_kwargs:
        argparse_kwargs["default"] = argparse_kwargs.pop("cli_default")
    meta = {"help": help, "group": group, "flags": flags, "resumable": resumable, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (made with :func:`opt`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag(name: str) -> str:
    """The option string of a field: ``beam_size`` -> ``--beam-size``."""
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, exclude: tuple = ()) -> None:
    """Add one option per :func:`opt` field of ``cls`` (except those named in ``exclude``), in the ``--help``
    sections their fields name."""
    groups = {group.title: group for group in parser._action_groups}
    for f in option_fields(cls):
        if f.name in exclude:
            continue
        kwargs = {"dest": f.name, "default": f.default, "help": f.metadata["help"], **f.metadata["argparse"]}
        if f.default is dataclasses.MISSING:
            del kwargs["default"]  # a required option
        if "action" in kwargs:
            pass  # e.g. store_false behind a flag of its own
        elif f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif str(f.type).startswith("tuple"):
            kwargs.setdefault("type", _TYPES[str(f.type)[6:].split(",")[0]])
            kwargs["nargs"] = "*"
        else:
            kwargs.setdefault("type", _TYPES.get(str(f.type).removesuffix(" | None"), str))
        title = f.metadata["group"]
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        (groups[title] if title else parser).add_argument(*(f.metadata["flags"] or [flag(f.name)]), **kwargs)


def options_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of ``cls`` from the parsed ``args`` (its :func:`opt` fields) and the other ``values``."""
    for f in option_fields(cls):
        if f.name not in values and hasattr(args, f.name):
            value = getattr(args, f.name)
            if str(f.type).startswith("tuple"):
                value = tuple(value)
            elif f.type == "str" and value is not None:
                value = str(value)  # a Path from utils.local_path: configs hold plain strings (checkpoints)
            values[f.name] = value
    return cls(**values)


def _number(text: str, kind: type, low: float, high: float, closed_high: bool = True) -> Any:
    value = kind(text)  # ValueError: argparse's "invalid ... value"
    inside = low <= value <= high if closed_high else low <= value < high
    if not (inside and math.isfinite(value)):
        bound = "" if high == math.inf else f" and at most {high}" if closed_high else f" and below {high}"
        raise argparse.ArgumentTypeError(f"must be at least {low}{bound}, got {text}")
    return value


def int_between(low: int, high: float = math.inf) -> Any:
    """argparse type: an integer in [low, high]."""

    def check(text: str) -> int:
        return _number(text, int, low, high)

    check.__name__ = "int"
    return check


def float_between(low: float, high: float = math.inf, closed_high: bool = True) -> Any:
    """argparse type: a finite number in [low, high] (or [low, high) with ``closed_high=False``)."""

    def check(text: str) -> float:
        return _number(text, float, low, high, closed_high)

    check.__name__ = "float"
    return check


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default, written for people: "(default: on)" / "(default: off)" for
    ``--x/--no-x`` switches, and no default at all for a plain flag (it is off until given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # (Python < 3.12's BooleanOptionalAction appends its own "(default: True)" to the help.)
        text = (action.help or "").replace(" (default: %(default)s)", "")
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS) or "%(default)" in text:
            return text  # store_true/store_false flags, and options without a default
        return super()._get_help_string(action)
