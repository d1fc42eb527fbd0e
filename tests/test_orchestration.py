"""Orchestration and scale cost (issue 21): a light command line, the PDF in its own process, a
failed PDF that loses nothing else, and shards that read only their rows of the index."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import make_shapes
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.audit import plan as plan_module
from visaudit.tasks.data.sources import INDEX_ROW_GROUP, read_index, write_index
from visaudit.tasks.data.storage import read_table
from visaudit.tasks.report.pdf import PdfFailed, PdfProcess

HEAVY = ("torch", "torchvision", "pandas", "pyarrow", "scipy", "weasyprint", "matplotlib", "prefect")
LOADED = """
import json, sys
sys.argv = ["visaudit", *sys.argv[1:]]
from visaudit.flows.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(%r))), file=sys.stderr)
""" % (HEAVY,)


@pytest.mark.parametrize("command", [["--help"], ["run", "--help"], ["serve", "--help"]])
def test_help_imports_no_heavy_library(command: list[str]) -> None:
    """`visaudit --help` and the run options (generated from the request's settings) load neither
    torch nor pandas nor WeasyPrint nor Prefect: each command imports its own work."""
    done = subprocess.run([sys.executable, "-c", LOADED, *command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def test_a_run_request_is_checked_before_torch_loads(tmp_path) -> None:
    """`visaudit run` checks its options and model spec with no heavy library loaded, so Prefect's
    server starts (in the background) before torch, pandas and the rest are imported."""
    script = f"""
import json, sys
from visaudit.flows.cli import build_request
build_request({{"source": {str(tmp_path)!r}, "model": "visaudit.tasks.demo.network:build_model"}})
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_named_api_skips_the_server_package() -> None:
    """With an API named (the run's own server, PREFECT_API_URL), the flow's port pinning returns at
    once without importing Prefect's server package (FastAPI and every route: 4-5 s of CPU here)."""
    script = """
import json, sys
from visaudit.flows.server import pin_ephemeral_port
print(json.dumps([pin_ephemeral_port(), "prefect.server.api.server" in sys.modules, "fastapi" in sys.modules]))
"""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [None, False, False]


def test_the_import_probe_sees_a_heavy_import() -> None:
    """The control: the wrapper sees a heavy import when there is one (else the test above could not fail)."""
    probe = LOADED.replace("from visaudit.flows.cli import main", "import pandas\nfrom visaudit.flows.cli import main")
    done = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, timeout=60)
    assert "pandas" in json.loads(done.stderr.strip().splitlines()[-1])


def test_pdf_process_renders_and_reports_failures(tmp_path) -> None:
    html = tmp_path / "page.html"
    html.write_text("<html><body><h1>visaudit</h1><p>one page</p></body></html>")
    renderer = PdfProcess()
    try:
        renderer.submit(html, tmp_path, tmp_path / "page.pdf")
        renderer.result()
        assert (tmp_path / "page.pdf").read_bytes()[:5] == b"%PDF-"
        renderer.submit(tmp_path / "missing.html", tmp_path, tmp_path / "missing.pdf")  # a failed job ...
        with pytest.raises(PdfFailed, match="missing.html"):
            renderer.result()
        assert not (tmp_path / "missing.pdf").exists() and not list(tmp_path.glob(".*missing*"))
        renderer.submit(html, tmp_path, tmp_path / "again.pdf")  # ... leaves the process serving the next
        renderer.result()
        assert (tmp_path / "again.pdf").stat().st_size > 0
    finally:
        renderer.close()
    assert renderer._child.returncode == 0


class _DeadPdfProcess(PdfProcess):
    """A PDF process that died (killed, out of memory) before its job."""

    def __init__(self) -> None:
        super().__init__()
        self._child.kill()
        self._child.wait()


def test_failed_pdf_keeps_the_html_and_tables(tmp_path, tiny_model_file, monkeypatch) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 4, "green": 4, "blue": 4}, size=32)
    model, weights = tiny_model_file
    monkeypatch.setattr("visaudit.flows.audit.PdfProcess", _DeadPdfProcess)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "run", str(manifest), "--out", str(out), "--model", f"{model}:build", "--weights", str(weights),
        "--resize", "32", "--crop", "32", "--no-setup-checks", "--no-sanity-check", "-q"])
    assert result.exit_code == 1, result.output
    assert "error: the PDF could not be rendered" in result.output and "visaudit report" in result.output
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "run.json").exists() and (run_dir / "report.html").stat().st_size > 0
    assert not (run_dir / "report.pdf").exists()
    assert len(read_table(out, "predictions", run_dir.name)) == 12
    rerender = CliRunner().invoke(app, ["report", run_dir.name, "--out", str(out)])  # the fix the message names
    assert rerender.exit_code == 0, rerender.output
    assert (run_dir / "report.pdf").read_bytes()[:5] == b"%PDF-"


