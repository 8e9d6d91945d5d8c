"""Render the rule table (``bncheck rules``, schema ``bncheck.rules/1``) and one rule
(``bncheck explain``, schema ``bncheck.explain/1``) as json or markdown, for docs and dashboards."""

from __future__ import annotations

from typing import Any

from bncheck.report import dump_json, md_escape
from bncheck.rules import Rule


def rule_dict(r: Rule) -> dict[str, Any]:
    return {
        "code": r.code,
        "name": r.name,
        "severity": r.severity.value,
        "summary": r.summary,
        "description": r.doc,
        "hint": r.hint,
    }


def rules_json(rules: list[Rule]) -> str:
    return dump_json("bncheck.rules/1", {"rules": [rule_dict(r) for r in rules]})


def rules_markdown(rules: list[Rule]) -> str:
    lines = ["| code | name | severity | summary | fix |", "|---|---|---|---|---|"]
    for r in rules:
        lines.append(
            f"| {r.code} | {md_escape(r.name)} | {r.severity.value} | "
            f"{md_escape(r.summary)} | {md_escape(r.hint)} |"
        )
    return "\n".join(lines)


def explain_json(r: Rule) -> str:
    return dump_json("bncheck.explain/1", rule_dict(r))


def explain_markdown(r: Rule) -> str:
    return "\n".join(
        [
            f"### {r.code}: {r.name}",
            "",
            f"Severity: **{r.severity.value}**",
            "",
            r.doc or r.summary,
            "",
            f"**Fix:** {r.hint}",
            "",
        ]
    )
