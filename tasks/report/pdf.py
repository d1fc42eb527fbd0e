"""The PDF twin of an HTML report, laid out by WeasyPrint, here or in a child process.

:func:`write_pdf` renders in this process. :class:`PdfProcess` starts a child process that
imports WeasyPrint at once (about a second) and then renders the PDFs it is asked for, one
at a time: a run starts it early and hands it the HTML once written, so neither the import
nor the layout sits on the run's critical path, and the run's process never loads WeasyPrint
(whose memory grows across renders, Kozea/WeasyPrint#1950). A failed or dead child loses
nothing but the PDF: the tables and the HTML are written before it is asked.

Protocol: one JSON line per job on the child's stdin (``html``, ``base``, ``target``), one
JSON line back (``{"ok": true}`` or ``{"error": "..."}``); end of input ends the child, so a
child whose parent died exits by itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from visaudit.tasks.data.files import write_atomically


class PdfFailed(RuntimeError):
    """The PDF could not be rendered; the message says why (the HTML and tables are written)."""


def write_pdf(html_path: Path, run_dir: Path, target: Path) -> None:
    """Lay the HTML out as the PDF; only local files and data: URLs are fetched (offline, no surprises)."""
    from weasyprint import HTML, URLFetcher

    fetcher = URLFetcher(allowed_protocols=("file", "data"))
    # font-subsetting notices ("Using fontTools instead of HarfBuzz-Subset") are not the user's concern
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    HTML(filename=str(html_path), base_url=str(run_dir), url_fetcher=fetcher).write_pdf(str(target))


class PdfProcess:
    """A child process rendering PDFs (see the module's docstring); ``close`` ends it."""

    def __init__(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "visaudit.tasks.report.pdf"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._lost: str | None = None

    def submit(self, html_path: Path, run_dir: Path, target: Path) -> None:
        """Ask for ``target`` (written atomically) from ``html_path``; :meth:`result` waits for it."""
        job = {"html": str(html_path), "base": str(run_dir), "target": str(target)}
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(json.dumps(job) + "\n")
            self._child.stdin.flush()
        except OSError as exc:  # the child is gone (BrokenPipeError): result() says so
            self._lost = f"the PDF process ended ({exc})"

    def result(self) -> None:
        """Wait for the submitted PDF; :class:`PdfFailed` with the reason when it was not written."""
        assert self._child.stdout is not None
        if self._lost:
            raise PdfFailed(self._lost)
        answer = self._child.stdout.readline()
        if not answer:
            raise PdfFailed(f"the PDF process ended (exit code {self._child.wait()})")
        reply = json.loads(answer)
        if "error" in reply:
            raise PdfFailed(reply["error"])

    def close(self) -> None:
        """End the child (after the job it is on) and reap it."""
        if self._child.stdin is not None:
            try:
                self._child.stdin.close()
            except OSError:
                pass
        try:
            self._child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


def _serve() -> None:
    """The child: import WeasyPrint now, then render each job read from stdin."""
    import weasyprint  # noqa: F401 - imported while the run still works, not when its PDF is due

    for line in sys.stdin:
        job = json.loads(line)
        try:
            write_atomically(Path(job["target"]), lambda tmp: write_pdf(Path(job["html"]), Path(job["base"]), tmp))
            reply: dict[str, object] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as its one line
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
