"""The config base: dataclasses that know their own help, read and write dicts, and make CLI flags.

(The pipeline's configs themselves are in :mod:`capdec.configs`; this module is what they derive from.)
Every config (the pipeline's are in :mod:`capdec.configs`: ``ModelConfig``, ``TrainConfig``,
``NoiseConfig``, ``InferenceConfig``, ``MemoryConfig``, ``DecodeConfig``) is a dataclass deriving
from :class:`Config`, with fields declared by :func:`option`::

    @dataclass
    class TrainConfig(Config):
        batch_size: int = option(64, "captions per step")

- ``to_dict()`` / ``from_dict(d)``: one policy for keys a config does not know. Reading an artefact
  (a checkpoint's ``config.json``, a memory's ``meta.json``) *warns and ignores* them: an older or
  newer capdec wrote it. A file the user gave (``capdec train --config``) is read with
  ``strict=True``: an unknown key is a typo, refused with the known names.
- :func:`add_arguments` turns fields into ``argparse`` flags: the flag name (``--batch-size``), type,
  choices and default come from the field, the help from its ``help``, so a new option is one line
  and a default cannot drift between the library and the CLI. A field with ``cli=False`` gets no flag;
  ``flag=`` renames it (``NoiseConfig.variance`` is ``--noise-variance``).
- Every field is checked when the config is built (``Config.__post_init__``; a subclass with its own checks
  calls ``super().__post_init__()`` first): its value must have the field's type (``int`` takes no bool, float
  or string; ``float`` takes finite numbers only; ``list[float]`` a list of them; ``X | None`` also None), be
  one of its ``choices`` and lie within its ``bounds`` (``option(10, "...", bounds=(1, 1024))``: inclusive,
  either end may be None). A config read from an artefact (a checkpoint from the Hub is untrusted input) is
  so bounded before anything is allocated from it. The flag gets the same choices.
- :class:`Sourced` is an option's value with where it came from (a flag, a config file, a recipe, a
  checkpoint, a default); the training planner (:mod:`capdec.train.plan`) resolves options from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import numbers
import reprlib
import types
import typing
from dataclasses import MISSING, asdict, fields
from typing import Any, TypeVar

from capdec.errors import InputError

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="Config")


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, choices: Any = None,
           bounds: tuple[Any, Any] | None = None, flag: str | None = None, cli: bool = True,
           metavar: str | None = None, repr: bool = True) -> Any:
    """A config field with its help text (and how it appears on the command line).

    ``bounds=(low, high)``: the allowed range of a number, both ends included (None: open).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag, "cli": cli,
            "metavar": metavar, "bounds": bounds}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta, repr=repr)
    return dataclasses.field(default=default, metadata=meta, repr=repr)


@dataclasses.dataclass(frozen=True)
class Sourced:
    """An option's value and where it came from ("flag", "config file", "recipe", "checkpoint", "default", ...).

    ``str()`` is the value's, so a parser default marked this way shows in ``--help`` as the plain value.
    """

    value: Any
    source: str

    def __str__(self) -> str:
        return str(self.value)


