"""Command-line settings for every script: argparse built from the script's dataclass fields, each
value read as its field's type by parse_value (an int as int(), so not 1e4; a float finite; a bool
true / false / 1 / 0, a bare --flag true; a tuple comma-separated; none or null for X | None), the
same way in every script; --help says what each means (field_help). --config FILE.json sets any of
them ({"rope": {"type": "yarn"}} or {"rope.type": "yarn"}); flags win over it. cli() runs a main and
turns the project's errors into `error: ...` and exit code 2.
"""

import argparse
import difflib
import json
import math
import re
import sys
import types
import typing
from dataclasses import MISSING, fields, is_dataclass

from system import read_json

TRUE, FALSE, NONE = ("true", "1"), ("false", "0"), ("none", "null")
ERRORS = {
    ValueError: 2,
    OSError: 2,
}  # bad input of any kind: a flag, a file, a checkpoint, the data


def field_types(cls) -> dict[str, object]:
    """{field name: its type} of a dataclass, with string annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def unwrap_optional(typ) -> tuple[object, bool]:
    """(X, True) for `X | None`, (X, False) for X."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {typ}")
        return args[0], True
    return typ, False


def type_name(typ) -> str:
    """'int', 'float or none', 'float list', ...: the type as the errors and --help say it."""
    base, optional = unwrap_optional(typ)
    name = (
        f"{typing.get_args(base)[0].__name__} list"
        if typing.get_origin(base) is tuple
        else base.__name__
    )
    return name + (" or none" if optional else "")


def parse_value(key: str, raw: str, typ) -> object:
    """The text of flag --key as a value of type typ; a ValueError naming the flag and the type
    otherwise."""
    base, optional = unwrap_optional(typ)
    text = raw.strip()
    if optional and text.lower() in NONE:
        return None
    name = type_name(typ)
    expected = f"--{key} expects {'an' if name[0] in 'aeiou' else 'a'} {name}"
    if typing.get_origin(base) is tuple:
        element = typing.get_args(base)[0]
        try:
            return (
                tuple(parse_value(key, part, element) for part in text.split(",")) if text else ()
            )
        except ValueError:
            raise ValueError(f"{expected} (comma-separated), got {raw!r}") from None
    if base is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ValueError(f"{expected} (true/false), got {raw!r}")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{expected}, got {raw!r}{int_hint(text)}") from None
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
    raise TypeError(
        f"no parser for field type {typ}"
    )  # a new field of an unhandled type: a programming error


def int_hint(text: str) -> str:
    """'; write it as 10000' for 1e4 or 10000.0, else ''."""
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return ""
    return f"; write it as {int(number)}" if math.isfinite(number) and number.is_integer() else ""


def check_types(obj) -> None:
    """Each field of a dataclass instance holds a value of its declared type: an int where a float
    is declared becomes that float, a bool is never taken for a number; a ValueError naming the
    field otherwise."""
    for name, typ in field_types(type(obj)).items():
        base, optional = unwrap_optional(typ)
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if base is float and type(value) is int and abs(value) < 2**1023:
            value = float(value)
            object.__setattr__(obj, name, value)  # frozen dataclasses too
        ok = isinstance(value, typing.get_origin(base) or base) and (
            base is bool or not isinstance(value, bool)
        )
        if not ok or (base is float and not math.isfinite(value)):
            raise ValueError(f"--{name} must be {type_name(typ)}, got {value!r}")


# Parsing a command line
def flag_table(*groups) -> dict[str, tuple[object, object, str]]:
    """{flag key: (type, default, what it means)} for groups of (dataclass, prefix); a field holding
    a dataclass is left out (it comes as its own group, e.g. (RopeConfig, "rope."))."""
    table = {}
    for cls, prefix in groups:
        meanings = field_help(cls)  # what each field means: the table in the class's docstring
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if not is_dataclass(default):
                table[prefix + f.name] = (
                    field_types(cls)[f.name],
                    default,
                    meanings.get(f.name, ""),
                )
    return table


