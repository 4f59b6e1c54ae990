"""Command-line flags generated from a configuration dataclass.

One field, one flag: ``--field-name`` with the field's type, its default and the help text of its
``Attributes:`` entry in the class docstring. Adding a field to the dataclass adds the flag, so the
command line cannot drift from the configuration. Supported field types: ``str``, ``int``,
``float``, ``bool`` (``--flag`` / ``--no-flag``), ``Optional[...]`` of those (the word ``none``
gives ``None``) and sequences (comma-separated values).
"""

import argparse
import collections.abc
import dataclasses
import re
import typing
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type


def attribute_help(cls: type) -> Dict[str, str]:
    """Field name -> help text, parsed from the ``Attributes:`` section of ``cls.__doc__``.

    Entries like ``a, b: text`` document several fields at once.
    """
    doc = cls.__doc__ or ""
    match = re.search(r"^\s*Attributes:\s*$", doc, flags=re.MULTILINE)
    if not match:
        return {}
    lines = doc[match.end() :].splitlines()
    entries: Dict[str, str] = {}
    current: List[str] = []
    indent = None
    for line in lines:
        if not line.strip():
            continue
        spaces = len(line) - len(line.lstrip())
        if indent is None:
            indent = spaces
        if spaces < indent:
            break
        head = re.match(r"^([\w, ]+):\s*(.*)$", line.strip())
        if spaces == indent and head:
            current = [n.strip() for n in head.group(1).split(",")]
            for name in current:
                entries[name] = head.group(2)
        elif current:
            for name in current:
                entries[name] += " " + line.strip()

    def clean(text: str) -> str:
        text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)  # Sphinx roles
        return re.sub(r"``([^`]*)``", r"\1", text).replace("%", "%%")

    return {k: clean(v) for k, v in entries.items()}


def _unwrap_optional(tp) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_parser(tp, name: str, optional: bool):
    base = {str: str, int: int, float: float}.get(tp)
    if base is None:
        raise TypeError(f"field {name!r}: unsupported type {tp!r} for a command-line flag")

    def parse(text: str):
        if optional and text.strip().lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            kind = "an integer" if base is int else "a number" if base is float else "text"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None

    parse.__name__ = base.__name__
    return parse


def _sequence_parser(tp, name: str):
    args = typing.get_args(tp)
    item = args[0] if args else str
    item_parse = _scalar_parser(item, name, optional=False)

    def parse(text: str):
        values = [v.strip() for v in text.split(",") if v.strip()]
        return tuple(item_parse(v) for v in values)

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}s"
    return parse


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: Type,
    exclude: Iterable[str] = (),
    defaults: Optional[Dict[str, Any]] = None,
    choices: Optional[Dict[str, Sequence[Any]]] = None,
) -> List[str]:
    """Add one flag per field of dataclass ``cls``.

    Args:
        parser: The parser (or argument group) to add to.
        cls: A dataclass whose docstring has an ``Attributes:`` section.
        exclude: Fields without a flag.
        defaults: Defaults that differ from the dataclass's (e.g. per sub-command).
        choices: Allowed values per field (checked by argparse with a clear message).

    Returns:
        The field names that got a flag (pass them to :func:`dataclass_from_args`).
    """
    hints = typing.get_type_hints(cls)
    helps = attribute_help(cls)
    defaults = defaults or {}
    choices = choices or {}
    names = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            raise TypeError(f"field {f.name!r} has no default; give one in defaults")
        tp, optional = _unwrap_optional(hints[f.name])
        text = helps.get(f.name, "")
        kwargs: Dict[str, Any] = {"dest": f.name, "default": default, "help": text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list, collections.abc.Sequence) or tp in (
            tuple,
            list,
        ):
            kwargs["type"] = _sequence_parser(tp, f.name)
            if isinstance(default, (tuple, list)):
                # A string default goes through ``type`` too, and help shows it as typed.
                kwargs["default"] = ",".join(
                    f"{v:g}" if isinstance(v, float) else str(v) for v in default
                )
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = _scalar_parser(tp, f.name, optional)
            if f.name in choices:
                kwargs["choices"] = list(choices[f.name])
        parser.add_argument(flag, **kwargs)
        names.append(f.name)
    return names


def dataclass_from_args(cls: Type, args: argparse.Namespace, names: Iterable[str], **extra):
    """Build ``cls`` from the parsed flags ``names`` (plus ``extra`` keyword values)."""
    values = {name: getattr(args, name) for name in names}
    values.update(extra)
    return cls(**values)


__all__ = ["add_dataclass_arguments", "attribute_help", "dataclass_from_args"]
