"""JUnit XML for an ``InspectRun``, shaped as pytest writes it (xunit2), for the test-report
views of GitLab, Jenkins and others.

One ``testsuite`` per command run, one ``testcase`` per model (classname ``bncheck.inspect``,
name the model's path). A model with findings at or above ``--fail-on`` has one ``failure``
listing them (a testcase holds at most one failure in the JUnit schema Jenkins uses); a model
that could not be read has an ``error``; a skipped one a ``skipped``. Findings below the
threshold go to ``system-out``, so nothing is lost.
"""

from __future__ import annotations

import datetime as _dt
import re
import xml.etree.ElementTree as ET

from bncheck.api import InspectRun, ModelEntry
from bncheck.layers import Finding
from bncheck.report import inspect_run

# Characters XML 1.0 cannot hold at all (a layer name in a crafted model may have them).
_NOT_XML = re.compile(r"[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def _line(f: Finding) -> str:
    return f"{f.severity.value} {f.code} {f.layer or 'model'}: {f.message}. Fix: {f.hint}"


def _testcase(e: ModelEntry, fail_on: str, command: str) -> ET.Element:
    name = _xml(e.path)
    case = ET.Element(
        "testcase", {"classname": f"bncheck.{command}", "name": name, "time": f"{e.seconds:.3f}"}
    )
    if e.error is not None:
        text = _xml(e.error)
        ET.SubElement(case, "error", {"message": text, "type": "unreadable"}).text = text
        return case
    if e.skipped is not None:
        text = _xml(e.skipped)
        ET.SubElement(case, "skipped", {"message": text, "type": "skipped"}).text = text
        return case
    assert e.result is not None
    failing = inspect_run.failing(e.result.findings, fail_on)
    if failing:
        codes = sorted({f.code for f in failing})
        n = len(failing)
        message = f"{n} finding{'' if n == 1 else 's'} at or above {fail_on}: {', '.join(codes)}"
        failure = ET.SubElement(case, "failure", {"message": message, "type": codes[0]})
        failure.text = _xml("\n".join(_line(f) for f in failing))
    rest = [f for f in e.result.findings if not any(f is g for g in failing)]
    if rest:
        ET.SubElement(case, "system-out").text = _xml("\n".join(_line(f) for f in rest))
    return case


def to_junit(run: InspectRun, fail_on: str, *, command: str = "inspect") -> str:
    """The JUnit XML document of ``run`` judged at ``fail_on``."""
    cases = [_testcase(e, fail_on, command) for e in run.entries]
    counts = {
        "errors": sum(1 for c in cases if c.find("error") is not None),
        "failures": sum(1 for c in cases if c.find("failure") is not None),
        "skipped": sum(1 for c in cases if c.find("skipped") is not None),
        "tests": len(cases),
    }
    seconds = f"{sum(e.seconds for e in run.entries):.3f}"
    attrs = {k: str(v) for k, v in counts.items()}
    suites = ET.Element("testsuites", {"name": "bncheck", **attrs, "time": seconds})
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            "name": f"bncheck {command}",
            **attrs,
            "time": seconds,
            "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        },
    )
    suite.extend(cases)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode")
