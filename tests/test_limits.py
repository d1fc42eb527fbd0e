"""Nothing hangs, nothing eats the machine: FIFOs and devices, oversized files, http servers
that drip, never end or answer slowly, and the aspect-ratio bomb; each is refused within its
limit and recorded with the reason."""

from __future__ import annotations

import http.server
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from visaudit.tasks.data import reads
from visaudit.tasks.data.images import ImageError, Preprocess, decode, decode_many
from visaudit.tasks.data.reads import Limits, ReadPolicy, ReadRefused, read_bytes
from visaudit.tasks.data.sources import DataSourceError, build_index, read_policy

PRE = Preprocess(resize=16, crop=16)
SHORT = Limits(http_deadline_s=0.6)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _in_time(call, seconds: float):
    """Run ``call`` in a thread; fail (instead of hanging the suite) when it takes longer."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"], time.monotonic() - started


def test_a_fifo_named_by_a_row_is_refused_without_blocking(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ReadRefused, match=r"a FIFO \(named pipe\), not a regular file"):
        _in_time(lambda: read_bytes(str(tmp_path / "pipe.png")), 5)


def test_a_fifo_in_a_class_folder_shows_up_as_an_error(tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "ok.png").write_bytes(_png())
    os.mkfifo(tmp_path / "cat" / "pipe.png")
    index = build_index(tmp_path)
    assert sorted(Path(u).name for u in index["uri"]) == ["ok.png", "pipe.png"], "listed, not skipped"
    results, _ = _in_time(lambda: decode_many(index["uri"].tolist(), PRE, policy=read_policy(tmp_path)), 10)
    assert "FIFO" in results[1] and not isinstance(results[0], str)


def test_dev_zero_is_refused_before_it_is_read() -> None:
    with pytest.raises(ReadRefused, match="a character device, not a regular file"):
        _in_time(lambda: read_bytes("/dev/zero"), 5)


def test_an_image_over_the_byte_cap_is_refused_unread(tmp_path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png() + b"\0" * 5000)
    policy = ReadPolicy(limits=Limits(image_bytes=4096))
    with pytest.raises(ReadRefused, match=r"over the limit of 4,096 bytes"):
        read_bytes(str(path), policy)
    assert read_bytes(str(path), ReadPolicy())[:4] == b"\x89PNG"


def test_a_manifest_over_the_byte_cap_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "m.csv"
    pd.DataFrame({"path": [f"{i}.png" for i in range(500)], "label": "cat"}).to_csv(path, index=False)
    with pytest.raises(DataSourceError, match=r"m\.csv: cannot read the manifest .*over the limit of 1,000 bytes"):
        build_index(path, limits=Limits(manifest_bytes=1000))


def _aspect_bomb(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` pixels (PIL reads the size from the header alone)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (width + 1) * min(height, 4), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_the_aspect_ratio_bomb_is_refused_before_decoding(tmp_path) -> None:
    path = tmp_path / "strip.png"
    path.write_bytes(_aspect_bomb(100_000, 1))  # 100,000 pixels: under PIL's pixel-count check
    with pytest.raises(ImageError, match=r"strip\.png: 100,000 x 1 pixels, an aspect ratio of 100,000:1"):
        _in_time(lambda: decode(str(path), Preprocess()), 5)
    tall = tmp_path / "tall.png"
    tall.write_bytes(_aspect_bomb(1, 50))
    assert decode(str(tall), PRE).pixels.shape == (16, 16, 3), "a 50:1 image is within the default limit"
    with pytest.raises(ImageError, match="would be resized to"):  # a large resize of an allowed ratio
        decode(str(tall), Preprocess(resize=2048, crop=2048))


class _Hostile(http.server.BaseHTTPRequestHandler):
    """/drip: a byte every 0.1 s, forever; /endless: megabytes without end; /slow-headers:
    the status line byte by byte; anything else: a small PNG."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        try:
            if self.path == "/slow-headers.csv":
                for byte in b"HTTP/1.1 200 OK\r\n":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            self.send_response(200)
            if self.path == "/drip.png":
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                for _ in range(600):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.path == "/endless.png":
                self.end_headers()  # no length: the body ends when the connection does
                block = b"\0" * (1 << 16)
                while True:
                    self.wfile.write(block)
            else:
                body = _png()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        except OSError:
            pass  # the client hung up: what these tests expect

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def hostile() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_dripping_http_image_stops_at_the_total_deadline(hostile, monkeypatch) -> None:
    monkeypatch.setattr(reads, "REMOTE_ATTEMPTS", 2)
    policy = ReadPolicy(limits=SHORT)
    with pytest.raises(OSError, match="unreachable after 2 attempts .*within 0.6 s"):
        _in_time(lambda: read_bytes(f"{hostile}/drip.png", policy), 10)
    assert read_bytes(f"{hostile}/ok.png", policy)[:4] == b"\x89PNG"


def test_a_dripping_http_image_is_bounded_in_time(hostile, monkeypatch) -> None:
    monkeypatch.setattr(reads, "REMOTE_ATTEMPTS", 2)
    started = time.monotonic()
    results = decode_many([f"{hostile}/drip.png"], PRE, policy=ReadPolicy(limits=SHORT))
    elapsed = time.monotonic() - started
    assert "within 0.6 s" in results[0]
    assert elapsed < 2 * 0.6 + 0.5 + 1.0, f"two attempts of 0.6 s and one backoff, not per read: {elapsed:.1f} s"


def test_an_endless_http_body_stops_at_the_byte_cap(hostile) -> None:
    policy = ReadPolicy(limits=Limits(image_bytes=1 << 20, http_deadline_s=20))
    with pytest.raises(ReadRefused, match=r"passed the limit of 1,048,576 bytes"):
        _in_time(lambda: read_bytes(f"{hostile}/endless.png", policy), 15)


def test_a_manifest_served_slowly_stops_at_the_deadline(hostile, monkeypatch) -> None:
    monkeypatch.setattr(reads, "REMOTE_ATTEMPTS", 1)
    with pytest.raises(DataSourceError, match=r"slow-headers\.csv: cannot read the manifest .*within 0.6 s"):
        _in_time(lambda: build_index(f"{hostile}/slow-headers.csv", limits=SHORT), 5)
