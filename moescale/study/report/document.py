"""The report document: _Doc, a list of blocks rendered to Markdown and to HTML, and the text helpers that
format cells, code spans and estimates.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

from moescale.study import stats


class _Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML."""

    def __init__(self, caption_tail: str):
        self.blocks: list[tuple[Any, ...]] = []
        self.caption_tail = caption_tail
        self.figures = 0

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def code(self, text: str, lang: str = "") -> None:
        self.blocks.append(("code", lang, text.rstrip("\n")))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", [str(h) for h in headers], [[str(c) for c in row] for row in rows]))

    def figure(self, filename: str, what: str) -> None:
        self.figures += 1
        self.blocks.append(("fig", filename, self.figures, f"Figure {self.figures}: {what} {self.caption_tail}"))

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"{'#' * block[1]} {block[2]}")
            elif kind == "p":
                parts.append(block[1])
            elif kind == "ul":
                parts.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "code":
                fence = "````" if "```" in block[2] else "```"
                parts.append(f"{fence}{block[1]}\n{block[2]}\n{fence}")
            elif kind == "table":
                lines = ["| " + " | ".join(_md_cell(h) for h in block[1]) + " |", "|" + "---|" * len(block[1])]
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block[2]]
                parts.append("\n".join(lines))
            elif kind == "fig":
                parts.append(f"![Figure {block[2]}]({block[1]})\n\n*{block[3]}*")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>\n" + "\n".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "\n</ul>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(block[2])}</code></pre>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                 for row in block[2])
                body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
            elif kind == "fig":
                body.append(f'<figure><img src="{html.escape(block[1])}" alt="Figure {block[2]}">'
                            f"<figcaption>{_inline_html(block[3])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;line-height:1.4}"
                 "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.2em .5em;"
                 "text-align:left}pre{background:#f4f4f4;padding:.6em;overflow-x:auto}img{max-width:100%}"
                 "figcaption{font-style:italic;font-size:.9em}")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


def _md_cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")


def _inline_html(text: str) -> str:
    """Escape text for HTML and turn `code` spans into <code> elements."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _code_span(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"'{text}'"


def _ci(est: stats.Estimate, digits: int = 3) -> str:
    if math.isnan(est.low):
        return f"{est.point:.{digits}f}"
    return f"{est.point:.{digits}f} [{est.low:.{digits}f}, {est.high:.{digits}f}]"


def _int(value: float | None) -> str:
    return "-" if value is None else f"{round(value):,}"
