"""Render a report :class:`~hpc.report.doc.Document` as Markdown (GitHub flavour), with
figures linked relatively (``figures/*.png`` beside ``report.md``)."""
from __future__ import annotations

import re

from hpc.report.doc import Banner, Bullets, Code, Document, Heading, Image, Para, Pre, Strong, Table, Text

# Characters that start markup anywhere. "_" only matters at a word edge (GitHub Markdown ignores
# intraword underscores, so Pleural_Thickening stays readable); "[" only as "](", "#" and ">"
# only at the start of a line.
_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*<|"})
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _esc(s: str) -> str:
    s = _EDGE_UNDERSCORE.sub(r"\\_", s.translate(_SPECIAL)).replace("](", "]\\(")
    return "\\" + s if s.startswith(("#", ">")) else s


def _inline(t: Text) -> str:
    out = []
    for p in t.parts:
        if isinstance(p, Code):
            tick = "``" if "`" in p.text else "`"
            out.append(f"{tick}{p.text}{tick}")
        elif isinstance(p, Strong):
            out.append(f"**{_esc(p.text)}**")
        else:
            out.append(_esc(p))
    return "".join(out)


def _cell(s: str) -> str:
    return _esc(s).replace("\n", " ")


def render_markdown(doc: Document) -> str:
    """The Markdown text of ``doc``."""
    out: list[str] = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.title)
        elif isinstance(b, Para):
            out.append(_inline(b.body))
        elif isinstance(b, Banner):
            icon = {"danger": "⛔", "warn": "⚠️", "info": "ℹ️"}.get(b.kind, "")
            out.append(f"> {icon} **{_esc(b.title)}** " + _inline(b.body))
        elif isinstance(b, Bullets):
            out.append("\n".join("- " + _inline(it) for it in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---:" if j in b.numeric else "---" for j in range(len(b.header))) + "|"]
            for i, r in enumerate(b.rows):
                cells = [_cell(c) for c in r]
                if i in b.strong_rows:
                    cells = [f"**{c}**" if c else c for c in cells]
                lines.append("| " + " | ".join(cells) + " |")
            if b.caption:
                lines.append("")
                lines.append("*" + _esc(b.caption) + "*")
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{_esc(b.alt)}]({b.src})\n\n*{_inline(b.caption)}*")
        elif isinstance(b, Pre):
            title = f"**{_esc(b.title)}**\n\n" if b.title else ""
            fence = "````" if "```" in b.body else "```"
            out.append(f"{title}{fence}\n{b.body.rstrip()}\n{fence}")
        else:  # pragma: no cover
            raise TypeError(f"no Markdown writer for {type(b).__name__}")
    return "\n\n".join(out) + "\n"
