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
- A field declared with ``choices`` is checked against them when the config is built (``Config.__post_init__``;
  a subclass with its own checks calls ``super().__post_init__()``), and its flag gets the same choices.
- :class:`Sourced` is an option's value with where it came from (a flag, a config file, a recipe, a
  checkpoint, a default); the training planner (:mod:`capdec.train.plan`) resolves options from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from dataclasses import MISSING, asdict, fields
from typing import Any, TypeVar

from capdec.errors import InputError

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="Config")


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, choices: Any = None,
           flag: str | None = None, cli: bool = True, metavar: str | None = None, repr: bool = True) -> Any:
    """A config field with its help text (and how it appears on the command line)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag, "cli": cli,
            "metavar": metavar}
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
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise InputError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any] | None, *, strict: bool = False, where: str = "") -> C:
        """Build from a dict; unknown keys are refused (``strict``) or logged and ignored."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            what = f"{where}: " if where else ""
            if strict:
                raise InputError(f"{what}unknown {cls.__name__} option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
            logger.warning("%signoring unknown %s fields (written by another capdec version?): %s",
                           what, cls.__name__, ", ".join(unknown))
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def help(cls, name: str) -> str:
        return next(f for f in fields(cls) if f.name == name).metadata.get("help", "")  # type: ignore[arg-type]

    @classmethod
    def default(cls, name: str) -> Any:
        f = next(f for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        return f.default_factory() if f.default_factory is not MISSING else f.default


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
