"""The base of every settings group: :class:`Settings` and :func:`option`, the field that
carries its command-line flag, flat config key and form (``visaudit.flows.options`` builds
``visaudit run``'s options from them)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


def option(default: Any = None, description: str = "", *, flag: str | None = None, key: str | None = None,
           form: str | None = None, **constraints: Any) -> Any:
    """A settings field with its command-line ``flag`` (default: the field name with dashes),
    its flat ``key`` in configs (default: the field name) and its ``form`` on the command line:
    ``"comma"`` (a comma-separated list), ``"repeat"`` (a repeatable option), ``"pairs"``
    (repeatable NAME=VALUE), ``"switch:--on/--off"`` (a boolean with two spellings)."""
    extra = {name: value for name, value in (("flag", flag), ("key", key), ("form", form)) if value}
    factory = {"default_factory": list} if default == [] else {"default_factory": dict} if default == {} else {}
    return Field(**({"default": default} if not factory else factory), description=description,
                 json_schema_extra=extra or None, **constraints)


def split_list(value: Any) -> Any:
    """A comma-separated string as a list (configs and the command line write lists that way)."""
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class Settings(BaseModel):
    """A settings group: unknown keys are errors; ``title`` heads its options in ``--help``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    title: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _flat_names(cls, data: Any) -> Any:
        """Keys may be the fields' flat names (``classes`` for ``classes_file``, ``occlusion_grid``...)."""
        if not isinstance(data, dict):
            return data
        names = {flat: field for field in cls.model_fields for flat in flat_names(cls, field)}
        return {key if key in cls.model_fields else names.get(key.replace("-", "_"), key): value
                for key, value in data.items()}


def flat_names(group: type[Settings], field: str) -> set[str]:
    """The flat names a group's field answers to: its key (default: the field's name) and its
    flag (dashes as underscores)."""
    extra = group.model_fields[field].json_schema_extra or {}
    assert isinstance(extra, dict)
    key = str(extra.get("key", field))
    return {key, str(extra.get("flag", key)).replace("-", "_")}
