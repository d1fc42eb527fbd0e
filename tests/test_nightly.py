"""A nightly series against a real local Prefect server: artifacts, events, the release gate and
`visaudit compare`, on models whose predictions are known by construction.

The models are the tiny test network with hand-set weights that classify the coloured squares
of ``make_shapes`` by colour: ``A`` is blind to blue (its blue images are called green), ``B``
reads red as green. So from A to B every red image breaks, every blue one is fixed and the
green ones stay right with the same Grad-CAM (B's green row adds a red channel that is zero on
green images). Run 3 is A again after the red images' files were repainted green: the same
series (same weights, same source), red accuracy falls from 1 to 0.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, make_shapes
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.data.storage import read_table

COUNTS = {"red": 9, "green": 6, "blue": 4}
runner = CliRunner()


def colour_weights(rows: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Weights for TINY_MODEL: conv1 computes relu(R-G), relu(G-R), relu(B-G) of the raw pixels
    (undoing the ImageNet normalisation), conv2 passes them through, and logit c sums the
    feature channels ``rows[c]``."""
    namespace: dict = {}
    exec(TINY_MODEL, namespace)
    state = {k: torch.zeros_like(v) for k, v in namespace["build"](3).state_dict().items()}
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for k, (plus, minus) in enumerate([(0, 1), (1, 0), (2, 1)]):  # pixel = x * std + mean, per channel
        state["0.weight"][k, plus, 1, 1], state["0.weight"][k, minus, 1, 1] = std[plus], -std[minus]
        state["0.bias"][k] = mean[plus] - mean[minus]
    for k in range(3):
        state["2.weight"][k, k, 1, 1] = 1.0
    for c, name in enumerate(sorted(rows)):  # the run's class order: the sorted labels
        for k in rows[name]:
            state["6.weight"][c, k] = 50.0
    return state


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("nightly")
    manifest = make_shapes(root / "data", COUNTS, size=32)
    (root / "net.py").write_text(TINY_MODEL)
    for name, rows in {"a": {"red": [0], "green": [1], "blue": []},
                       "b": {"red": [], "green": [0, 1], "blue": [2]}}.items():
        torch.save(colour_weights(rows), root / f"{name}.pt")
    policy = root / "policy.toml"
    policy.write_text('fail_on = "high"\n[floors]\naccuracy = 0.9\n')
    out = root / "out"

    def audit(weights: str, *extra: str):
        result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model", f"{root / 'net.py'}:build",
                                     "--weights", str(root / weights), "--crop", "32", "--resize", "32", "--no-pdf",
                                     "--no-sanity-check", "--no-setup-checks", "-q", *extra])
        return result

    with prefect_test_harness(server_startup_timeout=120):
        results = {"a": audit("a.pt"), "b": audit("b.pt", "--policy", str(policy))}
        runs = sorted(read_table(out, "predictions")["run_id"].unique())
        compared = runner.invoke(app, ["compare", runs[0], runs[1], "--out", str(out)])
        for path in sorted((root / "data" / "red").glob("*.png")):  # the night the red images came out green
            pixels = np.asarray(Image.open(path).convert("RGB")).copy()
            pixels[(pixels == (220, 40, 40)).all(axis=2)] = (40, 200, 60)
            Image.fromarray(pixels).save(path)
        results["drift"] = audit("a.pt", "--fail-on", "low", "--drop-margin", "0.1")
        runs = sorted(read_table(out, "predictions")["run_id"].unique())
        yield dict(out=out, results=results, runs=runs, compared=compared, server=_read_back(runs))


