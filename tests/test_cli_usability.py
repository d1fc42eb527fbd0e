"""What a new user tripped on: the progress bar counts images and names each later stage;
``serve --help`` lists the run's options; ``--config`` takes the command line's names."""

from __future__ import annotations

import re

import pytest
from conftest import make_shapes, using_prefect_api
from typer.testing import CliRunner

from visaudit.flows.cli import app, request_from_config
from visaudit.tasks.audit import progress

runner = CliRunner()


@pytest.fixture(scope="module")
def prefect_server(prefect_api):
    with using_prefect_api(prefect_api):
        yield


def test_progress_counts_images_per_batch_then_names_each_stage(tmp_path, tiny_model_file, monkeypatch,
                                                                 prefect_server) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 5, "green": 5, "blue": 2})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    seen: list[tuple[int, str]] = []
    write = progress._write

    def recording(path, text):  # every write the run makes, read back as the bar reads it
        write(path, text)
        plan_folder = path.parent.parent
        run_dir = out / "runs" / plan_folder.name.removeprefix(".staging-")
        now = progress.read_progress(plan_folder, run_dir, 12)
        seen.append((now.images, now.label))

    monkeypatch.setattr(progress, "_write", recording)
    result = runner.invoke(app, ["run", str(data / "manifest.csv"), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--resize", "48", "--crop", "48", "--batch-size", "4",
                                 "--no-pdf", "--no-sanity-check", "-q"])  # every stage is entered, skipped or not
    assert result.exit_code == 0, result.output
    assert seen[:3] == [(4, "images"), (8, "images"), (12, "images")]  # one shard of 12, counted per batch of 4
    assert [label for _, label in seen[3:]] == ["sanity check", "deletion/insertion", "class impressions",
                                                "adversarial noise", "findings", "feature views", "commit"]
    assert all(images == 12 for images, _ in seen[3:])
    run_dir = next((out / "runs").glob("r*"))
    assert progress.read_progress(out / "runs" / f".staging-{run_dir.name}", run_dir, 12) == progress.Progress(
        12, "report")  # committed: the staging folder is gone, the report is being drawn
    assert not (out / "runs" / f".staging-{run_dir.name}").exists()


def test_serve_help_lists_source_and_every_run_option() -> None:
    import typer

    commands = typer.main.get_command(app).commands
    run_options = {o for p in commands["run"].params if p.param_type_name == "option" for o in p.opts} - {"--quiet", "-q", "--cron", "--timezone",
                                                                          "--deployment"}
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", result.output))
    assert "source" in result.output and "--setup-probe" in run_options
    assert run_options <= listed, sorted(run_options - listed)


def test_serve_refuses_options_beside_a_config(tmp_path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text('source = "photos/"\narch = "resnet18"\n')
    result = runner.invoke(app, ["serve", "--config", str(config), "--arch", "resnet50"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: give the audit's parameters either in {config} or as options, not both (got --arch)"]


def test_config_takes_the_command_lines_names_and_the_groups_tables(tmp_path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text('source = "photos/"\nout = "audits"\narch = "resnet18"\nclasses = "classes.txt"\n'
                      'methods = "gradcam,occlusion"\nsetup_probe = 64\ntarget_class = ["tabby"]\n'
                      '[occlusion]\ngrid = 4\n[compute]\nbatch_size = 8\n')
    request = request_from_config(config)
    assert (request.source, request.out_dir, request.model.arch, request.model.classes_file) == (
        "photos/", "audits", "resnet18", "classes.txt")
    assert request.explain.methods == ["gradcam", "occlusion"] and request.setup.probe_images == 64
    assert request.occlusion.grid == 4 and request.compute.batch_size == 8
    flat = tmp_path / "flat.toml"
    flat.write_text('source = "photos/"\nout = "audits"\narch = "resnet18"\nclasses = "classes.txt"\n'
                    'methods = ["gradcam", "occlusion"]\nsetup_probe = 64\ntarget_class = ["tabby"]\n'
                    'occlusion_grid = 4\nbatch_size = 8\n')
    assert request_from_config(flat) == request
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('source = "photos/"\narch = "resnet18"\nclases = "classes.txt"\n')
    result = runner.invoke(app, ["serve", "--config", str(wrong)])
    assert result.exit_code == 2 and "unknown keys ['clases']" in result.output and "classes" in result.output


def test_named_and_top_k_targets_get_a_row_each_and_deleted_figures_are_not_called_not_computed(
        tmp_path, tiny_model_file, prefect_server) -> None:
    import json
    import shutil

    data = tmp_path / "data"
    make_shapes(data, {"red": 8, "green": 8, "blue": 2})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(data / "manifest.csv"), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--resize", "48", "--crop", "48", "--no-pdf",
                                 "--no-sanity-check", "--no-setup-checks", "--targets", "predicted,top3",
                                 "--target-class", "blue", "-q"])
    assert result.exit_code == 0, result.output
    run_dir = next((out / "runs").glob("r*"))
    html = (run_dir / "report.html").read_text()
    evidence = re.findall(r'<figure class="example evidence".*?</figure>', html, re.S)
    assert evidence, "no finding showed evidence"
    caption = re.compile(r'<span class="slot-caption">[^<:]*: ([^<]*)</span>')
    for figure in evidence:  # top3 of 3 classes: every class explained; the first row's, then one row per other
        first = set(caption.findall(figure.split('class="thumbs target-row"', 1)[0]))
        rows = re.findall(r'<div class="thumbs target-row" data-target="([^"]*)">(.*?)</div>', figure, re.S)
        assert len(first) == 1 and len(rows) == 2, (first, rows)
        assert sorted(first | {target for target, _ in rows}) == ["blue", "green", "red"]
        for target, row in rows:
            assert "<img" in row and set(caption.findall(row)) == {target}

    def feature_section(html: str) -> str:
        return html[html.index("<h2>Feature views</h2>"):].split("</section>", 1)[0]

    assert "Not computed" not in feature_section((run_dir / "report.html").read_text())
    made = json.loads((run_dir / "run.json").read_text())["figures"]["features"]
    shutil.rmtree(run_dir / "features")
    result = runner.invoke(app, ["report", run_dir.name, "--out", str(out), "--no-pdf"])
    assert result.exit_code == 0, result.output
    section = feature_section((run_dir / "report.html").read_text())
    assert "Not computed" not in section and f"Computed in this run ({made} files in features/)" in section
    assert "deleted after the run" in section
