"""An option is declared once: a config field that carries its help, flag, allowed values and check.

Each layer owns a frozen config section (a :class:`Section` dataclass) whose fields are made with
:func:`option`. From that one declaration:

- constructing the section (from Python, a config file or flags) coerces each value to the field's
  type and checks it (allowed values from the owning layer's registry, a range), raising
  :class:`~lresnet.core.errors.InputError` "got X, expected Y" naming the field;
- the CLI generates its flags (name, help, help panel, bool on/off pair, repeatable or
  comma-separated lists, NAME=VALUE tables) by walking :func:`walk`;
- config files (TOML/YAML/JSON) use the field names as keys, sections as tables.

Cross-field rules of one section go in its ``check()`` method; nothing else validates.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence, Union

from lresnet.core.errors import InputError

META_KEY = "lresnet.option"
Choices = Union[Sequence[Any], Callable[[], Sequence[Any]], None]


@dataclass(frozen=True)
class Check:
    """A predicate on a value and the words for what it wants (``"> 0"``)."""

    ok: Callable[[Any], bool]
    expect: str


def greater(bound: float) -> Check:
    return Check(lambda v: v > bound, f"> {bound:g}")


def at_least(bound: float) -> Check:
    return Check(lambda v: v >= bound, f">= {bound:g}")


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> Check:
    """``lo <= v < hi`` by default; the brackets of the message follow the openness."""
    def ok(v: Any) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return Check(ok, f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")


@dataclass(frozen=True)
class OptionSpec:
    """What a field says about itself (see :func:`option`)."""

    help: str
    flag: Optional[str] = None
    aliases: tuple[str, ...] = ()
    negative: Optional[str] = None
    choices: Choices = None
    check: Optional[Check] = None
    panel: Optional[str] = None
    repeat: bool = False
    metavar: Optional[str] = None
    allow_nonfinite: bool = False

    def allowed(self) -> Optional[list[Any]]:
        """The allowed values, read from the owning registry when a callable was given."""
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def option(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[str] = None,
           aliases: Sequence[str] = (), negative: Optional[str] = None, choices: Choices = None,
           check: Optional[Check] = None, panel: Optional[str] = None, repeat: bool = False,
           metavar: Optional[str] = None, default_factory: Any = dataclasses.MISSING,
           allow_nonfinite: bool = False) -> Any:
    """A dataclass field declared as an option.

    Args:
        default / default_factory: the one default.
        help: one line for ``--help``.
        flag: the CLI flag (default ``--`` + the field name with dashes); aliases: more names.
        negative: for bools, the off flag (default ``--no-`` + the flag).
        choices: the allowed values, or a function returning them (the owning layer's registry).
        check: a range rule, e.g. ``greater(0)``.
        panel: the ``--help`` panel (default: the section's ``PANEL``).
        repeat: a list given by repeating the flag (otherwise comma-separated in one value).
        allow_nonfinite: accept inf/nan for a float (refused by default).
    """
    spec = OptionSpec(help=help, flag=flag, aliases=tuple(aliases), negative=negative, choices=choices,
                      check=check, panel=panel, repeat=repeat, metavar=metavar, allow_nonfinite=allow_nonfinite)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META_KEY: spec})


def spec_of(f: dataclasses.Field) -> Optional[OptionSpec]:
    return f.metadata.get(META_KEY)


# ----------------------------------------------------------------------------- coercion

def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a Python/TOML/YAML/JSON value to the field type `tp`, or raise InputError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(value, args[0], key)
    if is_section(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise InputError(key, f"got {value!r}, expected a table of options")
        return build(tp, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(key, f"got {value!r}, expected a table of name = value")
        return {str(k): v for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise InputError(key, f"got {value!r}, expected a list")
        item = typing.get_args(tp)[0]
        return tuple(coerce(v, item, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InputError(key, f"got {value!r}, expected true or false")
    if tp in (int, float):
        kind, accepted = ("an integer", (int, str)) if tp is int else ("a number", (int, float, str))
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise InputError(key, f"got {value!r}, expected {kind}")
        try:
            return tp(value)
        except (ValueError, OverflowError):
            raise InputError(key, f"got {value!r}, expected {kind}") from None
    if tp is str:
        if not isinstance(value, (str, os.PathLike)):
            raise InputError(key, f"got {value!r}, expected a string")
        return os.fspath(value)
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported option type {tp!r}")


def _check_value(key: str, value: Any, spec: OptionSpec) -> None:
    items = value if isinstance(value, tuple) else (value,)
    allowed = spec.allowed()
    for item in items:
        if isinstance(item, float) and not spec.allow_nonfinite and not math.isfinite(item):
            raise InputError(key, f"got {item!r}, expected a finite number")
        if allowed is not None and item not in allowed:
            raise InputError(key, f"got {item!r}, expected one of {allowed}")
        if spec.check is not None and item is not None and not spec.check.ok(item):
            raise InputError(key, f"got {item!r}, expected {spec.check.expect}")


# ----------------------------------------------------------------------------- sections

class Section:
    """Base of a frozen config section: every field is coerced and checked when it is made.

    Subclasses are ``@dataclass(frozen=True)`` with :func:`option` fields, may set ``PANEL`` (the
    ``--help`` panel of their options) and may override :meth:`check` for rules across fields.
    """

    PANEL: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = coerce(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)
            spec = spec_of(f)
            if spec is not None and value is not None:
                _check_value(f.name, value, spec)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields; raise InputError naming the field that is wrong."""


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Make section `cls` from a nested mapping; errors name the dotted key (``optim.lr``).

    Raises:
        InputError: an unknown key, a wrong type, a value out of range or not allowed.
    """
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{prefix}{unknown[0]}", f"unknown option, expected one of {sorted(known)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        kwargs[name] = build(tp, value, f"{prefix}{name}.") if is_section(tp) and isinstance(value, Mapping) \
            else value
    try:
        return cls(**kwargs)
    except InputError as err:
        if prefix and err.path is not None and err.path.split(".", 1)[0] in known and not err.path.startswith(prefix):
            raise InputError(f"{prefix}{err.path}", err.message, err.where) from None
        raise


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge nested mappings; `override` wins, and its ``None`` values mean "not given"."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Option:
    """One option found by :func:`walk`: where it sits and what it says."""

    path: tuple[str, ...]  # ("optim", "lr")
    field: dataclasses.Field
    type: Any
    spec: OptionSpec
    panel: str

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return dataclasses.MISSING

    @property
    def flag(self) -> str:
        return self.spec.flag or "--" + self.path[-1].replace("_", "-")

    @property
    def base_type(self) -> Any:
        """The type without Optional."""
        tp = self.type
        if typing.get_origin(tp) in (Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return tp


def walk(cls: type, prefix: tuple[str, ...] = (), panel: str = "") -> Iterator[Option]:
    """Every option of `cls` and its sections, depth first, in declaration order.

    Raises:
        TypeError: a field that is neither a section nor declared with :func:`option` (a bug).
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            yield from walk(tp, prefix + (f.name,), tp.PANEL or panel)
            continue
        spec = spec_of(f)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with lresnet.core.schema.option()")
        yield Option(prefix + (f.name,), f, tp, spec, spec.panel or cls.PANEL or panel)


def to_plain(section: Any) -> dict[str, Any]:
    """A section as plain nested data (tuples become lists): what ``config.json`` holds."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {f.name: (to_plain(getattr(section, f.name)) if isinstance(getattr(section, f.name), Section)
                     else plain(getattr(section, f.name)))
            for f in dataclasses.fields(section)}
