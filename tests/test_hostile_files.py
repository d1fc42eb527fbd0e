"""Hostile files in a class folder: HEIC, SVG, 0x0 and bad-CRC images, symlink loops,
dangling symlinks and names that are not UTF-8. Each shows up in the ``error`` column with
the file and what it is; none stops the run or disappears."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_shapes
from PIL import Image
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.data.images import ImageError, Preprocess, decode
from visaudit.tasks.data.reads import local_path
from visaudit.tasks.data.sources import build_index
from visaudit.tasks.data.storage import read_table

PRE = Preprocess(resize=16, crop=16)


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png(width: int, height: int, bad_crc: bool = False) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header, 0 if bad_crc else None)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * (3 * max(width, 1) + 1))) + _chunk(b"IEND", b""))


HOSTILE = {
    "photo.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "a HEIC image"),
    "drawing.svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                    "an SVG (vector) image"),
    "empty.png": (_png(0, 0), "a PNG of 0 x 0 pixels"),
    "crc.png": (_png(4, 4, bad_crc=True), "fails its CRC checksum"),
    "page.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML page"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_unidentifiable_files_are_named_with_what_they_are(tmp_path, name) -> None:
    data, what = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as caught:
        decode(str(path), PRE)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and what in message, message
    assert "BytesIO" not in message


def test_symlink_loops_and_dangling_symlinks_are_listed_and_explained(tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    os.symlink("loop.png", tmp_path / "cat" / "loop.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "dangling.png")
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "again")  # a folder link: listed, not followed
    index = build_index(tmp_path)
    assert sorted(Path(u).name for u in index["uri"]) == ["again", "dangling.png", "loop.png"]
    errors = {}
    for uri in index["uri"]:
        with pytest.raises(OSError) as caught:
            decode(uri, PRE)
        errors[Path(uri).name] = str(caught.value)
    assert errors["loop.png"].endswith("loop.png: symlink loop")
    assert "dangling symlink" in errors["dangling.png"] and "gone.png" in errors["dangling.png"]
    assert "a folder, not a regular file" in errors["again"]


def test_a_name_that_is_not_utf8_is_indexed_and_read(tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    raw = os.fsencode(str(tmp_path / "cat")) + b"/caf\xe9.png"
    with open(raw, "wb") as handle:
        Image.new("RGB", (8, 8), (0, 0, 255)).save(handle, format="PNG")
    (uri,) = build_index(tmp_path)["uri"]
    assert uri.startswith("file://") and uri.endswith("/caf%E9.png")
    assert os.fsencode(local_path(uri)) == raw
    assert decode(uri, PRE).pixels[0, 0].tolist() == [0, 0, 255]


def test_a_run_over_hostile_files_records_each_and_audits_the_rest(tmp_path, tiny_model_file) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    (data / "manifest.csv").unlink()
    for name, (content, _) in HOSTILE.items():
        (data / "red" / name).write_bytes(content)
    os.symlink("loop.png", data / "green" / "loop.png")
    os.symlink(tmp_path / "gone.png", data / "green" / "dangling.png")
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (40, 60, 220)).save(buffer, format="PNG")
    with open(os.fsencode(str(data / "blue")) + b"/bleu-\xe9t\xe9.png", "wb") as handle:
        handle.write(buffer.getvalue())
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(data), "--out", str(out), "--model", f"{model}:build", "--weights",
                                      str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q",
                                      "--no-sanity-check"])
    assert result.exit_code == 0, result.output
    predictions = read_table(out, "predictions")
    errors = predictions.set_index(predictions["uri"].map(lambda u: u.rsplit("/", 1)[1]))["error"]
    for name, (_, what) in HOSTILE.items():
        assert what in errors[name], errors[name]
    assert "symlink loop" in errors["loop.png"] and "dangling symlink" in errors["dangling.png"]
    assert pd.isna(errors["bleu-%E9t%E9.png"]), "the non-UTF-8 name is audited"
    assert errors.isna().sum() == 7 and len(errors) == 7 + len(HOSTILE) + 2
