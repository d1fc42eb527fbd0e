"""Confined, bounded reads of image and manifest bytes, local or remote.

The rule (the README's "Hardening"): a run reads only what its data source names, and only
from where the source lives.

- Local reads resolve the path (symlinks included) and must land under one of the policy's
  ``roots`` (the data folder, or the local manifest's folder); a remote manifest has no local
  root at all. ``roots=None`` (``--allow-outside-paths``) lifts the confinement.
- Only regular files are opened: the type is checked with ``stat`` before the open, the open
  is non-blocking and does not follow a last-moment symlink, and ``fstat`` checks again, so a
  FIFO, a device (``/dev/zero``) or a socket is refused without ever blocking the run.
- Every read is capped in bytes (a file's size before the read, then the bytes actually read).
- Remote reads come only from the policy's ``origins`` (the remote manifest's
  ``scheme://host:port``; ``None``: any). http(s) has a total deadline per request, not per
  read, and a capped body; a timeout or reset is retried, a 4xx or a cap is not.
- URL schemes are explicit: ``file://`` (percent-decoded, RFC 8089) and ``local://`` are local
  paths; :data:`REMOTE_SCHEMES` go to the network; anything else (``memory://``, chained
  ``a::b`` URLs, archives) is refused.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

MIB = 1 << 20
REMOTE_SCHEMES = frozenset({"http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf"})
LOCAL_SCHEMES = frozenset({"file", "local"})
REMOTE_ATTEMPTS = 3  # a timeout or connection error is retried with backoff; a 4xx or a cap is not
MAX_REDIRECTS = 5
CHUNK = 1 << 16
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ReadRefused(PermissionError):
    """A read the confinement rule or a limit refuses; never retried. The message names the
    location, the rule and the fix."""


@dataclass(frozen=True)
class Limits:
    """Byte, time and shape limits of a run's reads (``DataSettings`` sets them)."""

    image_bytes: int = 64 * MIB  # largest image file read
    manifest_bytes: int = 256 * MIB  # largest manifest read
    http_deadline_s: float = 60.0  # total time for one http(s) request: connect, headers and body
    max_aspect_ratio: float = 100.0  # longer side / shorter side of an image, checked before decoding


@dataclass(frozen=True)
class ReadPolicy:
    """Where a run may read from, and how much.

    ``roots``: resolved local folders every local read must land in (``None``: anywhere;
    ``()``: no local read). ``origins``: ``scheme://host[:port]`` remote reads may come from
    (``None``: any).
    """

    roots: tuple[str, ...] | None = None
    origins: tuple[str, ...] | None = None
    limits: Limits = field(default_factory=Limits)


def scheme_of(uri: str) -> str | None:
    """The URL scheme of ``uri`` in lower case, or None for a plain path; a scheme outside
    :data:`REMOTE_SCHEMES` and :data:`LOCAL_SCHEMES` is a ValueError."""
    match = _SCHEME.match(uri)
    if match is None:
        if "::" in uri.split("/", 1)[0] and "://" in uri:
            raise ValueError(f"{uri}: chained fsspec URLs (a::b) are not supported; name the file itself")
        return None
    scheme = match.group(1).lower()
    if scheme not in REMOTE_SCHEMES | LOCAL_SCHEMES:
        raise ValueError(f"{uri}: the scheme {scheme}:// is not supported; use a local path, file://, or one of "
                         f"{', '.join(sorted(REMOTE_SCHEMES))}")
    return scheme


def is_remote(uri: str) -> bool:
    """Whether ``uri`` is read over the network (an http, s3, gs ... URL)."""
    return scheme_of(uri) in REMOTE_SCHEMES


def local_path(uri: str) -> str:
    """The local path a plain path, ``file://`` or ``local://`` URI names (``file://`` is
    percent-decoded to bytes, so any file name, UTF-8 or not, round-trips)."""
    scheme = scheme_of(uri)
    if scheme is None:
        return uri
    if scheme == "local":
        return uri[len("local://"):]
    if scheme != "file":
        raise ValueError(f"{uri}: not a local path")
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{uri}: a file:// URI on another host ({parts.netloc}) cannot be read here")
    return os.fsdecode(unquote_to_bytes(parts.path))


