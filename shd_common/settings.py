"""Typed settings on pydantic v2: the base of every config section, YAML reading, dotted overrides.

Each component owns a section (a :class:`Section` subclass next to its code: ``CheckpointConfig``
in ``pipeline.checkpoint.checkpointer``, ``EvalConfig`` in ``pipeline.training.evaluator``, ...); ``pipeline.config``
composes them into the run config and ``data_prep`` builds its command lines from its own. What
this module adds to pydantic is only what the project promises its users:

- strict types (``"1"`` is not an int, ``1`` is not a bool), unknown keys refused, floats finite;
  a float may be written ``3e-4`` (YAML 1.1 reads that as a string);
- errors as :class:`ConfigError` lines that name the dotted key (``config key 'optim.lr': ...``);
- YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently) and
  reports syntax errors with line and column;
- ``key.sub=value`` overrides, the value parsed as YAML, one parser for train, study and tests,
  the same key twice refused;
- a class declared for every leaf key (:func:`declared_classes`: what changing it on resume means,
  ``pipeline.config.RESUME_CLASSES``), checked complete when the config module is imported.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, TypeGuard, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

_Model = TypeVar("_Model", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def _finite_float(value: Any) -> Any:
    """A YAML number (or a number YAML left as a string, like ``3e-4``) as a finite float; other
    values pass through for pydantic's strict float check to refuse."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value
    if isinstance(value, str) and not _FLOAT_RE.match(value.strip()):
        return value
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        x = math.inf
    if not math.isfinite(x):  # a run with such a setting would end with NaN weights
        raise ValueError(f"{value!r} is not a finite number (inf and nan are refused): give a finite value")
    return x


#: A finite float that also accepts an int and a numeric string (``3e-4``).
Float = Annotated[float, BeforeValidator(_finite_float)]


def setting(default: Any = ..., help: str = "", **kw: Any) -> Any:
    """A field with its help text (``--help-config``, ``--help``); list defaults are copied."""
    if isinstance(default, (list, dict)):
        value = default
        return Field(default_factory=lambda: type(value)(value), description=help, **kw)
    return Field(default, description=help, **kw)


