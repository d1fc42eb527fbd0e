"""Command-line options generated from the request's settings classes.

Each settings field (``visaudit.tasks.audit.request``) becomes one option, with the field's
description as its help, its ``flag`` as its name, its default, and its group's title as the
``--help`` panel; ``run`` takes every group, ``explain`` the model's. :func:`with_options`
gives a command function the generated signature (Typer reads ``__signature__``), and
:func:`request_values` turns the parsed options back into the request's flat keys.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape
from typer.core import DEFAULT_MARKUP_MODE

from visaudit.tasks.audit.request import GROUPS, AuditRequest
from visaudit.tasks.audit.settings import Settings


def _help(text: str | None) -> str:
    """A field's description as option help: escaped where Typer reads help as Rich markup
    (it would swallow "[timm]" in "pip install 'visaudit[timm]'"), as written where it does not."""
    return escape(text or "") if DEFAULT_MARKUP_MODE == "rich" else text or ""


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def flag_of(info: FieldInfo, name: str) -> str:
    """The option a field is set with, e.g. ``--impression-iterations``."""
    extra = _extra(info)
    return "--" + str(extra.get("flag", extra.get("key", name))).replace("_", "-")


def _optional(annotation: Any) -> Any:
    """``int | None`` as ``Optional[int]`` (the spelling Typer reads)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return Optional[args[0]]
    return annotation


def option_parameter(info: FieldInfo, name: str, panel: str) -> inspect.Parameter:
    """One field as a keyword parameter annotated with its ``typer.Option``."""
    flag = flag_of(info, name)
    form = str(_extra(info).get("form", ""))
    default = info.get_default(call_default_factory=True)
    annotation = _optional(info.annotation)
    names: tuple[str, ...] = (flag,)
    if form.startswith("switch:"):
        names, annotation = (form.removeprefix("switch:"),), annotation
    elif form == "comma":
        annotation, default = str, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    elif form in ("repeat", "pairs"):
        annotation, default = list[str], []
    if flag == "--out":
        names = ("--out", "-o")
    meta = typer.Option(*names, help=_help(info.description), rich_help_panel=panel, show_default=form != "pairs")
    return inspect.Parameter(flag[2:].replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, meta])


def group_parameters(group: type[Settings], skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """Every field of a settings group as an option, in the group's panel."""
    return [option_parameter(info, name, group.title) for name, info in group.model_fields.items() if name not in skip]


def request_parameters(source_required: bool = True) -> list[inspect.Parameter]:
    """The options of ``visaudit run``: the request's own fields, then every group's (``serve``
    takes them with SOURCE optional: a ``--config`` file can give it instead)."""
    own = AuditRequest.model_fields
    source = inspect.Parameter(
        "source", inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=inspect.Parameter.empty if source_required else None,
        annotation=Annotated[str if source_required else Optional[str],
                             typer.Argument(help=_help(own["source"].description), show_default=False)])
    top = [option_parameter(own[name], name, "Run") for name in ("out_dir", "run_id", "series", "thresholds")]
    return [source, *top, *(p for group in GROUPS.values() for p in group_parameters(group))]


def with_options(parameters: list[inspect.Parameter]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the generated ``parameters`` after its own (Typer reads ``__signature__``)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        arguments = [p for p in [*parameters, *own] if p.default is inspect.Parameter.empty]
        options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*parameters, *own]
                   if p.default is not inspect.Parameter.empty]
        command.__signature__ = inspect.Signature([*arguments, *options])  # type: ignore[attr-defined]
        return command

    return decorate


def parse_pairs(flag: str, items: list[str], number: bool = False) -> dict[str, Any]:
    """Repeated ``NAME=VALUE`` options as a dict; VALUE as JSON (numbers, lists such as
    ``[0.8, 1.2]``), else as text; ``number`` requires a number. A ValueError names the item."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE, e.g. {flag} "
                             + ("confident_error_confidence=0.95" if number else "lr=0.1"))
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value.strip()
        if number and (isinstance(out[name.strip()], bool) or not isinstance(out[name.strip()], (int, float))):
            raise ValueError(f"{flag} {item!r}: {value!r} is not a number")
    return out


def request_values(values: dict[str, Any]) -> dict[str, Any]:
    """Parsed ``run`` options as the request's flat keys (NAME=VALUE options as dicts)."""
    out = dict(values)
    out["threshold"] = parse_pairs("--threshold", out.pop("threshold", []), number=True)
    out["impression_option"] = parse_pairs("--impression-option", out.pop("impression_option", []))
    return out


def validation_message(exc: ValidationError, model: type[BaseModel] = AuditRequest) -> str:
    """A pydantic error as '--flag: what is wrong', naming the option the user typed."""
    parts = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        owner: type[BaseModel] = model
        for part in loc[:-1]:
            annotation = owner.model_fields[part].annotation if part in owner.model_fields else None
            owner = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else owner
        name = loc[-1] if loc else ""
        info = owner.model_fields.get(name)
        where = flag_of(info, name) if info is not None else "--" + ".".join(loc).replace("_", "-")
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
