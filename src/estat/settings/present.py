"""How settings are shown: loading with every problem reported at once,
the effective table (secrets masked by type), the raw table ``estat config``
shows when values do not validate, and the generated reference."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import (
    AliasChoices,
    BeforeValidator,
    SecretStr,
    ValidationError,
)

from estat.errors import ConfigError
from estat.settings.fields import INJECTED_ENV, Settings
from estat.settings.values import dotenv_vars


def env_name(field: str) -> str:
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return str(first)
    return field.upper()


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from the process environment and ``.env`` (or only
    from ``env`` when given); on bad values raise ``ConfigError`` naming every
    invalid variable (``ConfigError.problems``: variable → one line)."""
    token = INJECTED_ENV.set(dict(env)) if env is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems: dict[str, str] = {}
        for err in e.errors():
            name, line = _problem(err)
            problems.setdefault(name, line)
        lines = list(problems.values())
        text = lines[0] if len(lines) == 1 else "\n  ".join(["", *lines])
        raise ConfigError(f"invalid configuration: {text}", problems) from None
    finally:
        if token is not None:
            INJECTED_ENV.reset(token)


def _problem(err: Any) -> tuple[str, str]:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:
        # a check across variables: its message names them; its input is
        # every value (secrets too), never shown
        named = [w for w in re.findall(r"[A-Z][A-Z0-9_]+", msg) if w in _NAMES]
        return (named[0] if named else "configuration"), msg
    field = str(err["loc"][0])
    field = _ALIASES.get(field.upper(), field)
    name = env_name(field) if field in Settings.model_fields else field.upper()
    info = Settings.model_fields.get(field)
    extra = info.json_schema_extra if info is not None else None
    accepts = extra.get("accepts") if isinstance(extra, dict) else None
    raw = (INJECTED_ENV.get() or os.environ).get(name, err.get("input"))
    hint = f" (accepts {accepts})" if accepts else ""
    shown = "****" if name in SECRET_VARIABLES else repr(raw)
    return name, f"{name}={shown}: {msg}{hint}"


_ALIASES = {
    str(choice).upper(): name
    for name, info in Settings.model_fields.items()
    if isinstance(info.validation_alias, AliasChoices)
    for choice in info.validation_alias.choices
}

_NAMES = frozenset(env_name(f) for f in Settings.model_fields)

#: variables whose values are never printed (typed ``SecretStr``)
SECRET_VARIABLES = frozenset(
    env_name(f) for f, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)
)


def effective_config(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) pairs of the effective configuration, secrets masked."""
    rows: list[tuple[str, str]] = []
    for field in Settings.model_fields:
        name = env_name(field)
        value = getattr(settings, field)
        if field == "lake_dir":
            value = settings.lake_path
        elif field == "dlq_dir":
            value = settings.dlq_path
        if _is_duration(field) and isinstance(value, float):
            text = _fmt_seconds(value)
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, SecretStr):
            text = "****"
        else:
            text = "" if value is None else str(value)
        rows.append((name, text))
    return rows


def raw_config() -> list[tuple[str, str]]:
    """(variable, value) as set in the environment or ``.env`` (or the default),
    secrets masked: what ``estat config`` shows when the values do not validate."""
    dotenv = dotenv_vars()
    rows: list[tuple[str, str]] = []
    for field in Settings.model_fields:
        name = env_name(field)
        value = os.environ.get(name, dotenv.get(name))
        if value is None:
            text = "(default)"
        elif name in SECRET_VARIABLES:
            text = "****"
        else:
            text = value
        rows.append((name, text))
    return rows


#: read from the process environment only, by estat's commands or libraries
ENVIRONMENT_ONLY = ("ESTAT_ADMIN_URL", "ESTAT_ADMIN_TOKEN", "ESTAT_NATIVE", "AWS_")


def dotenv_notes(path: str = ".env") -> list[str]:
    """One line per variable in ``.env`` that estat does not read from it: a
    misspelt name (with the nearest estat variable), or one read from the
    process environment only (AWS credentials, the admin client's)."""
    import difflib

    known = {env_name(f) for f in Settings.model_fields} | set(_ALIASES)
    notes = []
    for name in dotenv_vars(path):
        if name in known:
            continue
        if name.startswith(ENVIRONMENT_ONLY):
            notes.append(f"{path}: {name} is read from the environment only: export it instead")
            continue
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        notes.append(f"{path}: {name} is not an estat variable and is ignored{hint}")
    return notes


def markdown_table() -> str:
    """The configuration reference, generated from the fields above."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `estat config --markdown`; do not edit by hand. -->",
        "",
        "estat reads its configuration from environment variables and from a `.env`",
        "file in the working directory (environment variables win). Durations accept",
        "`500ms`, `3s`, `2m`, `24h`, `1d` or a bare number of seconds. An invalid",
        "value stops start-up with one line naming the variable and what it accepts.",
        "`estat config` prints the effective configuration. A variable in `.env` that",
        "estat does not read from it is named at start with a warning: a misspelt one",
        "with the nearest variable below; AWS credentials (`AWS_ACCESS_KEY_ID`, …) and",
        "the admin client's `ESTAT_ADMIN_URL` / `ESTAT_ADMIN_TOKEN` are read from the",
        "process environment only.",
        "",
        "| variable | default | meaning | accepts |",
        "|---|---|---|---|",
    ]
    for field, info in Settings.model_fields.items():
        name = env_name(field)
        if info.default_factory is not None:
            default = "(generated)"
        elif info.default is None:
            default = "–"
        else:
            d = info.default
            default = _fmt_default(field, d)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        lines.append(
            f"| `{name}` | {default} | {info.description or ''} | {extra.get('accepts', '')} |"
        )
    return "\n".join(lines) + "\n"


def _is_duration(field: str) -> bool:
    return any(isinstance(m, BeforeValidator) for m in Settings.model_fields[field].metadata)


def _fmt_default(field: str, value: Any) -> str:
    if _is_duration(field) and isinstance(value, int | float):
        return f"`{_fmt_seconds(float(value))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _fmt_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
