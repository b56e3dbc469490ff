"""
Typed `--key=value` flags: a flag's text read as a value of the dataclass field it sets.

train.py (every field of RunConfig, ModelConfig and RopeConfig), sample.py and eval.py (the --rope.<field>
overrides) all read their typed settings through parse_value, so a value means the same in each and a bad
one fails the same way: a ValueError naming the flag and the type it expects.

    int         Python's int(): 512, -3, 1_000; not 1e4 (the error suggests 10000)
    float       a finite number: 3e-4, 8, 1e3; not nan or inf
    bool        true / false or 1 / 0, in any case
    str         the text as given
    X | None    none or null (in any case) for None, else as X

Surrounding whitespace is ignored except in a str, which is kept exactly.
"""

import math
import types
import typing
from dataclasses import fields

TRUE, FALSE, NONE = ("true", "1"), ("false", "0"), ("none", "null")


def field_types(cls) -> dict[str, object]:
    """{field name: its type} of a dataclass, with string annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def unwrap_optional(typ) -> tuple[type, bool]:
    """(X, True) for `X | None`, (X, False) for X."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {typ}")
        return args[0], True
    return typ, False


def type_name(typ) -> str:
    """'int', 'float or none', ...: the type as the error messages and --help say it."""
    base, optional = unwrap_optional(typ)
    return base.__name__ + (" or none" if optional else "")


def parse_value(key: str, raw: str, typ) -> object:
    """The text of flag --key as a value of type typ; a ValueError naming the flag and the type otherwise."""
    base, optional = unwrap_optional(typ)
    text = raw.strip()
    expected = f"--{key} expects {'an' if base is int else 'a'} {type_name(typ)}"
    if optional and text.lower() in NONE:
        return None
    if base is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ValueError(f"{expected} (true/false), got {raw!r}")
    if base is int:
        try:
            return int(text)
        except ValueError:
            pass
        hint = ""
        try:  # 1e4 or 512.0: say how to write it
            as_float = float(text)
            if math.isfinite(as_float) and as_float.is_integer() and abs(as_float) < 2**63:
                hint = f"; write it as {int(as_float)}"
        except (ValueError, OverflowError):
            pass
        raise ValueError(f"{expected}, got {raw!r}{hint}")
    if base is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{expected} (e.g. 3e-4), got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"--{key} must be a finite number, got {raw!r}")
        return value
    if base is str:
        return raw
    raise TypeError(f"no parser for field type {typ}")  # a new field of an unhandled type: a programming error
