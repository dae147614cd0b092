"""A tiny document model that the HTML and Markdown writers both render, so the two files of a
report always carry the same content.

Text is plain (the writers escape it); ``Code`` spans and ``Strong`` spans are the only inline
markup, given as parts of a :class:`Text`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str


Inline = Union[str, Code, Strong]


@dataclass
class Text:
    """A run of inline parts: plain strings, :class:`Code` and :class:`Strong`."""

    parts: list[Inline]

    @classmethod
    def of(cls, *parts: Inline) -> "Text":
        return cls(list(parts))

    def plain(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)


def text(x: "str | Text") -> Text:
    return x if isinstance(x, Text) else Text([x])


@dataclass
class Heading:
    level: int
    title: str
    anchor: str = ""


@dataclass
class Para:
    body: Text


@dataclass
class Banner:
    """A prominent notice. kind: ``danger`` (synthetic data), ``warn`` (not comparable,
    missing pieces) or ``info``."""

    kind: str
    title: str
    body: Text


@dataclass
class Bullets:
    items: list[Text]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    # Columns to right-align (numbers); indices into header.
    numeric: set[int] = field(default_factory=set)
    # Rows to emphasise (e.g. the mean), indices into rows.
    strong_rows: set[int] = field(default_factory=set)


@dataclass
class Image:
    """A PNG written under the report's figures/ directory; ``src`` is relative to the report."""

    src: str
    alt: str
    caption: Text


@dataclass
class Pre:
    body: str
    title: str = ""


Block = Union[Heading, Para, Banner, Bullets, Table, Image, Pre]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)