def file_uri(path: str) -> str:
    """A ``file://`` URI for a local path whose name is not valid UTF-8 (its bytes
    percent-encoded), so that it can be stored, shown and read back."""
    from urllib.parse import quote_from_bytes

    return "file://" + quote_from_bytes(os.fsencode(os.path.abspath(path)))


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL (lower case), what same-origin compares."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def inside(path: str, roots: tuple[str, ...]) -> bool:
    """Whether a resolved ``path`` is one of ``roots`` or below one."""
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def read_bytes(uri: str, policy: ReadPolicy = ReadPolicy(), max_bytes: int | None = None) -> bytes:
    """The bytes at ``uri`` under ``policy``, at most ``max_bytes`` (default: the image cap).

    Raises :class:`ReadRefused` for what the policy forbids, FileNotFoundError for what is
    not there, OSError for the rest; each message names ``uri``.
    """
    cap = policy.limits.image_bytes if max_bytes is None else max_bytes
    if is_remote(uri):
        if policy.origins is not None and origin_of(uri) not in policy.origins:
            raise ReadRefused(f"{uri}: not from {', '.join(policy.origins) or 'the data source'}; a remote manifest "
                              "may name only images of its own origin (pass --allow-outside-paths if you trust it)")
        return _read_remote(uri, cap, policy)
    return _read_local(local_path(uri), cap, policy.roots)


