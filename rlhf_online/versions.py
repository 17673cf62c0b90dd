"""Adapter version names and their order: the one place that says what a version name is and which is newer.

A published version is named `v` plus at least four digits (`v0001`, ..., `v9999`, `v10000`); the untrained
model is `base`, version 0, older than every published version. Names compare by number, never as strings:
as strings "v10000" < "v9999", which would make the win rates, auto-rollback and the reward-hacking alarm treat
v9999 as the newer version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BASE_VERSION = "base"
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")


def version_name(number: int) -> str:
    return f"v{number:04d}"


def is_version_name(name: str) -> bool:
    """Whether `name` names a published version (a folder under `adapters/`); `base` does not."""
    return bool(VERSION_PATTERN.match(name))


def version_number(name: str) -> int:
    """'base' is version 0, so it sorts before every published version."""
    if name == BASE_VERSION:
        return 0
    match = VERSION_PATTERN.match(name)
    if not match:
        raise ValueError(f"not a version name: {name!r}")
    return int(match.group(1))


def version_order(name: str) -> tuple[int, str]:
    """A sort key for names read back from stored data: numeric order, and a name that is not a version (a hand
    edit, an older format) sorts before the base by its text instead of breaking a view over the data."""
    try:
        return version_number(name), ""
    except ValueError:
        return -1, str(name)


def sorted_versions(names: Iterable[str]) -> list[str]:
    """Oldest first."""
    return sorted(names, key=version_order)
