"""Rendering: the view models -> Jinja2 HTML (autoescaped, stylesheet inlined) -> WeasyPrint PDF (``pdf``).

Figures are small files under ``runs/<run_id>/images/``, referenced by relative paths and
shared by the HTML (which works offline) and the PDF; see the package's docstring for the
modules that read the run and build the views.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from visaudit.tasks.data.files import write_atomically
from visaudit.tasks.report.context import report_context
from visaudit.tasks.report.formatting import number, percent, score
from visaudit.tasks.report.inputs import read_inputs
from visaudit.tasks.report.pdf import write_pdf

DEFAULT_TEMPLATES: Path = Path(str(files("visaudit.templates")))  # shipped as package data
TEMPLATE_NAME = "report.html.j2"
STYLESHEET_NAME = "report.css"


@dataclass(frozen=True)
class ReportPaths:
    """Where the report was written (``pdf`` is None when no PDF was asked for)."""

    html: Path
    pdf: Path | None


def render_report(
    out_dir: Path,
    run_id: str,
    template_dir: Path | None = None,
    *,
    pdf: bool = True,
    gallery_size: int = 12,
    evidence_per_finding: int = 4,
) -> ReportPaths:
    """Render runs/<run_id>/report.html (+ report.pdf) from the committed tables and run.json alone."""
    inputs = read_inputs(Path(out_dir), run_id)
    run_dir = inputs.run_dir
    env = environment(template_dir)
    context, painter = report_context(inputs, gallery_size, evidence_per_finding)
    paths = write_documents(env.get_template(TEMPLATE_NAME).render(**context, stylesheet=stylesheet(env)), run_dir,
                            "report", pdf)
    painter.prune()
    return paths


def write_documents(html: str, folder: Path, stem: str, pdf: bool) -> ReportPaths:
    """Write ``folder/<stem>.html`` and, when asked, its PDF twin ``<stem>.pdf`` (each atomically)."""
    html_path = folder / f"{stem}.html"
    write_atomically(html_path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    pdf_path = folder / f"{stem}.pdf" if pdf else None
    if pdf_path is not None:
        write_atomically(pdf_path, lambda tmp: write_pdf(html_path, folder, tmp))
    return ReportPaths(html_path, pdf_path)


def environment(template_dir: Path | None) -> Environment:
    """Jinja2 with autoescape ON; a user folder's files win over the default ones of the same name."""
    folders = ([Path(template_dir)] if template_dir else []) + [DEFAULT_TEMPLATES]
    env = Environment(
        loader=ChoiceLoader([FileSystemLoader(str(folder)) for folder in folders]),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["percent"] = percent
    env.filters["number"] = number
    env.filters["score"] = score
    return env


def stylesheet(env: Environment) -> Markup:
    """The report.css of the template folder, inlined so that report.html is one offline file."""
    source, _, _ = env.loader.get_source(env, STYLESHEET_NAME)  # type: ignore[union-attr]
    return Markup(source)