def _resolve(path: str) -> str:
    """The path with every symlink resolved; a dangling link or a loop is an error naming it."""
    try:
        return os.path.realpath(path, strict=True)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{path}: dangling symlink (to {os.readlink(path)})") from None
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == 40 or "loop" in str(exc).lower():  # ELOOP
            raise OSError(f"{path}: symlink loop") from None
        raise


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _read_local(path: str, cap: int, roots: tuple[str, ...] | None) -> bytes:
    """Resolve, confine, check the type and size, then read without blocking or following."""
    real = _resolve(path)
    if roots is not None and not inside(real, roots):
        where = f"resolves to {real}, " if real != os.path.abspath(path) else ""
        raise ReadRefused(f"{path}: {where}outside {' or '.join(roots) or 'any allowed folder'}; the audit reads only "
                          "files under its data source's folder (pass --allow-outside-paths if you trust the source)")
    info = os.stat(real)
    if not stat.S_ISREG(info.st_mode):
        raise ReadRefused(f"{path}: {_file_kind(info.st_mode)}, not a regular file; only image files are read")
    if info.st_size > cap:
        raise ReadRefused(f"{path}: {info.st_size:,} bytes, over the limit of {cap:,} bytes per file "
                          "(--max-image-bytes / --max-manifest-bytes)")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise ReadRefused(f"{path}: changed while being opened; not read")
        chunks, total = [], 0
        while chunk := os.read(fd, min(CHUNK * 16, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise ReadRefused(f"{path}: grew past the limit of {cap:,} bytes per file while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_remote(uri: str, cap: int, policy: ReadPolicy) -> bytes:
    """A URL with a deadline per attempt and bounded retries; the last error names the URL.

    http(s) goes through :func:`_read_http`; other protocols (s3, gcs, ...) through fsspec,
    capped in bytes and checked against the deadline between chunks.
    """
    last: Exception | None = None
    for attempt in range(REMOTE_ATTEMPTS):
        try:
            if uri.lower().startswith(("http://", "https://")):
                return _read_http(uri, cap, policy)
            return _read_fsspec(uri, cap, policy.limits.http_deadline_s)
        except (FileNotFoundError, PermissionError):
            raise  # 404, 403, a cap or a refused origin: asking again will not help
        except Exception as exc:  # timeouts, resets, 5xx: each library raises its own type
            last = exc
            if attempt + 1 < REMOTE_ATTEMPTS:
                time.sleep(min(0.5 * 2**attempt, policy.limits.http_deadline_s))
    raise OSError(f"{uri}: unreachable after {REMOTE_ATTEMPTS} attempts ({type(last).__name__}: {last})")


def _read_http(uri: str, cap: int, policy: ReadPolicy) -> bytes:
    """GET ``uri`` within one total deadline (a watchdog shuts the socket down when it passes,
    whatever receive is waiting), the body capped at ``cap`` bytes; redirects are followed (at most
    :data:`MAX_REDIRECTS`) only to http(s) URLs the policy allows."""
    deadline = time.monotonic() + policy.limits.http_deadline_s
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{uri}: no answer within {policy.limits.http_deadline_s:g} s")
        if parts.scheme.lower() == "https":
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=left, context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=left)
        watchdog: threading.Timer | None = None
        try:
            connection.connect()
            sock = connection.sock  # kept: the connection lets go of it when the answer says "close"
            # A server that drips its headers byte by byte defeats any per-receive timeout: at
            # the deadline the socket is shut down, which wakes whatever receive is waiting.
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(sock,))
            watchdog.daemon = True
            watchdog.start()
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": "visaudit", "Accept-Encoding": "identity"})
            answer = connection.getresponse()
            if answer.status in (301, 302, 303, 307, 308) and answer.getheader("Location"):
                url = urljoin(url, answer.getheader("Location", ""))
                if urlsplit(url).scheme.lower() not in ("http", "https") or (
                        policy.origins is not None and origin_of(url) not in policy.origins):
                    raise ReadRefused(f"{uri}: redirected to {url}, which this source may not read")
                continue
            _check_status(uri, answer)
            length = answer.getheader("Content-Length")
            if length and length.isdigit() and int(length) > cap:
                raise ReadRefused(f"{uri}: {int(length):,} bytes, over the limit of {cap:,} bytes")
            return _read_body(uri, answer, cap, deadline, policy.limits.http_deadline_s)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline and not isinstance(exc, PermissionError):
                raise TimeoutError(f"{uri}: no complete answer within {policy.limits.http_deadline_s:g} s") from None
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            connection.close()
    raise ReadRefused(f"{uri}: more than {MAX_REDIRECTS} redirects")


def _shut(sock: socket.socket | None) -> None:
    """Shut a socket down (the deadline passed): a blocked receive returns at once."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: nothing is waiting on it


def _check_status(uri: str, answer: http.client.HTTPResponse) -> None:
    if answer.status in (404, 410):
        raise FileNotFoundError(f"{uri}: HTTP {answer.status} {answer.reason}")
    if 400 <= answer.status < 500 and answer.status != 429:
        raise PermissionError(f"{uri}: HTTP {answer.status} {answer.reason}")  # not retried
    if answer.status >= 300:
        raise OSError(f"{uri}: HTTP {answer.status} {answer.reason}")


def _read_body(uri: str, answer: http.client.HTTPResponse, cap: int, deadline: float, budget: float) -> bytes:
    """The body in chunks as they come (``read1``: one receive each), at most ``cap`` bytes;
    an end that comes with the deadline (the watchdog's shutdown) or short of the announced
    length is an error, never a truncated image."""
    chunks, total = [], 0
    while chunk := answer.read1(CHUNK):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise ReadRefused(f"{uri}: the body passed the limit of {cap:,} bytes; not read further")
    if time.monotonic() >= deadline:
        raise TimeoutError(f"{uri}: the body did not arrive within {budget:g} s ({total:,} bytes so far)")
    if answer.length:  # bytes still announced but never sent
        raise OSError(f"{uri}: the connection closed {answer.length:,} bytes short of the announced length")
    return b"".join(chunks)


def _read_fsspec(uri: str, cap: int, deadline_s: float) -> bytes:
    import fsspec

    deadline = time.monotonic() + deadline_s
    chunks, total = [], 0
    with fsspec.open(uri, "rb") as handle:
        while chunk := handle.read(min(CHUNK * 16, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise ReadRefused(f"{uri}: over the limit of {cap:,} bytes; not read further")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{uri}: not read within {deadline_s:g} s")
    return b"".join(chunks)
