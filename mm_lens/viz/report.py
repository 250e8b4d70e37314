"""A self-contained HTML report: text, images and figures inlined (no network, no external files)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figcaption { font-size: .85em; color: #555; max-width: 520px; }
img.figure { max-width: 520px; border: 1px solid #eee; }
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


def figure_png(fig, dpi: int = 110) -> bytes:
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

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, rows: list[list[Any]], header: list[str]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def image(self, image, caption: str = "", css: str = "input") -> None:
        self._img(image_png(image), caption, css)

    def figure(self, fig, caption: str = "") -> None:
        self._img(figure_png(fig), caption, "figure")

    def _img(self, png: bytes, caption: str, css: str) -> None:
        self.parts.append(f'<figure><img class="{css}" alt="{html.escape(caption)}" src="{_data_uri(png)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

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
    """A circuitsvis attention-pattern view (``pattern [head, query, key]``) with its script inlined."""
    import circuitsvis as cv

    rendered = cv.attention.attention_patterns(tokens=str_tokens, attention=pattern)
    return rendered.local_src