def _index(count: int) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [f"i{n:05d}" for n in range(count)], "uri": [f"/data/{n}.png" for n in range(count)],
        "labels": [["a", "b"] if n % 3 else ["a"] for n in range(count)],
        "box_x0": [float(n) for n in range(count)], "box_y0": 0.0, "box_x1": 1.0, "box_y1": 1.0,
        "attributes": [{"site": f"s{n % 4}"} for n in range(count)],
    })


def test_a_shard_reads_its_rows_of_the_index(tmp_path) -> None:
    """read_index reads only the row groups a shard spans (every shard reading the whole index was
    O(N^2)); its rows are the same as slicing the whole index, across group boundaries, and an index
    saved in one row group (a plan written before) reads the same."""
    count = 2 * INDEX_ROW_GROUP + 300
    index = _index(count)
    grouped, single = tmp_path / "grouped.parquet", tmp_path / "single.parquet"
    write_index(index, grouped)
    assert pq.ParquetFile(grouped).metadata.num_row_groups == 3
    pq.write_table(pq.read_table(grouped), single, row_group_size=count)
    full = read_index(single)
    assert full["image_id"].tolist() == index["image_id"].tolist() and full["attributes"].iloc[5] == {"site": "s1"}
    for start, stop in ((0, 256), (INDEX_ROW_GROUP - 10, INDEX_ROW_GROUP + 10), (count - 7, None), (5, count + 50),
                        (count, count + 256), (300, 300)):
        for path in (grouped, single):
            got = read_index(path, start, stop)
            want = full.iloc[start:stop].reset_index(drop=True)
            pd.testing.assert_frame_equal(got, want)


def test_progress_reader_skips_finished_shards_and_sums_like_a_fresh_read(tmp_path) -> None:
    from visaudit.tasks.audit import progress

    plan_folder, run_dir = tmp_path / ".staging-r1", tmp_path / "r1"
    reader = progress.ProgressReader(plan_folder, run_dir, 12, {"00000": 8, "00001": 4})
    assert reader.read() == progress.Progress(0, None)  # nothing started
    progress.mark_images(plan_folder, "00000", 8)  # finished: read once, then remembered
    progress.mark_images(plan_folder, "00001", 2)
    assert reader.read() == progress.Progress(10, None) == progress.read_progress(plan_folder, run_dir, 12)
    assert reader.finished == {"00000": 8}
    progress.mark_images(plan_folder, "00001", 4)
    progress.mark_stage(plan_folder, "findings")
    assert reader.read() == progress.Progress(12, "findings")


def test_load_plan_parses_once_until_the_file_changes(tmp_path, monkeypatch) -> None:
    from visaudit.tasks.audit import plan as plan_module

    parsed = []
    real = plan_module.RunPlan.model_validate_json
    monkeypatch.setattr(plan_module.RunPlan, "model_validate_json", lambda text: parsed.append(1) or real(text))
    folder = tmp_path / "staging"
    folder.mkdir()
    saved = {"run_id": "r1", "out_dir": str(tmp_path), "request": {"source": str(tmp_path), "model": {"arch": "resnet18"}},
             "classes": ["a", "b"], "preprocess": {"resize": 8, "crop": 8}, "multi_label": False, "layers": ["x"],
             "model_fingerprint": "m", "data_fingerprint": "d", "images": 2, "shards": [["00000", 0, 2]],
             "started": "now"}
    (folder / plan_module.PLAN_NAME).write_text(json.dumps(saved))
    first = plan_module.load_plan(folder)
    assert plan_module.load_plan(folder) is first and len(parsed) == 1
    saved["images"] = 3
    (folder / plan_module.PLAN_NAME).write_text(json.dumps(saved) + " ")  # rewritten (a resumed run's plan)
    assert plan_module.load_plan(folder).images == 3 and len(parsed) == 2


def test_the_data_fingerprint_hashes_the_index_in_chunks_as_in_one_pass(monkeypatch) -> None:
    """The fingerprint names the data (URIs and labels, in order): a chunked pass gives the value one
    pass over the whole index gave, so runs fingerprinted before stay comparable."""
    index = _index(23).set_index(pd.Index(range(100, 123)))
    rows = index[["uri"]].assign(labels=index["labels"].map(";".join))
    one_pass = hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes()).hexdigest()
    monkeypatch.setattr(plan_module, "FINGERPRINT_ROWS", 5)
    assert plan_module._fingerprint(index) == one_pass
    assert plan_module._fingerprint(index.iloc[::-1]) != one_pass, "the order counts"
    assert plan_module._fingerprint(index.assign(labels=[["b"]] * 23)) != one_pass, "the labels count"
