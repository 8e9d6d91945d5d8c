"""Defaults from ``[tool.bncheck]`` in the nearest ``pyproject.toml`` above the working folder.

Only options that cannot weaken safety are read from there: ``trust-pickle`` is honoured from
the command line or the environment alone, because in CI a pull request controls this file.
For the same reason the data itself is never read from there: a data hook
(``--data pkg.module:function``) imports code, so it is named on the command line only;
``[tool.bncheck.data]`` holds image preprocessing alone (it changes numbers, never runs code).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncheck.errors import InputError

# Keys a pyproject may set, with the type each must have.
KNOWN_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "fail-on": str,
    "select": list,
    "ignore": list,
    "device": str,
    "arch": (str, dict),  # one factory, or {"glob" = "pkg.mod:factory"} per model path
    "input-shape": list,
    "thresholds": dict,
    "data": dict,
    "include": list,  # globs: which files a folder walk keeps (inspect over folders)
    "exclude": list,  # globs: files and folders a run leaves out
    "task": str,  # what check's outputs are: classify | other
}
# Keys whose lists / tables must hold strings only.
STRING_ITEMS = {"select", "ignore", "include", "exclude", "arch"}
UNSAFE_KEYS = {"trust-pickle"}
# [tool.bncheck.data]: image preprocessing, the defaults of the options of the same names.
DATA_KEYS: dict[str, type | tuple[type, ...]] = {
    "resize": int,
    "crop": (int, list, str),
    "mean": (list, str),
    "std": (list, str),
    "scale": (int, float),
    "channel-order": str,
    "layout": str,
}
# Keys that would name the data, and so perhaps a hook that runs code: command line only.
DATA_SOURCE_KEYS = {"data", "source", "path", "hook", "kwargs", "data-kwargs"}


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def root(self) -> Path:
        """The folder config globs are relative to: the pyproject's, else the working one."""
        return self.source.parent if self.source is not None else Path.cwd()


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
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read [tool.bncheck] ({exc})") from None
    if b"bncheck" not in raw:
        return Config()  # no table of ours: the project's TOML is not ours to parse (or judge)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
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
        if key == "data":
            value = _data_table(path, value, cfg.warnings)
        if not isinstance(value, KNOWN_KEYS[key]):
            raise InputError(f"{path}: [tool.bncheck] '{raw_key}' has the wrong type")
        items = value.values() if isinstance(value, dict) else value
        if (
            key in STRING_ITEMS
            and isinstance(value, list | dict)
            and not all(isinstance(v, str) for v in items)
        ):
            raise InputError(f"{path}: [tool.bncheck] '{raw_key}' must hold strings only")
        cfg.values[key] = value
    return cfg


def _data_table(path: Path, table: Any, warnings: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise InputError(
            f"{path}: [tool.bncheck] 'data' must be the table [tool.bncheck.data] of image "
            "options; the data itself is named with --data on the command line"
        )
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key in DATA_SOURCE_KEYS:
            warnings.append(
                f"{path}: ignoring '{raw_key}' in [tool.bncheck.data]: the data (a file, or a "
                "hook that runs code) is named with --data on the command line only"
            )
            continue
        if key not in DATA_KEYS:
            known = ", ".join(DATA_KEYS)
            raise InputError(
                f"{path}: unknown key '{raw_key}' in [tool.bncheck.data] (known: {known})"
            )
        if isinstance(value, bool) or not isinstance(value, DATA_KEYS[key]):
            raise InputError(f"{path}: [tool.bncheck.data] '{raw_key}' has the wrong type")
        out[key] = value
    return out
