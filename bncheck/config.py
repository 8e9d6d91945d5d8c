"""Defaults from ``[tool.bncheck]`` in the nearest ``pyproject.toml`` above the working folder.

Only options that cannot weaken safety are read from there: ``trust-pickle`` is honoured from
the command line or the environment alone, because in CI a pull request controls this file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from bncheck.errors import InputError

# Keys a pyproject may set, with the type each must have.
KNOWN_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "fail-on": str,
    "select": list,
    "ignore": list,
    "device": str,
    "arch": str,
    "input-shape": list,
    "thresholds": dict,
    "task": str,  # what check's outputs are: classify | other
}
UNSAFE_KEYS = {"trust-pickle"}


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(start: Path | None = None) -> Config:
    """Read ``[tool.bncheck]`` from the first pyproject.toml at or above ``start`` (cwd)."""
    path = find_pyproject((start or Path.cwd()).resolve())
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read [tool.bncheck] ({exc})") from None
    section = data.get("tool", {}).get("bncheck", {})
    if not isinstance(section, dict):
        raise InputError(f"{path}: [tool.bncheck] must be a table")
    cfg = Config(source=path)
    for raw_key, value in section.items():
        key = raw_key.replace("_", "-")
        if key in UNSAFE_KEYS:
            cfg.warnings.append(
                f"{path}: ignoring '{raw_key}' in [tool.bncheck]: --trust-pickle is honoured "
                "from the command line or BNCHECK_TRUST_PICKLE only"
            )
            continue
        if key not in KNOWN_KEYS:
            raise InputError(f"{path}: unknown key '{raw_key}' in [tool.bncheck]")
        if not isinstance(value, KNOWN_KEYS[key]):
            raise InputError(f"{path}: [tool.bncheck] '{raw_key}' has the wrong type")
        cfg.values[key] = value
    return cfg