def _read_back(runs: list[str]) -> dict:
    """The artifacts and visaudit events the server holds (events are persisted asynchronously)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
    from prefect.events.filters import EventFilter, EventNameFilter

    async def read() -> dict:
        async with get_client() as client:
            deadline, events = time.monotonic() + 30, []
            while time.monotonic() < deadline:
                page = await client.read_events(EventFilter(event=EventNameFilter(prefix=["visaudit."])), limit=50)
                events = list(page.events)
                while page.next_page:
                    page = await client.read_events_page(page.next_page)
                    events += page.events
                if sum(e.event == "visaudit.audit.completed" for e in events) == len(runs):
                    break
                await asyncio.sleep(0.5)
            # every body field given: this server version refuses the client's nulls (422)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="visaudit-")),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
                limit=200)
            flow_runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, limit=200)
        return dict(events=events, artifacts=artifacts, flow_runs={str(r.id): r for r in flow_runs})

    return asyncio.run(read())


def test_release_gate_exits_3_with_one_line_after_writing_everything(nightly) -> None:
    out, (run_a, run_b, run_drift) = nightly["out"], nightly["runs"]
    assert nightly["results"]["a"].exit_code == 0, nightly["results"]["a"].output
    gated = nightly["results"]["b"]
    assert gated.exit_code == 3, gated.output
    accuracy = (COUNTS["green"] + COUNTS["blue"]) / sum(COUNTS.values())  # B breaks every red image
    line = gated.output.strip().splitlines()[-1]
    assert line.startswith("release gate FAILED: ") and f"accuracy {accuracy:.3f} < 0.9" in line, line
    assert len(read_table(out, "predictions", run_b)) == sum(COUNTS.values()), "tables written before the gate"
    cover = (out / "runs" / run_b / "report.html").read_text()
    assert "Release gate FAILED" in cover and "accuracy &gt;= 0.9" in cover, "the outcome is on the cover"
    drift = nightly["results"]["drift"]
    findings = read_table(out, "findings", run_drift)
    assert (drift.exit_code == 3) == (len(findings) > 0), drift.output  # --fail-on low: any finding fails
    assert "release gate" not in (out / "runs" / run_a / "report.html").read_text().lower()
    failed = [r for r in nightly["server"]["flow_runs"].values() if r.state and r.state.is_failed()]
    assert any(line.removeprefix("release gate FAILED: ") in (r.state.message or "") for r in failed), \
        "in Prefect the flow run ends FAILED with the reason"


def test_compare_counts_flips_and_tests_them(nightly) -> None:
    out, (run_a, run_b, _) = nightly["out"], nightly["runs"]
    assert nightly["compared"].exit_code == 0, nightly["compared"].output
    table = read_table(out, "comparisons")
    assert set(table["run_id"]) == {f"{run_a}_vs_{run_b}"}
    flips = table[table["section"] == "flip"]
    labels = flips.groupby("status")["class_name"].agg(set).to_dict()
    assert flips["status"].value_counts().to_dict() == {"broken": COUNTS["red"], "fixed": COUNTS["blue"]}
    assert labels == {"broken": {"red"}, "fixed": {"blue"}}
    overall = table[(table["section"] == "accuracy") & table["class_name"].isna()].iloc[0]
    expected = stats.binomtest(COUNTS["blue"], COUNTS["red"] + COUNTS["blue"], 0.5).pvalue  # 13 discordant: exact
    assert overall["p_value"] == pytest.approx(expected, rel=1e-12) and overall["detail"] == "exact binomial"
    total = sum(COUNTS.values())
    assert overall["change"] == pytest.approx((COUNTS["blue"] - COUNTS["red"]) / total)
    assert overall["low"] < overall["change"] < overall["high"]
    per_class = table[(table["section"] == "accuracy") & table["class_name"].notna()].set_index("class_name")
    assert per_class["change"].to_dict() == {"blue": 1.0, "green": 0.0, "red": -1.0}
    assert per_class.loc["red", "high"] < 0 < per_class.loc["blue", "low"], "intervals exclude zero on 9 and 4 flips"
    shifts = table[table["section"] == "explanation"]
    assert len(shifts) == COUNTS["green"] and np.allclose(shifts["value"], 1.0), "same green maps in A and B"
    folder = out / "comparisons" / f"{run_a}_vs_{run_b}"
    html = (folder / "compare.html").read_text()
    assert "9 images right in A, wrong in B" in html and "4 images wrong in A, right in B" in html
    assert len(re.findall(r'data-image-id="', html)) == COUNTS["red"] + COUNTS["blue"]
    assert (folder / "compare.pdf").read_bytes()[:4] == b"%PDF"
    assert all((folder / src).is_file() for src in re.findall(r'<img src="([^"]+)"', html))


def test_artifacts_are_readable_through_prefects_client(nightly) -> None:
    from visaudit.flows.artifacts import artifact_keys
    from visaudit.tasks.audit.series import run_headline

    out, (run_a, _, run_drift) = nightly["out"], nightly["runs"]
    series, _ = run_headline(read_table(out, "metrics"), run_a)
    keys = artifact_keys(series)
    artifacts = [a for a in nightly["server"]["artifacts"] if a.key in keys.values()]
    by_key = {key: [a for a in artifacts if a.key == key] for key in keys.values()}
    assert all(len(items) == 2 for items in by_key.values()), "two runs of the series, history kept per key"
    summaries = sorted(by_key[keys["summary"]], key=lambda a: a.created)
    latest = summaries[-1].data
    assert f"change since {run_a}" in latest and f"# visaudit audit {run_drift}" in latest
    assert "| accuracy | 31.6% | -47.4 pp |" in latest  # 6 of 19 right after the red images went green (15 before)
    table = sorted(by_key[keys["findings"]], key=lambda a: a.created)[-1].data
    rows = pd.DataFrame(json.loads(table))
    findings = read_table(out, "findings", run_drift)
    assert len(rows) == len(findings) and sorted(rows["kind"]) == sorted(findings["kind"])
    link = sorted(by_key[keys["report"]], key=lambda a: a.created)[-1].data
    target = re.fullmatch(rf"\[report\.html of {run_drift}\]\((file://\S+)\)", link)
    assert target and target.group(1) == (out / "runs" / run_drift / "report.html").resolve().as_uri()


def test_events_name_the_new_findings_and_the_drop(nightly) -> None:
    out, (run_a, run_b, run_drift) = nightly["out"], nightly["runs"]
    events = nightly["server"]["events"]
    completed = {e.payload["run_id"]: e for e in events if e.event == "visaudit.audit.completed"}
    assert set(completed) == {run_a, run_b, run_drift}
    assert completed[run_drift].payload["previous_run"] == run_a and completed[run_b].payload["previous_run"] is None
    assert completed[run_drift].payload["headline"]["accuracy"] == pytest.approx(6 / 19)
    assert completed[run_drift].resource.id == completed[run_a].resource.id != completed[run_b].resource.id
    drops = {e.payload["class_name"]: e.payload for e in events
             if e.event == "visaudit.metric.dropped" and e.payload["run_id"] == run_drift}
    assert set(drops) == {None, "red"}, "overall and red fell; green and blue did not"
    assert drops["red"]["before"] == 1.0 and drops["red"]["after"] == 0.0 and drops["red"]["high"] < 0
    assert not [e for e in events if e.event == "visaudit.metric.dropped" and e.payload["run_id"] != run_drift]

    def keys(run: str) -> set[tuple[str, str]]:
        frame = read_table(out, "findings", run)
        return {(k, c if isinstance(c, str) else s or "") for k, c, s in zip(frame["kind"], frame["class_name"],
                                                                              frame["slice"])}

    new = {(e.payload["kind"], e.payload["subject"]) for e in events
           if e.event == "visaudit.finding.new" and e.payload["run_id"] == run_drift}
    assert new == keys(run_drift) - keys(run_a)
    first = {(e.payload["kind"], e.payload["subject"]) for e in events
             if e.event == "visaudit.finding.new" and e.payload["run_id"] == run_a}
    assert first == keys(run_a), "a series' first run: every finding is new"
