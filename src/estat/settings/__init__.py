"""One frozen ``Settings`` object, built once from the environment.

Variable names and defaults are the collector's contract (upper case, no
prefix). A ``.env`` file in the working directory is read too; real
environment variables win. ``docs/configuration.md`` is generated from the
fields (``estat config --markdown``) and a test keeps it current.

``fields.py`` declares the fields, ``values.py`` their value types and
parsers, ``present.py`` loading, masking and the generated tables.
"""

from estat.settings.fields import Settings
from estat.settings.present import (
    SECRET_VARIABLES,
    dotenv_notes,
    effective_config,
    env_name,
    load_settings,
    markdown_table,
    raw_config,
)
from estat.settings.values import Duration, parse_addr, parse_duration

__all__ = [
    "SECRET_VARIABLES",
    "Duration",
    "Settings",
    "dotenv_notes",
    "effective_config",
    "env_name",
    "load_settings",
    "markdown_table",
    "parse_addr",
    "parse_duration",
    "raw_config",
]
