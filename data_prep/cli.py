"""Command lines built from the options dataclasses, so each option has one definition and help text.

A field's `metadata["help"]` is its `--help` line; `metadata["flag"]` overrides the flag name
(default: `--field-name`). Tuples become repeatable multi-value options, bools become switches,
`int | None` an int option whose default is None.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from data_prep.manifest import DataError

T = TypeVar("T")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = _flag(f)
        kind = _optional_inner(hints[f.name])
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
            kwargs["help"] += f" (default: {f.default})" if kind is not bool and f.default is not None else ""
        parser.add_argument(flag, **kwargs)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _optional_inner(kind: Any) -> Any:
    """`int` for `int | None`; any other type as it is."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


def command_line(prog: str, options: Any, leave_out: tuple[str, ...] = ()) -> str:
    """The shell command that gives `options` (a dataclass of `add_options`), without the fields in
    `leave_out`; options at their default are left out too, so the command stays short."""
    words = prog.split()
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in leave_out or value == f.default or value is None:
            continue
        if isinstance(value, bool):
            words.append(_flag(f))
        elif isinstance(value, tuple):
            words += [_flag(f), *map(str, value)]
        else:
            words += [_flag(f), str(value)]
    return shlex.join(words)


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
