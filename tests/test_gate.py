"""The release gate's policy: severities and kinds, metric floors and ceilings, unmeasured
numbers, bad policy files (one line, exit 2, before any audit)."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.audit.gate import GatePolicy, judge, load_policy
from visaudit.tasks.audit.request import AuditRequest


def findings(*rows: tuple[str, str, str | None]) -> pd.DataFrame:
    return pd.DataFrame([dict(kind=k, severity=s, class_name=c, slice=None) for k, s, c in rows],
                        columns=["kind", "severity", "class_name", "slice"])


def predictions(groups: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """``groups``: background value -> (right, wrong) images, all of class 'cat'."""
    rows = []
    for value, (right, wrong) in groups.items():
        for ok in [True] * right + [False] * wrong:
            rows.append(dict(labels=["cat"], predicted=["cat" if ok else "dog"], top_classes=["cat", "dog"],
                             correct=ok, confidence=0.9, error=None, attributes=[("background", value)]))
    return pd.DataFrame(rows)


PREDICTIONS = predictions({"blue": (18, 2), "grey": (6, 4)})  # 24/30 right; grey 60% over 10 images


def test_severity_and_kind_rules() -> None:
    found = findings(("slice_gap", "medium", None), ("confused_pair", "high", "cat"))
    assert not judge(GatePolicy(fail_on="high"), found, PREDICTIONS, False).passed
    outcome = judge(GatePolicy(fail_on="high", kinds=["slice_gap"]), found, PREDICTIONS, False)
    assert outcome.passed and outcome.summary == "release gate passed (fail on high findings of kind slice_gap)"
    medium = judge(GatePolicy(fail_on="medium"), found, PREDICTIONS, False)
    assert medium.reasons == ["2 medium or higher findings (slice_gap, confused_pair on cat)"]
    assert judge(GatePolicy(fail_on="high"), findings(), PREDICTIONS, False).passed


def test_floors_ceilings_and_worst_group() -> None:
    policy = GatePolicy(floors={"accuracy": 0.9, "worst_group": 0.7}, ceilings={"ece": 0.5})
    outcome = judge(policy, findings(), PREDICTIONS, False)
    assert outcome.measured["accuracy"] == pytest.approx(24 / 30)
    assert outcome.reasons == ["accuracy 0.800 < 0.9", "worst_group 0.600 (background=grey) < 0.7"]
    assert outcome.summary.startswith("release gate FAILED: accuracy 0.800 < 0.9; worst_group")
    small = judge(GatePolicy(floors={"worst_group": 0.7}, min_group_images=11), findings(), PREDICTIONS, False)
    assert small.passed and small.worst_group_name == "background=blue", "grey's 10 images are too few"
    assert small.measured["worst_group"] == pytest.approx(0.9)


def test_an_unmeasured_bound_fails() -> None:
    no_groups = PREDICTIONS.assign(attributes=[[]] * len(PREDICTIONS))
    outcome = judge(GatePolicy(floors={"worst_group": 0.5}), findings(), no_groups, False)
    assert outcome.reasons == ["worst_group not measured in this run (bound 0.5)"]


def test_policy_file_and_fail_on_override(tmp_path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('fail_on = "medium"\nkinds = ["slice_gap"]\n[floors]\naccuracy = 0.9\n')
    request = AuditRequest(source="x", policy=str(path), fail_on="high")
    policy = request.gate.gate_policy()
    assert policy is not None and (policy.fail_on, policy.kinds, policy.floors) == ("high", ["slice_gap"],
                                                                                    {"accuracy": 0.9})
    assert AuditRequest(source="x").gate.gate_policy() is None


@pytest.mark.parametrize(("text", "message"), [
    ("[floors]\nprecision = 0.9\n", "unknown metric(s) ['precision']"),
    ('kinds = ["made_up"]\n', "unknown finding kind(s) ['made_up']"),
    ("fail_on = high\n", "cannot read the policy"),
])
def test_bad_policy_is_one_line_before_the_audit(tmp_path, text, message) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="policy.toml"):
        load_policy(path)
    result = CliRunner().invoke(app, ["run", str(tmp_path), "--arch", "resnet18", "--policy", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
