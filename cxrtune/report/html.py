"""One self-contained HTML file from a report bundle (``report.json`` and its PNGs): the
figures are embedded as data URIs, so the file opens offline and can be mailed."""

from __future__ import annotations

import base64
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from markupsafe import Markup

from ..atomic import write_text
from .build import REPORT_FILE

log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).with_name("template.html")


def render(bundle: Path) -> str:
    """The HTML of the bundle in folder ``bundle``."""
    import jinja2

    report = json.loads((Path(bundle) / REPORT_FILE).read_text())
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    template = env.from_string(TEMPLATE.read_text())
    return template.render(r=report, fmt=_fmt, figs=lambda section: _figures(report, Path(bundle), section))


def write_html(bundle: Path, out: Path) -> Path:
    """Render ``bundle`` to ``out`` (written beside it and renamed over it)."""
    return write_text(Path(out), render(bundle))


def _figures(report: dict[str, Any], bundle: Path, section: str) -> Markup:
    """The section's figures as <figure> elements with the PNG inline."""
    parts = []
    for f in report.get("figures", []):
        if f["section"] != section:
            continue
        path = bundle / f["file"]
        if not path.exists():
            log.warning("report: %s is listed but missing from %s", f["file"], bundle)
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(Markup('<figure><img alt="{0}" src="data:image/png;base64,{1}"><figcaption>{0}</figcaption>'
                            '</figure>').format(f["title"], data))
    return Markup("\n").join(parts)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report_for(target: str, out: Optional[Path] = None, storage: Optional[str] = None,
               tracking_uri: Optional[str] = None) -> dict[str, Any]:
    """``cxrtune report``: find the bundle ``target`` means and write its HTML to ``out``
    (default ``<search>-report.html`` in the working directory)."""
    from .locate import default_storage, default_tracking_uri, find_bundle

    with tempfile.TemporaryDirectory(prefix="cxrtune-report-") as tmp:
        bundle, found = find_bundle(target, storage or default_storage(), tracking_uri or default_tracking_uri(),
                                    Path(tmp))
        report = json.loads((bundle / REPORT_FILE).read_text())
        path = write_html(bundle, Path(out) if out else Path(f"{report['name']}-report.html"))
    return {"html": str(path.resolve()), "found": found, "name": report["name"], "status": report["status"]}
