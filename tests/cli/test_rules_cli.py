"""``bncheck rules`` and ``bncheck explain`` in text, json and markdown."""

from __future__ import annotations

import json

from conftest import assert_clean_error

from bncheck.rules import all_rules


def test_rules_json_lists_every_rule_with_its_text(run_cli):
    r = run_cli("rules", "--format", "json")
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert doc["schema"] == "bncheck.rules/1"
    rules = all_rules()
    assert [x["code"] for x in doc["rules"]] == list(rules)
    for x in doc["rules"]:
        rule = rules[x["code"]]
        assert (x["name"], x["severity"], x["hint"]) == (rule.name, rule.severity.value, rule.hint)
        assert x["description"] == rule.doc and x["summary"] == rule.summary


def test_rules_markdown_is_one_table_row_per_rule(run_cli):
    r = run_cli("rules", "--format", "markdown")
    assert r.code == 0
    rows = [line for line in r.out.splitlines() if line.startswith("| BN")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(all_rules())
    assert r.out.splitlines()[1] == "|---|---|---|---|---|"


def test_explain_formats(run_cli):
    rule = all_rules()["BN101"]
    doc = json.loads(run_cli("explain", "bn101", "--format", "json").out)
    assert doc["schema"] == "bncheck.explain/1"
    assert (doc["code"], doc["severity"], doc["description"]) == ("BN101", "error", rule.doc)
    md = run_cli("explain", "BN101", "--format", "markdown")
    assert md.code == 0
    assert md.out.startswith(f"### BN101: {rule.name}\n")
    assert f"**Fix:** {rule.hint}" in md.out
    text = run_cli("explain", "BN101")
    assert text.out.startswith(f"BN101 ({rule.name}, error)")


def test_bad_format_and_code_are_clean_errors(run_cli):
    assert_clean_error(run_cli("rules", "--format", "sarif"), "--format 'sarif'")
    assert_clean_error(run_cli("explain", "BN101", "--format", "xml"), "--format 'xml'")
    assert_clean_error(run_cli("explain", "BN999", "--format", "json"), "BN999")