class Section(BaseModel):
    """A keyword-only, strictly typed, immutable settings section that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


# --------------------------------------------------------------------------------------------
# Validation errors as messages that name the key
# --------------------------------------------------------------------------------------------

_EXPECTED = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "bool_type": "bool",
             "bool_parsing": "bool", "float_type": "float", "float_parsing": "float", "string_type": "str",
             "list_type": "list", "tuple_type": "list", "model_type": "a mapping", "dict_type": "a mapping"}


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _section_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section class at loc, None when loc names a value."""
    cls = model
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def _message(model: type[BaseModel], err: ErrorDetails, prefix: str) -> str:
    key = prefix + _dotted(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        where = err["loc"][:-1]
        section = _section_at(model, where)
        return (f"unknown config key(s): {key} (valid keys under '{prefix + _dotted(where) if where else '<root>'}': "
                f"{', '.join(section.model_fields) if section else '?'})")
    got = err["input"]
    if kind == "literal_error":
        return f"config key '{key}': expected one of {err['ctx']['expected']}, got {got!r}"
    if kind in _EXPECTED:
        return f"config key '{key}': expected {_EXPECTED[kind]}, got {got!r} ({type(got).__name__})"
    if kind == "value_error":  # our own validators: the message says what to fix
        text = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        # a section's cross-field check names its keys itself; a value's check does not
        return text if _section_at(model, err["loc"]) is not None else f"config key '{key}': {text}"
    return f"config key '{key}': {err['msg']}, got {got!r}"


def build(model: type[_Model], data: Any, prefix: str = "") -> _Model:
    """``model`` validated from ``data``; ConfigError listing every problem, one line each."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = list(dict.fromkeys(_message(model, err, prefix) for err in e.errors()))
        raise ConfigError("\n".join(lines)) from None


def _is_section(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_help(model: type[BaseModel], prefix: str = "", classes: dict[str, str] | None = None) -> list[str]:
    """One line per leaf key: ``key (type, default ...): help``, then ``[on resume: CLASS]`` when
    ``classes`` maps the dotted key to its class."""
    lines = []
    for name, f in model.model_fields.items():
        tp = f.annotation
        if _is_section(tp):
            lines += field_help(tp, f"{prefix}{name}.", classes)
            continue
        default = f.get_default(call_default_factory=True)
        type_name = tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")
        if "BeforeValidator" in type_name:  # Float
            type_name = "float"
        tail = f" [on resume: {classes[prefix + name]}]" if classes else ""
        lines.append(f"  {prefix}{name} ({type_name}, default {default!r}): {f.description or ''}{tail}")
    return lines


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted name of every leaf key of a settings tree, in declaration order."""
    keys = []
    for name, f in model.model_fields.items():
        keys += leaf_keys(f.annotation, f"{prefix}{name}.") if _is_section(f.annotation) else [prefix + name]
    return keys


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of the leaves of a nested mapping (a list is a leaf value)."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def declared_classes(model: type[BaseModel], declared: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """{leaf key: class} from ``{class: keys}``, where ``section.*`` stands for every leaf of a section.

    Every leaf key of ``model`` must be covered exactly once and every entry must name keys of
    ``model``; anything else is a TypeError when the declaring module is imported (a key added to a
    section without deciding its class is a bug of the code, not of a run's config).
    """
    leaves = leaf_keys(model)
    owners: dict[str, list[str]] = {k: [] for k in leaves}
    for cls, keys in declared.items():
        for entry in keys:
            covered = ([k for k in leaves if k.startswith(entry[:-1])] if entry.endswith(".*")
                       else [entry] if entry in owners else [])
            if not covered:
                raise TypeError(f"class '{cls}' names '{entry}', which is no key of {model.__name__}")
            for k in covered:
                owners[k].append(cls)
    bad = {k: v for k, v in owners.items() if len(v) != 1}
    if bad:
        raise TypeError(f"every key of {model.__name__} needs exactly one class: "
                        + ", ".join(f"{k} has {v or 'none'}" for k, v in bad.items()))
    return {k: v[0] for k, v in owners.items()}


# --------------------------------------------------------------------------------------------
# YAML and dotted overrides
# --------------------------------------------------------------------------------------------


# PyYAML ships no type hints (and types-PyYAML is not a dependency): mypy sees SafeLoader as Any
class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", set())
        return self.construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, path: str, visited: set[int]) -> None:
    """Raise ConfigError naming the dotted key and both lines of the first key given twice."""
    if id(node) in visited:  # an alias: checked where its anchor is (and recursive aliases end)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}  # scalar key -> the line it was first given on
        for key_node, value_node in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            dotted = ".".join(filter(None, (path, key_node.value if scalar else "?")))
            line = key_node.start_mark.line + 1
            if scalar and key_node.value in lines:
                raise ConfigError(f"key '{dotted}' is given twice (line {lines[key_node.value]} and line "
                                  f"{line}): keep one (the second would silently replace the first)")
            if scalar:
                lines[key_node.value] = line
            _refuse_duplicate_keys(value_node, dotted, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", visited)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python value; ConfigError with the line and column of a syntax error, or
    naming a key given twice in one mapping."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        if e.problem_mark is None:
            raise ConfigError(" ".join(str(e).split())) from None
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: {e.problem}"
        if e.context and e.context_mark is not None:
            where += f" ({e.context} that starts at line {e.context_mark.line + 1})"
        raise ConfigError(where) from None
    except yaml.reader.ReaderError as e:  # a control character: e.character is its code point
        raise ConfigError(f"line {text.count(chr(10), 0, e.position) + 1}: unacceptable character "
                          f"#x{e.character:04x}: {e.reason}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value parsed as YAML (``3`` int, ``[1,2]`` list, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    return key, value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree[a][b] = value for ``a.b`` (sections created as needed)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each ``key=value`` in tree (in place, returned); the same key twice is refused (which
    one was meant?)."""
    given: dict[str, str] = {}
    for o in overrides:
        key, value = parse_override(o)
        if key in given:
            raise ConfigError(f"override '{key}' is given twice ('{given[key]}' and '{o}'): give it once")
        given[key] = o
        set_dotted(tree, key, value)
    return tree