def field_help(cls) -> dict[str, str]:
    """{field: what it means}, from the table in the class's docstring: a row per field, its name,
    two or more spaces, the meaning, which may go on in lines indented past the name. Text written
    for --help, so that wrapping a comment changes nothing."""
    names, meanings, row = {f.name for f in fields(cls)}, {}, None
    for line in (cls.__doc__ or "").splitlines():
        start = re.match(r"(\s*)(\w+)\s{2,}(\S.*)", line)
        if start and start[2] in names:
            row, indent = start[2], len(start[1])
            meanings[row] = start[3].strip()
        elif row and line.strip() and len(line) - len(line.lstrip()) > indent:
            meanings[row] += " " + line.strip()
        else:
            row = None
    return meanings


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise ValueError, so cli() reports them like every other bad input."""

    def error(self, message):
        raise ValueError(message)


def parse(argv, table: dict, prog: str, description: str = "") -> dict[str, object]:
    """{key: typed value} of the settings given, from --config FILE.json and then the flags; absent
    keys absent."""
    parser = Parser(
        prog=prog,
        usage=f"{prog} [--key=value ...]",
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for key, (typ, default, meaning) in table.items():
        bare = (
            {"nargs": "?", "const": "true"} if unwrap_optional(typ)[0] is bool else {}
        )  # a bare --flag is true
        given = "required" if default is MISSING else f"default {default!r}"
        parser.add_argument(
            f"--{key}",
            dest=key,
            default=argparse.SUPPRESS,
            **bare,
            metavar=type_name(typ).upper().replace(" ", "_"),
            help=f"{meaning} ({given})".strip().replace("%", "%%"),
        )
    parser.add_argument(
        "--config", metavar="FILE.json", help="a JSON object of any of these; flags override it"
    )
    given, rest = parser.parse_known_args([str(a) for a in argv])
    if rest:
        raise unknown_flag(rest[0], table)
    given = vars(given)
    path = given.pop("config", None)
    values = read_config(path, table) if path is not None else {}
    for key, text in given.items():
        if not isinstance(
            text, str
        ):  # `--key=--` reaches here as [] (argparse's option terminator)
            raise ValueError(f"--{key} needs a value, got '--'")
        values[key] = parse_value(key, text, table[key][0])
    return values


def unknown_flag(arg: str, table: dict) -> ValueError:
    if not arg.startswith("--") or arg == "--":
        return ValueError(f"unexpected argument {arg!r}: settings look like --key=value")
    key = arg[2:].partition("=")[0]
    if key.split(".")[0] in {k.split(".")[0] for k in table if "." in k} and "." not in key:
        return ValueError(
            f"unknown option --{key}; settings of a group are --{key}.<field>, e.g. --{key}.type"
        )
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; --help lists them"
    )
    return ValueError(f"unknown option --{key}{hint}")


def read_config(path: str, table: dict) -> dict[str, object]:
    """Typed values from a JSON object of settings; a ValueError naming the file and the problem
    otherwise."""
    source = f"--config {path}"
    fix = 'give a JSON object of settings, e.g. {"lr": 3e-4, "rope": {"type": "yarn"}}'
    obj = read_json(path, fix, {}, source, limit=10_000_000)
    flat = {}
    for key, value in obj.items():
        group = isinstance(value, dict) and any(k.startswith(f"{key}.") for k in table)
        flat.update({f"{key}.{k}": v for k, v in value.items()} if group else {key: value})
    values = {}
    for key, value in flat.items():
        if key not in table:
            raise ValueError(f"{source}: {unknown_flag('--' + key, table)}")
        values[key] = parse_value(key, json_text(key, value, table[key][0], source), table[key][0])
    return values


def json_text(key: str, value, typ, source: str) -> str:
    """A JSON value written as a flag's text, so that parse_value reads both the same way."""
    listed = typing.get_origin(unwrap_optional(typ)[0]) is tuple
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if isinstance(value, dict) or isinstance(value, list) != listed or (listed and not numbers):
        raise ValueError(f"{source}: {key} must be {type_name(typ)}, got {json.dumps(value)[:60]}")
    if isinstance(value, list):
        return ",".join(repr(v) for v in value)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "none"}[value]
    return repr(value) if isinstance(value, float) else str(value)


def cli(main, argv=None, errors=ERRORS) -> int:
    """Run main(argv) as a script: the errors listed (type -> exit code) become `error: message`
    on stderr and that exit code, never a traceback; SystemExit (--help, a signal) gives its own
    code."""
    try:
        main(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:
        code = next((c for kind, c in errors.items() if isinstance(e, kind)), None)
        if code is None:
            raise  # a bug, not bad input: the traceback is what its fixer needs
        print(f"error: {e}", file=sys.stderr)
        return code
    return 0


def build(cls, values: dict):
    """cls(**values), with a ValueError naming the required fields not given."""
    missing = [
        f"--{f.name}"
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values
    ]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    return cls(**values)
