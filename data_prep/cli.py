"""Command lines built from typed options sections, so each option has one definition and help text.

Options are :class:`Options` sections (pydantic, ``shd_common.settings``: the mechanism of the run
config): a field's description (``setting(default, help)``) is its ``--help`` line, ``flag=...``
overrides the flag name (default ``--field-name``), validation runs once when the options are
built, and a problem is a :class:`DataError` that names the flag. Tuples become repeatable
multi-value options, bools switches, ``int | None`` an int option whose default is None.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from shd_common.integrity import DiskFull
from shd_common.manifest import DataError
from shd_common.settings import Section, setting

T = TypeVar("T", bound="Options")

_EXPECTED = {"int_type": "an int", "float_type": "a number", "string_type": "a string", "bool_type": "a bool",
             "tuple_type": "a tuple", "path_type": "a path (pathlib.Path)", "is_instance_of": "a path"}


def option(default: Any = ..., help: str = "", flag: str | None = None) -> Any:
    """A field with its ``--help`` line and, when not ``--field-name``, its flag."""
    return setting(default, help, json_schema_extra={"flag": flag} if flag else None)


class Options(Section):
    """A command's options; built from Python (``ShardOptions(out=...)``) or from ``--flags``,
    validated once, a problem raised as DataError naming the flag."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise DataError("; ".join(dict.fromkeys(_message(type(self), err) for err in e.errors()))) from None

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes``, validated like the original."""
        return type(self)(**{**self.model_dump(), **changes})


def _message(cls: type[Options], err: dict) -> str:
    name = err["loc"][0] if err["loc"] else None
    flag = _flag(name, cls.model_fields[name]) if name in cls.model_fields else None
    if err["type"] == "value_error":  # the validators' own messages name their flags
        return str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
    if err["type"] == "missing":
        return f"{flag}: required"
    if err["type"] == "extra_forbidden":
        return f"unknown option {name!r} (valid: {', '.join(cls.model_fields)})"
    expected = _EXPECTED.get(err["type"], err["msg"])
    return f"{flag or name}: expected {expected}, got {err['input']!r}"


def _flag(name: str, f: FieldInfo) -> str:
    return (f.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")


def _optional_inner(kind: Any) -> Any:
    """`int` for `int | None`; any other type as it is."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


def add_options(parser: argparse.ArgumentParser, cls: type[Options]) -> None:
    """Add one argument per field of `cls`."""
    for name, f in cls.model_fields.items():
        flag = _flag(name, f)
        kind = _optional_inner(f.annotation)
        kwargs: dict[str, Any] = {"dest": name, "help": f.description or ""}
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            kwargs.update(nargs="+", action="extend", type=typing.get_args(kind)[0])
        else:
            kwargs["type"] = kind if kind in (int, float, str, Path) else str
        if kind is not bool:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        if f.is_required():
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            kwargs["help"] += f" (default: {f.default})" if kind is not bool and f.default is not None else ""
        parser.add_argument(flag, **kwargs)


def command_line(prog: str, options: Options, leave_out: tuple[str, ...] = ()) -> str:
    """The shell command that gives `options`, without the fields in `leave_out`; options at their
    default are left out too, so the command stays short."""
    words = prog.split()
    for name, f in type(options).model_fields.items():
        value = getattr(options, name)
        if name in leave_out or value == f.default or value is None:
            continue
        if isinstance(value, bool):
            words.append(_flag(name, f))
        elif isinstance(value, tuple):
            words += [_flag(name, f), *map(str, value)]
        else:
            words += [_flag(name, f), str(value)]
    return shlex.join(words)


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The options from parsed arguments (validated as they are built)."""
    values = {name: getattr(args, name) for name in cls.model_fields}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def run_cli(main: typing.Callable[[], None]) -> None:
    """Run an entry point, turning DataError and DiskFull (a write ran out of space) into a
    one-line message and exit status 2."""
    try:
        main()
    except (DataError, DiskFull) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
