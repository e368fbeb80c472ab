"""One typed spec per verb: the single statement of every option.

A spec is a frozen dataclass whose fields are the verb's options, each with one line of help
in its metadata. Everything else is derived from it: the Python API takes a spec (or the
keyword arguments that build one), the YAML recipe is its serialisation (:meth:`Spec.from_mapping`,
:meth:`Spec.to_mapping`), the CLI builds its options from the fields (``cli.py``), and every
report and output folder records the spec it was made from.

Values are coerced and checked on construction (:func:`coerce`): a wrong type or a non-finite
number is one :class:`LataError` line naming the option, whatever the source (CLI, API, YAML).
"""

from __future__ import annotations

import math
import os
import shlex
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from .errors import LataError, shorten

__all__ = ["Spec", "coerce", "option"]

S = TypeVar("S", bound="Spec")
def option(default: Any, help: str, *, flags: tuple[str, ...] = (), key: str | None = None, cli: bool = True,
           argument: bool = False, path: bool = False) -> Any:
    """A spec field: ``help`` is its one line of documentation; ``flags`` its CLI names (default
    ``--field-name``), ``key`` its YAML name (default the field name); ``cli=False`` keeps it off the
    CLI; ``path`` marks folders and files (made absolute in a recipe recorded beside an output)."""
    return field(default=default, metadata={"help": help, "flags": flags, "key": key, "cli": cli,
                                            "argument": argument, "path": path})


def flag_of(spec_field: Field[Any]) -> str:
    """The CLI name users see for a field (``--lambda`` for ``lam``)."""
    flags = spec_field.metadata.get("flags") or ()
    long = [f for f in flags if f.startswith("--")]
    return long[0] if long else "--" + spec_field.name.replace("_", "-")


def _expected(kind: Any) -> str:
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a finite number"
    if kind is str:
        return "a string"
    if kind is type(None):
        return "nothing (null)"
    origin, args = get_origin(kind), get_args(kind)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list of {len(args)} values"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    return getattr(kind, "__name__", str(kind))


def _scalar(value: Any, kind: Any) -> Any:
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if kind is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if kind is type(None) and value is None:
        return None
    raise TypeError


def _coerce(value: Any, kind: Any) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option_kind in sorted(args, key=lambda a: a is not type(None)):  # None first
            try:
                return _coerce(value, option_kind)
            except TypeError:
                continue
        raise TypeError
    if origin is tuple:
        if value is None and len(args) == 2 and args[1] is Ellipsis:
            return ()  # none given: an empty list
        if isinstance(value, (str, os.PathLike, int, float)) and len(args) == 2 and args[1] is Ellipsis:
            value = [value]  # one value where a list is expected: a list of one
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0]) for item in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_coerce(item, item_kind) for item, item_kind in zip(value, args, strict=True))
    return _scalar(value, kind)


def coerce(value: Any, kind: Any, name: str) -> Any:
    """``value`` as ``kind`` (lists become tuples, paths strings, ints floats where a float is
    wanted), or a :class:`LataError` ``"{name}: expected ..., got ..."``."""
    try:
        return _coerce(value, kind)
    except (TypeError, ValueError, OverflowError):
        raise LataError(f"{name}: expected {_expected(kind)}, got {shorten(value)}") from None


@dataclass(frozen=True)
class Spec:
    """Base of every verb's spec: coercion on construction, YAML in and out."""

    verb: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for spec_field in fields(self):
            value = coerce(getattr(self, spec_field.name), hints[spec_field.name], flag_of(spec_field))
            object.__setattr__(self, spec_field.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules of the verb; each failure is a :class:`LataError`."""

    @classmethod
    def keys(cls) -> dict[str, str]:
        """YAML key -> field name."""
        return {(f.metadata.get("key") or f.name): f.name for f in fields(cls)}

    @classmethod
    def from_mapping(cls: type[S], mapping: Any, source: str = "recipe") -> S:
        """A spec from a YAML mapping; unknown keys and bad values name ``source``."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, dict):
            raise LataError(f"{source}: the {cls.verb} entry must be a mapping of options, got {shorten(mapping)}")
        keys = cls.keys()
        unknown = sorted(shorten(k, 40) for k in mapping if k not in keys)
        if unknown:
            raise LataError(f"{source}: unknown {cls.verb} key(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(keys))}")
        try:
            return cls(**{keys[k]: v for k, v in mapping.items()})
        except LataError as exc:
            raise LataError(f"{source}: {exc}") from None

    def to_mapping(self, skip: tuple[str, ...] = (), absolute: bool = False) -> dict[str, Any]:
        """The YAML mapping of this spec (lists for tuples), without the fields named in ``skip``
        and without fields at their defaults, so recipes stay short. With ``absolute``, local
        paths are made absolute (hub ids stay), so the recipe runs from any folder."""
        mapping: dict[str, Any] = {}
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            default = spec_field.default if spec_field.default is not MISSING else None
            if spec_field.name in skip or value == default:
                continue
            if absolute and spec_field.metadata.get("path"):
                value = _absolute(value)
            mapping[spec_field.metadata.get("key") or spec_field.name] = _plain(value)
        return mapping

    def command_line(self, skip: tuple[str, ...] = (), absolute: bool = False) -> str:
        """The ``lata-peft`` command that makes this spec: its arguments, then a flag per field not at its
        default (repeated for lists); with ``absolute``, local paths made absolute as in a recipe."""
        words = ["lata-peft", self.verb]
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            default = spec_field.default if spec_field.default is not MISSING else None
            if spec_field.name in skip or not spec_field.metadata.get("cli", True) or value == default:
                continue
            if absolute and spec_field.metadata.get("path"):
                value = _absolute(value)
            flag = flag_of(spec_field)
            if spec_field.metadata.get("argument"):
                words += [str(v) for v in (value if isinstance(value, tuple) else (value,))]
            elif isinstance(value, bool):
                words.append(flag if value else "--no-" + flag.removeprefix("--"))
            elif isinstance(value, tuple) and isinstance(default, tuple):  # repeatable: --weight 1 --weight 0.5
                for item in value:
                    words += [flag, str(item)]
            elif isinstance(value, tuple):  # a fixed pair: --instruction-from BASE INSTRUCT
                words += [flag, *map(str, value)]
            else:
                words += [flag, str(value)]
        return shlex.join(words)

    def record(self) -> dict[str, Any]:
        """Every field under its YAML key (defaults included): what a report records."""
        return {(f.metadata.get("key") or f.name): _plain(getattr(self, f.name)) for f in fields(self)}


def _absolute(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_absolute(v) for v in value)
    if isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(os.path.expanduser(value))
    return value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
