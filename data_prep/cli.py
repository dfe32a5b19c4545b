"""Command lines built from the options dataclasses, so each option has one definition and help text.

A field's `metadata["help"]` is its `--help` line; `metadata["flag"]` overrides the flag name
(default: `--field-name`). Tuples become repeatable multi-value options, bools become switches.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

from data_prep.manifest import DataError

T = TypeVar("T")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", action="extend", type=typing.get_args(kind)[0])
        else:
            kwargs["type"] = kind if kind in (int, float, str, Path) else str
        if kind is not bool:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            kwargs["help"] += f" (default: {f.default})" if kind is not bool else ""
        parser.add_argument(flag, **kwargs)


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the options dataclass from parsed arguments (its __post_init__ validates them)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if typing.get_origin(hints[name]) is tuple:
            values[name] = tuple(value)
    return cls(**values)


def run_cli(main: typing.Callable[[], None]) -> None:
    """Run an entry point, turning DataError into a one-line message and exit status 2."""
    try:
        main()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
