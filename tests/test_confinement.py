"""Read confinement: a data source makes the audit read only files under its own folder (or,
remote, only its own origin), whatever its rows say: absolute paths, symlinks that point out,
fsspec and file:// URLs, a remote manifest naming this machine's files."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from visaudit.tasks.data.images import Preprocess, decode_many
from visaudit.tasks.data.reads import ReadRefused, read_bytes
from visaudit.tasks.data.sources import DataSourceError, build_index, read_policy

PRE = Preprocess(resize=16, crop=16)


@pytest.fixture()
def secret(tmp_path) -> Path:
    """An image outside the data folder: what a hostile source tries to read."""
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "elsewhere" / "secret.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(path)
    return path


@pytest.fixture()
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    (folder / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "cat" / "ok.png")
    return folder


def _manifest(folder: Path, paths: list[str]) -> Path:
    path = folder / "manifest.csv"
    pd.DataFrame({"path": paths, "label": "cat"}).to_csv(path, index=False)
    return path


def test_an_absolute_path_outside_the_manifest_folder_is_refused(data, secret) -> None:
    manifest = _manifest(data, ["cat/ok.png", str(secret)])
    with pytest.raises(DataSourceError, match=r"line 3: path .*secret\.png' points outside") as caught:
        build_index(manifest)
    assert "--allow-outside-paths" in str(caught.value)
    assert build_index(manifest, allow_outside=True)["uri"].iloc[1] == str(secret.resolve())
    inside = _manifest(data, [str(data / "cat" / "ok.png")])
    assert len(build_index(inside)) == 1, "an absolute path inside the folder is fine"


@pytest.mark.parametrize("scheme", ["local://", "file://"])
def test_fsspec_and_file_urls_are_local_paths_and_confined(data, secret, scheme) -> None:
    outside = _manifest(data, [f"{scheme}{secret}"])
    with pytest.raises(DataSourceError, match="points outside"):
        build_index(outside)
    inside = _manifest(data, [f"{scheme}{data / 'cat' / 'ok.png'}"])
    uri = build_index(inside)["uri"].iloc[0]
    assert uri == str(data / "cat" / "ok.png"), "file:// is a local path, not joined to the folder"
    assert read_bytes(uri)[:4] == b"\x89PNG"


def test_file_uris_are_percent_decoded(data) -> None:
    spaced = data / "cat" / "a b.png"
    Image.new("RGB", (8, 8)).save(spaced)
    index = build_index(_manifest(data, [f"file://{str(spaced).replace(' ', '%20')}"]))
    assert index["uri"].iloc[0] == str(spaced)


def test_unsupported_schemes_and_chained_urls_are_refused(data) -> None:
    for path in ["memory://x.png", "zip://a.png::file:///tmp/x.zip", "simplecache::file:///etc/passwd"]:
        with pytest.raises(DataSourceError, match="not supported"):
            build_index(_manifest(data, [path]))


def test_a_symlink_inside_the_folder_that_points_outside_is_an_error_not_a_read(data, secret) -> None:
    os.symlink(secret, data / "cat" / "link.png")
    index = build_index(data)  # a folder source: the link is listed ...
    assert sorted(Path(u).name for u in index["uri"]) == ["link.png", "ok.png"]
    results = decode_many(index["uri"].tolist(), PRE, policy=read_policy(data))
    by_name = dict(zip((Path(u).name for u in index["uri"]), results))
    assert isinstance(by_name["link.png"], str) and "outside" in by_name["link.png"], by_name["link.png"]
    assert str(secret) in by_name["link.png"], "the message names where the link leads"
    assert not isinstance(by_name["ok.png"], str)
    manifest = _manifest(data, ["cat/link.png"])  # ... and so is a manifest row naming it
    uri = build_index(manifest)["uri"].iloc[0]
    with pytest.raises(ReadRefused, match="outside"):
        read_bytes(uri, read_policy(manifest))
    assert read_bytes(uri, read_policy(manifest, allow_outside=True))[:4] == b"\x89PNG"


@pytest.fixture()
def server(tmp_path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_remote_manifest_may_not_name_local_files(tmp_path, data, secret, server) -> None:
    for row in [str(secret), f"file://{secret}", f"local://{secret}"]:
        _manifest(tmp_path, [row])
        with pytest.raises(DataSourceError, match="names a file of this machine") as caught:
            build_index(f"{server}/manifest.csv")
        assert "line 2" in str(caught.value) and "--allow-outside-paths" in str(caught.value)
    assert build_index(f"{server}/manifest.csv", allow_outside=True)["uri"].iloc[0] == str(secret)
    policy = read_policy(f"{server}/manifest.csv")
    with pytest.raises(ReadRefused, match="outside any allowed folder"):
        read_bytes(str(secret), policy)  # the read itself is refused too (no local root)


def test_a_remote_manifest_may_name_only_images_of_its_own_origin(tmp_path, data, server) -> None:
    _manifest(tmp_path, ["data/cat/ok.png", f"{server}/data/cat/ok.png"])
    index = build_index(f"{server}/manifest.csv")
    assert index["uri"].tolist() == [f"{server}/data/cat/ok.png"] * 2
    other = server.replace("127.0.0.1", "localhost")  # the same server under another origin
    _manifest(tmp_path, [f"{other}/data/cat/ok.png"])
    with pytest.raises(DataSourceError, match="not on the manifest's origin"):
        build_index(f"{server}/manifest.csv")
    assert len(build_index(f"{server}/manifest.csv", allow_outside=True)) == 1
    with pytest.raises(ReadRefused, match="own origin"):
        read_bytes(f"{other}/data/cat/ok.png", read_policy(f"{server}/manifest.csv"))
