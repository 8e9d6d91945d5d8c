"""SARIF 2.1.0 for an ``InspectRun``, in the subset GitHub code scanning reads.

One run, its tool named bncheck with every rule (id, name, short and full description, help,
default level); one result per finding, located at the model file (a uri relative to the
working folder, under ``%SRCROOT%``) and the BN layer (a logical location). A model file has
no lines, so the region is line 1 (GitHub places an alert only with a start line), and each
result carries its own fingerprint (rule, file, layer): GitHub would otherwise hash line 1 of
a binary file to tell alerts apart. Models that could not be read are tool execution
notifications (level error) and mark the invocation unsuccessful; skipped ones are notes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bncheck import __version__
from bncheck.api import InspectRun
from bncheck.layers import Finding, Severity

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
INFO_URI = "https://pypi.org/project/bncheck/"


def artifact_uri(path: str | os.PathLike[str], root: Path) -> tuple[str, bool]:
    """``path`` as a uri: relative to ``root`` (True) when inside it, else an absolute file
    uri (False). Relative uris are percent-encoded posix paths."""
    absolute = Path(os.path.abspath(path))
    try:
        return quote(absolute.relative_to(Path(os.path.abspath(root))).as_posix()), True
    except ValueError:
        return absolute.as_uri(), False


def _location(path: str, root: Path, layer: str | None = None) -> dict[str, Any]:
    uri, inside = artifact_uri(path, root)
    artifact: dict[str, Any] = {"uri": uri}
    if inside:
        artifact["uriBaseId"] = "%SRCROOT%"
    loc: dict[str, Any] = {
        "physicalLocation": {"artifactLocation": artifact, "region": {"startLine": 1}}
    }
    if layer is not None:
        loc["logicalLocations"] = [{"name": layer, "fullyQualifiedName": layer, "kind": "module"}]
    return loc


def rule_descriptors() -> list[dict[str, Any]]:
    from bncheck.rules import all_rules

    out = []
    for code, r in all_rules().items():
        out.append(
            {
                "id": code,
                "name": r.name,
                "shortDescription": {"text": r.summary},
                "fullDescription": {"text": r.doc or r.summary},
                "help": {"text": f"Fix: {r.hint}", "markdown": f"**Fix:** {r.hint}"},
                "helpUri": f"{INFO_URI}#rules",
                "defaultConfiguration": {"level": LEVEL[r.severity]},
                "properties": {"tags": ["batchnorm", r.severity.value]},
            }
        )
    return out


def _fingerprint(code: str, uri: str, layer: str | None) -> str:
    return hashlib.sha256(f"{code}\0{uri}\0{layer or ''}".encode()).hexdigest()[:32]


def _result(f: Finding, path: str, root: Path, index: dict[str, int]) -> dict[str, Any]:
    loc = _location(path, root, f.layer)
    uri = loc["physicalLocation"]["artifactLocation"]["uri"]
    where = f"{f.layer}: " if f.layer else ""
    res: dict[str, Any] = {
        "ruleId": f.code,
        "level": LEVEL[f.severity],
        "message": {"text": f"{where}{f.message}. Fix: {f.hint}"},
        "locations": [loc],
        "partialFingerprints": {"primaryLocationLineHash": _fingerprint(f.code, uri, f.layer)},
    }
    if f.code in index:  # BN4xx and any future code outside the table stay valid without it
        res["ruleIndex"] = index[f.code]
    return res


def to_sarif(run: InspectRun, *, root: Path | None = None) -> str:
    """The SARIF 2.1.0 log of ``run``; uris are relative to ``root`` (the working folder)."""
    base = root or Path.cwd()
    rules = rule_descriptors()
    index = {r["id"]: i for i, r in enumerate(rules)}
    results = [
        _result(f, e.path, base, index) for e in run.entries if e.result for f in e.result.findings
    ]
    notes = [
        {
            "level": "error" if e.error is not None else "note",
            "message": {"text": e.error if e.error is not None else f"skipped: {e.skipped}"},
            "locations": [_location(e.path, base)],
        }
        for e in run.entries
        if e.result is None
    ]
    root_uri = Path(os.path.abspath(base)).as_uri().rstrip("/") + "/"
    doc = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "bncheck",
                        "version": __version__,
                        "semanticVersion": __version__,
                        "informationUri": INFO_URI,
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": root_uri}},
                "invocations": [
                    {
                        "executionSuccessful": not run.errors,
                        "toolExecutionNotifications": notes,
                    }
                ],
                "results": results,
            }
        ],
    }
    return json.dumps(doc, indent=2)
