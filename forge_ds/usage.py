"""`forge-ds [COMMAND] --help`, generated: for train/check/prepare from the typed description (options.RunOptions,
config.Config: names, allowed values, defaults, descriptions), for the other commands from their signatures and
docstrings. Printed to stdout, in aligned columns.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from forge_ds.config import DataConfig, ModelConfig, TrainingConfig

_SECTIONS = (("model", ModelConfig), ("training", TrainingConfig), ("data", DataConfig))
_CONFIG_HEADING = "config fields, as dotted flags (defaults < --config file < these flags):\n"
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def allowed_values(annotation: Any, field: Optional[FieldInfo] = None) -> str:
    """What a flag accepts, in words: `a|b|c`, `true|false`, `int ≥ 1`, `float > 0, or unset`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Union:
        inner = [a for a in args if a is not type(None)]
        text = " | ".join(allowed_values(a, field) for a in inner)
        return f"{text}, or unset" if type(None) in args else text
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(a) for a in args)
    if annotation is bool:
        return "true|false"
    name = getattr(annotation, "__name__", str(annotation))
    bounds = []
    for meta in (field.metadata if field is not None else []):
        for attr, symbol in _BOUNDS:
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{symbol} {getattr(meta, attr)}")
    if annotation is float and field is not None and any(getattr(m, "allow_inf_nan", True) is False
                                                         for m in field.metadata):
        bounds.insert(0, "finite")
    return " ".join([name, *bounds]) if annotation in (int, float) else ("text" if annotation is str else name)


def _rows_of(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    return [(f"--{prefix}{name}", allowed_values(f.annotation, f), f"default {f.default!r}", f.description or "")
            for name, f in model.model_fields.items()]


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip()
                      for row in rows)


def _split_doc(fn: Callable) -> tuple[str, dict[str, str]]:
    """A command's docstring as (summary, {flag: description}); descriptions come from a `Flags:` section of
    `name: text` lines (a line without a colon continues the one above)."""
    summary, _, section = (inspect.getdoc(fn) or "").partition("\nFlags:\n")
    described: dict[str, str] = {}
    last = None
    for line in section.splitlines():
        name, colon, text = line.strip().partition(": ")
        if colon and " " not in name:
            last, described[name] = name, text
        elif last:
            described[last] += " " + line.strip()
    return summary.strip(), described


def _signature_rows(fn: Callable) -> list[tuple[str, str, str, str]]:
    rows = []
    hints = typing.get_type_hints(fn)
    described = _split_doc(fn)[1]
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is p.VAR_KEYWORD or name == "local_rank":
            continue
        about = described.get(name, "")
        if p.default is p.empty:
            rows.append((name.upper(), allowed_values(hints.get(name, str)), "required", about))
        else:
            rows.append((f"--{name}", allowed_values(hints.get(name, str)), f"default {p.default!r}", about))
    return rows


def _config_rows() -> list[tuple[str, str, str, str]]:
    return [row for section, model in _SECTIONS for row in _rows_of(model, f"{section}.")]


def command_help(command: Optional[str], commands: dict[str, Callable],
                 typed: dict[str, tuple[Optional[type[BaseModel]], bool]]) -> str:
    if command is None:
        rows = [(name, " ".join((inspect.getdoc(fn) or "").split()).split(". ")[0].split(": ")[0])
                for name, fn in commands.items()]
        return "usage: forge-ds COMMAND [flags]   (forge-ds COMMAND --help for its flags)\n\ncommands:\n" + _table(rows)
    fn = commands[command]
    doc = _split_doc(fn)[0]
    if command not in typed:
        rows = _signature_rows(fn)
        positional = " ".join(r[0] for r in rows if r[2] == "required")
        text = " ".join(filter(None, ["usage: forge-ds", command, positional, "[flags]"])) + f"\n\n{doc}\n"
        extra = [r for r in rows if r[2] != "required"]
        text += "\nflags:\n" + _table(extra) if extra else ""
        if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
            text += "\n\n" + _CONFIG_HEADING + _table(_config_rows())
        return text
    options_type, with_config = typed[command]
    text = f"usage: forge-ds {command} [flags] [--section.field=value ...]\n\n{doc}\n"
    if options_type is not None:
        rows = _rows_of(options_type, "")
        rows.append(("--local_rank", "int", "default None", "accepted from the deepspeed launcher (the environment "
                                                          "wins)"))
        text += "\nrun options (not part of the saved config):\n" + _table(rows) + "\n"
    else:
        text += "\n  --config  a YAML/JSON config file, a preset (modularforge, cpu_demo) or ModularForge's YAML\n"
    if with_config:
        text += "\n" + _CONFIG_HEADING + _table(_config_rows())
    return text
