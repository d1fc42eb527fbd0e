"""Hardening: bad images, bad sources, bad models, bad output folders and hostile content.

Each case is either handled correctly (converted, oriented, audited) or refused with a
message that names the file and the fix; a bad image never ends a run, and nothing already
computed is lost.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_shapes
from PIL import Image
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.data.images import Preprocess, decode
from visaudit.tasks.data.sources import DataSourceError, build_index
from visaudit.tasks.data.storage import read_table

runner = CliRunner()
PRE = Preprocess(resize=48, crop=48)


# ----------------------------------------------------------------------------- images


def _png_bomb(path: Path, side: int = 30_000) -> None:
    """A PNG of a few hundred bytes that claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" + b"\x00" * side, 9)  # one row; the rest never comes
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _exif_rotated(path: Path) -> Path:
    """40 wide x 20 high pixels, red left half, stored with EXIF orientation 6 (rotate 90 CW to view)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    return _save(image, path, format="JPEG", exif=exif.tobytes(), quality=95)


BAD_IMAGES = {
    "zero-byte.jpg": lambda p: p.write_bytes(b""),
    "truncated.jpg": lambda p: p.write_bytes(_jpeg_bytes()[:300]),
    "text-named.jpg": lambda p: p.write_text("this is not an image\n"),
    "bomb.png": _png_bomb,
}


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_unreadable_images_raise_with_a_reason(tmp_path, name) -> None:
    path = tmp_path / name
    BAD_IMAGES[name](path)
    with pytest.raises(Exception) as caught:
        decode(str(path), PRE)
    assert str(caught.value), "the error says why"


def test_decompression_bomb_is_refused_before_decoding(tmp_path) -> None:
    path = tmp_path / "bomb.png"
    _png_bomb(path)
    assert path.stat().st_size < 1000
    with pytest.raises(Image.DecompressionBombError):
        decode(str(path), PRE)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path) -> None:
    path = _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", format="JPEG", quality=95)
    pixels = decode(str(path), PRE).pixels
    assert pixels.shape == (48, 48, 3)
    red, green, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60  # C=0, M=Y=255: red


def test_16_bit_png_keeps_its_gradient(tmp_path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png", format="PNG")
    pixels = decode(str(path), Preprocess(resize=64, crop=64)).pixels
    row = pixels[32, :, 0].astype(int)
    assert row[0] < 10 and row[-1] > 245 and np.all(np.diff(row) >= 0), "scaled to 8 bits, not clipped"


def test_greyscale_palette_and_transparency(tmp_path) -> None:
    grey = decode(str(_save(Image.new("L", (30, 30), 77), tmp_path / "grey.png")), PRE).pixels
    assert np.all(grey == 77)
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))  # fully transparent red: white once flattened
    assert np.all(decode(str(_save(rgba, tmp_path / "clear.png")), PRE).pixels == 255)
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert np.all(decode(str(_save(palette, tmp_path / "pal.png", transparency=0)), PRE).pixels == 255)


def test_exif_orientation_is_applied(tmp_path) -> None:
    decoded = decode(str(_exif_rotated(tmp_path / "rotated.jpg")), Preprocess(resize=20, crop=20))
    assert (decoded.height, decoded.width) == (40, 20), "portrait once the EXIF rotation is applied"


def test_animated_gif_uses_its_first_frame_and_a_1x1_image_is_scaled(tmp_path) -> None:
    frames = [Image.new("P", (20, 20), colour) for colour in (1, 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 250, 0, 0, 0, 250, 0] + [0] * 759)
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = decode(str(path), PRE).pixels
    assert first[..., 0].mean() > 200 and first[..., 1].mean() < 50
    tiny = decode(str(_save(Image.new("RGB", (1, 1), (5, 6, 7)), tmp_path / "dot.png")), PRE)
    assert tiny.pixels.shape == (48, 48, 3) and np.all(tiny.pixels == (5, 6, 7))


def test_a_run_over_every_bad_image_completes_and_audits_the_good_ones(tmp_path, tiny_model_file) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 3, "green": 3, "blue": 3})
    (data / "manifest.csv").unlink()
    for name, make in BAD_IMAGES.items():
        make(data / "red" / name)
    _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), data / "red" / "cmyk.jpg", format="JPEG")
    _exif_rotated(data / "green" / "rotated.jpg")
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(data), "--out", str(out), "--model", f"{model}:build", "--weights",
                                 str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q"])
    assert result.exit_code == 0, result.output
    predictions = read_table(out, "predictions")
    errors = predictions.set_index(predictions["uri"].map(lambda u: Path(u).name))["error"]
    assert errors[list(BAD_IMAGES)].notna().all() and errors[list(BAD_IMAGES)].str.len().gt(5).all()
    assert "DecompressionBomb" in errors["bomb.png"]
    assert errors.drop(list(BAD_IMAGES)).isna().all(), "every good image is audited"
    assert len(predictions) == 9 + len(BAD_IMAGES) + 2


# ----------------------------------------------------------------------------- sources


def _manifest(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_missing_files_in_a_manifest_are_recorded_not_fatal(tmp_path, tiny_model_file) -> None:
    make_shapes(tmp_path, {"red": 3, "green": 3, "blue": 3})
    frame = pd.read_csv(tmp_path / "manifest.csv")
    frame.loc[len(frame)] = {"path": "red/gone.png", "label": "red", "background": "dark"}
    frame.loc[len(frame)] = {"path": "red/000.png", "label": "purple", "background": "dark"}  # unknown label
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    model, weights = tiny_model_file
    out = tmp_path / "out"
    (tmp_path / "classes.txt").write_text("blue\ngreen\nred\n")
    result = runner.invoke(app, ["run", str(tmp_path / "manifest.csv"), "--out", str(out), "--model",
                                 f"{model}:build", "--weights", str(weights), "--crop", "48", "--resize", "48",
                                 "--classes", str(tmp_path / "classes.txt"), "--no-pdf", "-q"])
    assert result.exit_code == 0, result.output
    predictions = read_table(out, "predictions")
    gone = predictions[predictions["uri"].str.endswith("gone.png")]
    assert len(gone) == 1 and "gone.png" in gone["error"].iloc[0] or "No such file" in gone["error"].iloc[0]
    assert predictions["error"].notna().sum() == 1
    unknown = predictions[predictions["labels"].map(lambda ls: list(ls) == ["purple"])]
    assert len(unknown) == 1 and pd.isna(unknown["correct"].iloc[0]), "an unknown label is not judged"


@pytest.mark.parametrize(("rows", "expected"), [
    ([{"file": "a.png", "label": "cat"}], "lacks column(s) ['path']"),
    ([{"path": "a.png", "lable": "cat"}], "expected 'path', 'label'"),
    ([{"path": "a.png", "label": "cat", "x0": 1, "y0": 2}], "box columns must come together"),
])
def test_manifest_columns_are_named_in_errors(tmp_path, rows, expected) -> None:
    with pytest.raises(DataSourceError, match="manifest.csv") as caught:
        build_index(_manifest(tmp_path, rows))
    assert expected in str(caught.value)


def test_empty_manifest_and_empty_folder_are_clear_errors(tmp_path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("path,label\n")
    with pytest.raises(DataSourceError, match="no rows"):
        build_index(path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataSourceError, match="no images found"):
        build_index(tmp_path / "nothing")


def test_duplicate_rows_keep_distinct_ids(tmp_path) -> None:
    make_shapes(tmp_path, {"red": 2})
    frame = pd.read_csv(tmp_path / "manifest.csv")
    pd.concat([frame, frame.iloc[:1]]).to_csv(tmp_path / "manifest.csv", index=False)
    index = build_index(tmp_path / "manifest.csv")
    assert len(index) == 3 and index["image_id"].is_unique  # (the near_duplicate finding then lists the pair)
    assert index["image_id"].iloc[2].startswith(index["image_id"].iloc[0])


def test_path_traversal_needs_an_opt_in(tmp_path) -> None:
    (tmp_path / "secret").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret" / "key.png")
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = _manifest(folder, [{"path": "../secret/key.png", "label": "cat"}])
    with pytest.raises(DataSourceError, match=r"line 2: path '\.\./secret/key\.png' points outside") as caught:
        build_index(manifest)
    assert "--allow-outside-paths" in str(caught.value)
    index = build_index(manifest, allow_outside=True)
    assert index["uri"].iloc[0] == str((tmp_path / "secret" / "key.png").resolve())
    inside = _manifest(folder, [{"path": "sub/../ok.png", "label": "cat"}])
    assert len(build_index(inside)) == 1, "a path that stays inside is fine"


# ----------------------------------------------------------------------------- models and parameters


WRONG_SHAPE_MODEL = '''
import torch
from torch import nn


class Wrong(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)  # (N, 4, H, W): not class scores


def build(num_classes=3):
    return Wrong()


def broken(num_classes=3):
    raise RuntimeError("factory exploded")


class Detached(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.head(self.features(x).detach())  # a frozen backbone, detached by hand


def detached(num_classes=3):
    return Detached(num_classes)
'''


@pytest.mark.parametrize(("factory", "extra", "expected"), [
    ("build", [], "class scores of shape (batch, classes); it returned (1, 4, 48, 48)"),
    ("broken", [], "factory exploded"),
    ("detached", [], "do not depend on this layer through autograd"),
    ("build", ["--device", "cuda:7"], "cuda"),
    ("build", ["--batch-size", "-3"], "--batch-size"),
    ("build", ["--occlusion-window", "0", "--methods", "occlusion"], "--occlusion-window"),
    ("build", ["--occlusion-window", "8", "--occlusion-stride", "-1", "--methods", "occlusion"], "--occlusion-stride"),
    ("build", ["--batch-size", "100000"], "--batch-size"),
])
def test_bad_models_and_absurd_parameters_are_one_line(tmp_path, factory, extra, expected) -> None:
    module = tmp_path / "wrong_model.py"
    module.write_text(WRONG_SHAPE_MODEL)
    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    result = runner.invoke(app, ["run", str(data), "--out", str(tmp_path / "out"), "--model", f"{module}:{factory}",
                                 "--crop", "48", "--resize", "48", "-q", *extra])
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- output


def test_read_only_output_folder_is_a_clear_error_and_earlier_runs_survive(tmp_path, tiny_model_file) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    args = ["run", str(data), "--out", str(out), "--model", f"{model}:build", "--weights", str(weights),
            "--crop", "48", "--resize", "48", "--no-pdf", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    before = read_table(out, "predictions")
    for folder in [out, *out.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o555)
    try:
        result = runner.invoke(app, args)
    finally:
        for folder in [out, *out.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)
    assert result.exit_code != 0 and "Permission denied" in result.output
    pd.testing.assert_frame_equal(read_table(out, "predictions"), before)


def test_a_failing_report_keeps_the_tables_and_can_be_retried(tmp_path, tiny_model_file) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    model, weights = tiny_model_file
    broken = tmp_path / "templates"
    broken.mkdir()
    (broken / "report.html.j2").write_text("{{ no_such_variable.attribute }}")
    (broken / "report.css").write_text("")
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(data), "--out", str(out), "--model", f"{model}:build", "--weights",
                                 str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q",
                                 "--templates", str(broken)])
    assert result.exit_code != 0 and "report" in result.output.lower()
    predictions = read_table(out, "predictions")
    assert len(predictions) == 6, "the run is committed before the report"
    run_id = predictions["run_id"].iloc[0]
    retry = runner.invoke(app, ["report", run_id, "--out", str(out), "--no-pdf"])
    assert retry.exit_code == 0, retry.output
    assert (out / "runs" / run_id / "report.html").is_file()


def test_disk_full_mid_run_is_a_clear_error_and_earlier_runs_survive(tmp_path, tiny_model_file, monkeypatch) -> None:
    import errno

    import visaudit.tasks.data.storage

    data = tmp_path / "data"
    make_shapes(data, {"red": 4, "green": 4, "blue": 4})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    args = ["run", str(data), "--out", str(out), "--model", f"{model}:build", "--weights", str(weights),
            "--crop", "48", "--resize", "48", "--shard-size", "4", "--no-pdf", "--no-sanity-check", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    before = {table: read_table(out, table) for table in ("predictions", "explanations", "findings")}
    real_write = visaudit.tasks.data.storage.pq.ParquetWriter.write_table  # whole parts and streamed row groups
    calls = {"n": 0}

    def fill_up(self, table, *args, **options):
        calls["n"] += 1
        if calls["n"] > 4:  # a few parts land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, table, *args, **options)

    monkeypatch.setattr(visaudit.tasks.data.storage.pq.ParquetWriter, "write_table", fill_up)
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "No space left on device" in result.output
    assert "--run-id" in result.output, "the message says how to resume"
    for table, frame in before.items():
        pd.testing.assert_frame_equal(read_table(out, table), frame, obj=table)
    assert not [p for p in (out / "tables").rglob("*.tmp") if not p.parent.name.startswith("_tmp-")], \
        "no stray temp file where readers look"


def test_urls_that_404_or_hang_are_recorded_after_bounded_retries(tmp_path, tiny_model_file, monkeypatch) -> None:
    import functools
    import http.server
    import threading
    import time

    from visaudit.tasks.data import reads

    make_shapes(tmp_path, {"red": 2, "green": 2, "blue": 2})
    frame = pd.read_csv(tmp_path / "manifest.csv")
    frame.loc[len(frame)] = {"path": "red/missing.png", "label": "red", "background": "dark"}
    frame.loc[len(frame)] = {"path": "slow/hang.png", "label": "red", "background": "dark"}
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "hang.png").write_bytes((tmp_path / "red" / "000.png").read_bytes())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            if self.path.startswith("/slow/"):
                time.sleep(3)
            return super().do_GET()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(reads, "REMOTE_ATTEMPTS", 2)
    policy = reads.ReadPolicy(limits=reads.Limits(http_deadline_s=0.5))
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        started = time.monotonic()
        with pytest.raises(OSError, match="unreachable after 2 attempts"):
            reads.read_bytes(f"{base}/slow/hang.png", policy)
        assert time.monotonic() - started < 2.9, "bounded: never waits for the server's 3 s"
        with pytest.raises(FileNotFoundError):
            reads.read_bytes(f"{base}/red/missing.png", policy)
        model, weights = tiny_model_file
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", f"{base}/manifest.csv", "--out", str(out), "--model", f"{model}:build",
                                     "--weights", str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q",
                                     "--http-deadline", "0.5"])
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    predictions = read_table(out, "predictions")
    errors = predictions.set_index(predictions["uri"].map(lambda u: u.rsplit("/", 1)[1]))["error"]
    assert "FileNotFoundError" in errors["missing.png"] and "unreachable" in errors["hang.png"]
    assert errors.drop(["missing.png", "hang.png"]).isna().all()
