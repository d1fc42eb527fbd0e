"""Data sources: folders, manifests (CSV, Parquet, multi-label, relative paths, http), bad input."""

from __future__ import annotations

import functools
import http.server
import threading

import pandas as pd
import pytest
from conftest import make_shapes

from visaudit.tasks.data.reads import read_bytes
from visaudit.tasks.data.sources import DataSourceError, build_index, class_names_from_index


def test_folder_index(tmp_path) -> None:
    make_shapes(tmp_path, {"red": 3, "green": 2})
    index = build_index(tmp_path)
    assert len(index) == 5
    assert class_names_from_index(index) == ["green", "red"]
    assert index["image_id"].is_unique
    assert index["box_x0"].isna().all()


def test_csv_manifest_with_boxes_and_attributes(tmp_path) -> None:
    manifest = make_shapes(tmp_path, {"red": 2, "blue": 2})
    index = build_index(manifest)
    assert len(index) == 4
    assert all(uri.startswith(str(tmp_path)) for uri in index["uri"]), "relative paths resolve against the manifest"
    assert index["box_x1"].gt(index["box_x0"]).all()
    assert index["attributes"].iloc[0]["background"] in {"dark", "light"}
    # same file, same id, across runs
    assert build_index(manifest)["image_id"].tolist() == index["image_id"].tolist()


def test_parquet_multilabel_manifest(tmp_path) -> None:
    make_shapes(tmp_path, {"red": 2})
    pd.DataFrame({"path": ["red/000.png", "red/001.png"], "label": [["red", "blue"], ["red"]]}).to_parquet(
        tmp_path / "m.parquet"
    )
    pd.DataFrame({"path": ["red/000.png"], "label": ["red; blue"]}).to_csv(tmp_path / "m.csv", index=False)
    assert build_index(tmp_path / "m.parquet")["labels"].tolist() == [["red", "blue"], ["red"]]
    assert build_index(tmp_path / "m.csv")["labels"].tolist() == [["red", "blue"]]


def test_http_manifest_and_images(tmp_path) -> None:
    make_shapes(tmp_path, {"red": 2, "blue": 1})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        index = build_index(f"{base}/manifest.csv")
        assert index["uri"].iloc[0].startswith(base + "/"), "relative paths resolve against the manifest URL"
        assert read_bytes(index["uri"].iloc[0])[:4] == b"\x89PNG"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p / "nope", "not found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
        (lambda p: (p / "m.csv").write_text("file,label\na.png,x\n") and p / "m.csv", "lacks column(s) ['path']"),
        (lambda p: (p / "m.csv").write_text("path,label,x0\na.png,x,1\n") and p / "m.csv", "box columns"),
        (lambda p: (p / "m.txt").write_text("hi") and p / "m.txt", "not a folder nor a manifest"),
    ],
)
def test_bad_sources_name_the_file_and_the_fix(tmp_path, make, expected) -> None:
    with pytest.raises(DataSourceError, match=None) as info:
        build_index(make(tmp_path))
    assert expected in str(info.value)
    assert str(tmp_path) in str(info.value)
