"""A self-contained HTML report: text, images and figures inlined (no network, no external files)."""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figcaption { font-size: .9em; color: #444; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
p.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: .5em .8em; }
img.input { width: 192px; image-rendering: pixelated; border: 1px solid #ccc; }
table { border-collapse: collapse; font-size: .9em; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
.attention { border: 1px solid #eee; padding: .5em; margin: .5em 0; }
"""


# marks the page once every picture has decoded: data-figures="<decoded>/<total>"
RENDER_CHECK = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-figures', ok + '/' + imgs.length);
});
"""


# Figures are shown at this many CSS pixels per inch of figure (fonts of 8 pt or more read as 11 px or more).
CSS_PX_PER_INCH = 100


def figure_png(fig, dpi: int = 150) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def image_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@dataclass
class Report:
    """Sections of inlined HTML; ``write(folder)`` gives ``folder/index.html``."""

    title: str
    parts: list[str] = field(default_factory=list)
    figures: list = field(default_factory=list)  # (figure, caption) of every figure, in order

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def warning(self, text: str) -> None:
        """A highlighted paragraph: something the reader must know before reading the figures."""
        self.parts.append(f'<p class="warning">{html.escape(text)}</p>')

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, rows: list[list[Any]], header: list[str]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def image(self, image, caption: str = "", css: str = "input") -> None:
        self._img(image_png(image), caption, css)

    def figure(self, fig, caption: str = "") -> None:
        """A matplotlib figure, shown at ``CSS_PX_PER_INCH`` pixels per inch (narrower on a narrow page)."""
        self.figures.append((fig, caption))
        self._img(figure_png(fig), caption, "figure", width=round(fig.get_figwidth() * CSS_PX_PER_INCH))

    def _img(self, png: bytes, caption: str, css: str, width: int = 0) -> None:
        size = f' width="{width}" style="max-width:100%"' if width else ""
        cap_width = f' style="max-width:{width}px"' if width else ""
        self.parts.append(f'<figure><img class="{css}"{size} alt="{html.escape(caption)}" src="{_data_uri(png)}">'
                          f"<figcaption{cap_width}>{html.escape(caption)}</figcaption></figure>")

    def raw_html(self, fragment: str, css: str = "attention") -> None:
        """Trusted HTML produced by the project itself (e.g. a circuitsvis view)."""
        self.parts.append(f'<div class="{css}">{fragment}</div>')

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n"
                f"<script>{RENDER_CHECK}</script></body></html>")

    def write(self, folder: Union[str, Path]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "index.html"
        path.write_text(self.render(), encoding="utf-8")
        return path


def attention_view(str_tokens: list[str], pattern) -> str:
    """A circuitsvis attention-pattern view (``pattern [head, query, key]``) with its script inlined.

    circuitsvis writes token labels into the page as HTML, so labels such as ``<s>`` or
    ``<img 3,7>`` are escaped first (they then read as text), and its self-closing container
    ``<div .../>`` (which HTML parsers leave open, pulling the rest of the page into the view) is closed.
    """
    import circuitsvis as cv

    tokens = [html.escape(t, quote=False) for t in str_tokens]
    rendered = cv.attention.attention_patterns(tokens=tokens, attention=pattern).local_src
    return re.sub(r"^(\s*<div [^>]*?)\s*/>", r"\1></div>", rendered, count=1)
