"""How reports show figures: one formatter per kind of figure, and tables rendered three ways.

    table = Table(["metric", "value"], [["token_f1", fmt(0.4172)]], title="Candidate")
    table.markdown()    # a Prefect artifact
    table.html()        # a self-contained HTML report
    table.rich()        # the command line

Every report (evaluation, training summary, monitoring, promotion) builds its tables once, from
its typed results, and each surface renders the same cells.
"""

from __future__ import annotations

import html as _html
import math
from dataclasses import dataclass, field
from typing import Any


def fmt(value: float | None, digits: int = 4) -> str:
    """A figure: `–` where there is none (None or NaN), else `digits` significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def fmt_signed(value: float | None, places: int = 4) -> str:
    """A difference, always signed: +0.0123."""
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.{places}f}"


def fmt_interval(low: float | None, high: float | None, places: int = 4) -> str:
    """A confidence interval: [-0.0100, +0.0500]."""
    return f"[{fmt_signed(low, places)}, {fmt_signed(high, places)}]"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""
    styles: list[str] = field(default_factory=list)  # per row: a rich style (the HTML gets a matching class)
    section_ends: list[int] = field(default_factory=list)  # rows after which the terminal draws a line
    right: list[str] = field(default_factory=list)  # headers of columns aligned right in the terminal (figures)

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        lines = [f"**{self.title}**\n"] if self.title else []
        lines += ["| " + " | ".join(cell(h) for h in self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = _html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.headers)
        body = "".join(
            f"<tr class='{e(self.styles[i]) if i < len(self.styles) else ''}'>"
            + "".join(f"<td>{e(str(c))}</td>" for c in row)
            + "</tr>"
            for i, row in enumerate(self.rows)
        )
        caption = f"<caption>{e(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<tr>{head}</tr>{body}</table>"

    def rich(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title or None)
        for h in self.headers:
            table.add_column(h, overflow="fold", justify="right" if h in self.right else "left")
        for i, row in enumerate(self.rows):
            table.add_row(*map(str, row), style=self.styles[i] if i < len(self.styles) else None)
            if i in self.section_ends:
                table.add_section()
        return table


# Styles of verdicts and outcomes, on every surface: the HTML page defines the same classes.
STYLES = {
    "alert": "red",
    "fail": "red",
    "rejected": "red",
    "drift": "red",
    "ok": "green",
    "pass": "green",
    "passed": "green",
    "no_drift": "green",
    "no_data": "dim",
    "skipped": "dim",
    "withheld": "yellow",
}
PAGE_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:72em}td,th{padding:.2em .7em;text-align:left;"
    "vertical-align:top}table{border-collapse:collapse;margin:.5em 0}caption{text-align:left;"
    "font-weight:bold}tr:nth-child(even){background:#f4f4f4}figure{display:inline-block;margin:.5em;"
    "width:46%}img{max-width:100%}figcaption{font-size:.85em;color:#555}.red{color:#b00020}"
    ".green{color:#1b7f3b}.dim{color:#777}.yellow{color:#a66a00}"
)


def page(title: str, body: str) -> str:
    """A self-contained HTML page around `body`."""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_html.escape(title)}</title>'
        f"<style>{PAGE_CSS}</style></head><body>{body}</body></html>"
    )


def png_base64(fig: Any) -> str:
    """Return a matplotlib figure as base64 PNG, to embed in a self-contained HTML report."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def figure_html(title: str, png: str) -> str:
    return f'<figure><img src="data:image/png;base64,{png}"><figcaption>{_html.escape(title)}</figcaption></figure>'