class Config:
    """Base of capdec's config dataclasses (see the module docstring)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            wrong = type_error(value, field_type(type(self), f.name))
            if wrong:
                raise InputError(f"{f.name} must be {wrong}, got {short_repr(value)}", options=(f.name,))
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise InputError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}",
                                 options=(f.name,))
            low, high = f.metadata.get("bounds") or (None, None)
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                raise InputError(f"{f.name} must be {describe_bounds(low, high)}, got {value}", options=(f.name,))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any] | None, *, strict: bool = False, where: str = "") -> C:
        """Build from a dict; unknown keys are refused (``strict``) or logged and ignored."""
        what = f"{where}: " if where else ""
        if d is not None and not isinstance(d, dict):
            raise InputError(f"{what}expected an object of {cls.__name__} options, got {short_repr(d)}")
        d = dict(d or {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            if strict:
                raise InputError(f"{what}unknown {cls.__name__} option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
            logger.warning("%signoring unknown %s fields (written by another capdec version?): %s",
                           what, cls.__name__, ", ".join(unknown))
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except InputError as e:
            raise InputError(f"{what}{e}", options=e.options) from e

    @classmethod
    def help(cls, name: str) -> str:
        return next(f for f in fields(cls) if f.name == name).metadata.get("help", "")  # type: ignore[arg-type]

    @classmethod
    def default(cls, name: str) -> Any:
        f = next(f for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        return f.default_factory() if f.default_factory is not MISSING else f.default


@functools.cache
def field_type(cls: type, name: str) -> Any:
    """The type of field ``name`` of dataclass ``cls`` (annotations are strings under __future__.annotations)."""
    annotation = next(f for f in fields(cls) if f.name == name).type
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing, "Any": Any}, {})  # builtin names, typing and Any only
    return annotation


def type_error(value: Any, kind: Any) -> str | None:
    """What ``value`` should have been to be a ``kind`` ("an integer", ...), or None when it is one.

    JSON's types: an ``int`` is no bool, float or string; a ``float`` is any finite number (not a bool);
    ``list[X]`` is a list (or tuple) of X; ``dict[...]`` an object; ``X | None`` also None.
    """
    if kind is Any:
        return None
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in args:
            return None
        wrongs = [type_error(value, a) for a in args if a is not type(None)]
        return None if None in wrongs else " or ".join(w for w in wrongs if w) + (
            " (or null)" if type(None) in args else "")
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if origin is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if origin is str:
        return None if isinstance(value, str) else "a string"
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return "a list"
        inner = args[0] if args else Any
        for item in value:
            wrong = type_error(item, inner)
            if wrong:
                return f"a list, each item {wrong}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "an object (a dict)"
    return None if isinstance(value, origin) else f"a {origin.__name__}"


def describe_bounds(low: Any, high: Any) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    return f"≥ {low}" if low is not None else f"≤ {high}"


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3


def short_repr(value: Any) -> str:
    """A value for a message: at most a line, whatever the value (long strings and deep lists are cut)."""
    return _REPR.repr(value)


def _base_type(annotation: Any) -> Any:
    """int | None -> int; bool -> bool; str -> str (annotations are strings under __future__.annotations)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # only builtin names appear in our configs
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return annotation


def flag_name(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def option_name(f: dataclasses.Field) -> str:
    """The field's option name: its flag's argparse dest (``noise_variance`` for ``NoiseConfig.variance``)."""
    return (f.metadata.get("flag") or f.name).replace("-", "_")


def add_arguments(group: Any, cls: type[Config], names: list[str] | None = None, *, unset_default: bool = False,
                  overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """Add a flag for each CLI field of ``cls`` (``names``: these, in this order).

    A ``bool | None`` field defaulting to None ("decide later") becomes ``--flag / --no-flag``.
    ``unset_default=True`` makes every default None ("not given": the caller then keeps the config's
    own default, or another source's such as a checkpoint's); the help then says the config default.
    ``overrides`` maps a field name to extra ``add_argument`` keywords (e.g. a different default).
    """
    by_name = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for name in names if names is not None else [f.name for f in fields(cls)]:  # type: ignore[arg-type]
        f = by_name[name]
        if not f.metadata.get("cli", True):
            continue
        default = cls.default(name)
        kind = _base_type(f.type)
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"help": help_text}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if kind is bool:
            if unset_default or default is None:  # --flag / --no-flag; not given: None
                kwargs.update(action=argparse.BooleanOptionalAction, default=None)
                if default is not None:
                    kwargs["help"] = f"{help_text} (default: {'on' if default else 'off'})"
            else:
                kwargs.update(action="store_true", default=False)
        else:
            if kind in (int, float):
                kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
            kwargs["default"] = None if unset_default else default
            if unset_default and default is not None and "default" not in help_text:
                kwargs["help"] = f"{help_text} (default: {default})"
        kwargs.update((overrides or {}).get(name, {}))
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %
        group.add_argument(flag_name(f), **kwargs)


def given(args: argparse.Namespace, cls: type[Config], names: list[str] | None = None) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given (not None) in ``args``, by field name."""
    out = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if names is not None and f.name not in names:
            continue
        value = getattr(args, option_name(f), None)
        if value is not None:
            out[f.name] = value
    return out
