"""Command-line options generated from configuration dataclasses: one source of names, types, defaults and help.

A field's help comes from ``field(metadata=option("help", ...))`` or, failing that, from the ``Attributes:`` section
of the dataclass's Google-style docstring. ``--device`` options everywhere offer the same choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""What every ``--device`` option accepts (``auto``: CUDA when present, else CPU)."""

C = TypeVar("C")


def option(
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    required: bool = False,
    device: bool = False,
    choices: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Field metadata describing the field's command-line option.

    Args:
        help: one line saying what the option does.
        flag: the option's name when it differs from ``--field-name``.
        metavar: placeholder shown in the usage line.
        required: the option must be given (the field has no usable default).
        device: a device option (``auto``, ``cpu``, ``cuda``).
        choices: allowed values.
    """
    return {
        "cli": {
            "help": help,
            "flag": flag,
            "metavar": metavar,
            "required": required,
            "choices": tuple(DEVICE_CHOICES if device else choices or ()) or None,
        }
    }


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (``None``, ``False``, required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.required
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "%(default)" in text
        ):
            return text
        return text + " (default: %(default)s)"


def _docstring_attributes(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Attributes:`` section of a Google-style class docstring."""
    doc = cls.__doc__ or ""
    match = re.search(r"^\s*Attributes:\s*$(.*?)(?:^\s*$|\Z)", doc, flags=re.M | re.S)
    if not match:
        return {}
    out: dict[str, str] = {}
    name = ""
    for line in match.group(1).splitlines():
        entry = re.match(r"^\s{4,8}(\w+):\s*(.*)$", line)
        if entry:
            name = entry.group(1)
            out[name] = entry.group(2).strip()
        elif name and line.strip():
            out[name] += " " + line.strip()
    return {k: v.rstrip(".") for k, v in out.items()}


def _value_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_options(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one option per field of the dataclass ``cls`` (or of the fields in ``only``) to ``parser``.

    Args:
        parser: a parser or argument group.
        only: restrict to these fields, in this order.
        skip: fields left out (set by the command itself).
        defaults: command-specific defaults that replace the dataclass's.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = _docstring_attributes(cls)
    names = list(only) if only is not None else list(fields)
    for name in names:
        if name in skip:
            continue
        f = fields[name]
        meta = dict(f.metadata.get("cli", {}))
        help_text = meta.get("help") or docs.get(name)
        if not help_text:
            raise ValueError(f"{cls.__name__}.{name} has no help text; add option(...) metadata or a docstring entry")
        default = (defaults or {}).get(name, f.default if f.default is not dataclasses.MISSING else None)
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "default": default}
        value_type = _value_type(hints[name])
        if value_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = value_type
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if meta.get("choices") or name == "device":
                kwargs["choices"] = meta.get("choices") or DEVICE_CHOICES
        if meta.get("required"):
            kwargs["required"] = True
            kwargs.pop("default")
        parser.add_argument(flag, **kwargs)


def from_options(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """An instance of the dataclass ``cls`` from parsed options (fields not on the command line keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**{**values, **overrides})
