"""Render a report :class:`~hpc.report.doc.Document` as one self-contained HTML file.

Self-contained means it opens offline and alone: inline CSS, no scripts, no web fonts, no
external style sheets, and every figure embedded as a ``data:image/png;base64`` URI (so the
file can be mailed or copied without its figures/ directory).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from hpc.report.doc import Banner, Bullets, Code, Document, Heading, Image, Para, Pre, Strong, Table, Text

CSS = """
:root { --fg: #1b1b1b; --muted: #5a5a5a; --line: #d9d9d9; --bg-alt: #f6f7f9; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1180px; padding: 24px 28px 64px; line-height: 1.45;
       font-size: 15px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p { margin: 8px 0; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
code { background: var(--bg-alt); padding: 1px 4px; border-radius: 3px; }
pre { background: var(--bg-alt); border: 1px solid var(--line); padding: 10px 12px; overflow: auto;
      white-space: pre-wrap; word-break: break-word; max-height: 560px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg-alt); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.strong td { font-weight: 700; background: #fbfbf4; }
.caption { color: var(--muted); font-size: 13px; margin: 2px 0 14px; }
.banner { border-left: 6px solid; padding: 10px 14px; margin: 12px 0; border-radius: 4px; }
.banner .title { font-weight: 700; display: block; margin-bottom: 2px; }
.banner.danger { border-color: #c0392b; background: #fdecea; }
.banner.warn { border-color: #d68910; background: #fef5e7; }
.banner.info { border-color: #2e86c1; background: #eaf2f8; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
nav.toc { font-size: 14px; margin: 10px 0 4px; }
nav.toc a { margin-right: 12px; white-space: nowrap; }
ul { margin: 6px 0; padding-left: 22px; }
"""


def _inline(t: Text) -> str:
    out = []
    for p in t.parts:
        if isinstance(p, Code):
            out.append(f"<code>{html.escape(p.text)}</code>")
        elif isinstance(p, Strong):
            out.append(f"<strong>{html.escape(p.text)}</strong>")
        else:
            out.append(html.escape(p))
    return "".join(out)


def _image_uri(base: Path, src: str) -> str:
    data = (base / src).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_html(doc: Document, base: Path, embed: bool = True) -> str:
    """The HTML page of ``doc``.

    Args:
        doc: the report.
        base: the directory that image ``src`` paths are relative to.
        embed: embed figures as data URIs (default); False links them relatively.
    """
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(doc.title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    toc = [(b.anchor, b.title) for b in doc.blocks if isinstance(b, Heading) and b.level == 2 and b.anchor]
    for i, b in enumerate(doc.blocks):
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            parts.append(f"<h{b.level}{anchor}>{html.escape(b.title)}</h{b.level}>")
            if b.level == 1 and toc:
                links = "".join(f'<a href="#{html.escape(a)}">{html.escape(t)}</a>' for a, t in toc)
                parts.append(f'<nav class="toc">{links}</nav>')
        elif isinstance(b, Para):
            parts.append(f"<p>{_inline(b.body)}</p>")
        elif isinstance(b, Banner):
            parts.append(f'<div class="banner {html.escape(b.kind)}"><span class="title">{html.escape(b.title)}'
                         f"</span>{_inline(b.body)}</div>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append(_table(b))
        elif isinstance(b, Image):
            src = _image_uri(base, b.src) if embed else html.escape(b.src)
            parts.append(f'<figure><img src="{src}" alt="{html.escape(b.alt)}">'
                         f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
        elif isinstance(b, Pre):
            if b.title:
                parts.append(f"<h3>{html.escape(b.title)}</h3>")
            parts.append(f"<pre>{html.escape(b.body)}</pre>")
        else:  # pragma: no cover - a new block type without a writer
            raise TypeError(f"no HTML writer for {type(b).__name__}")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _table(t: Table) -> str:
    def cls(j: int) -> str:
        return ' class="num"' if j in t.numeric else ""

    head = "".join(f"<th{cls(j)}>{html.escape(h)}</th>" for j, h in enumerate(t.header))
    rows = []
    for i, r in enumerate(t.rows):
        tr = ' class="strong"' if i in t.strong_rows else ""
        rows.append(f"<tr{tr}>" + "".join(f"<td{cls(j)}>{html.escape(c)}</td>" for j, c in enumerate(r)) + "</tr>")
    cap = f'<div class="caption">{html.escape(t.caption)}</div>' if t.caption else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{cap}"
