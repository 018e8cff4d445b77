"""Cleaning: the same text, minus the noise that tokenizers and duplicate checks trip over.

Every text of a record (each message, each preference answer, a document) goes through
`clean_text`; what a record is made of is `texts_of` / `with_texts`, so cleaning, anonymizing and
duplicate checks never need to know a record's kind.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import replace

from tailor.data.example import Example

# C0/C1 control characters except tab and newline, plus the invisible characters that make two
# identical-looking texts differ byte for byte, or a text read differently from how it shows: the
# soft hyphen, zero-width characters, bidi marks, embeddings and isolates (U+2066-2069, the
# "Trojan Source" reordering), and Unicode tag characters (U+E0000-E007F), which can carry a whole
# hidden message to a model (they also spell the subdivision flags, which lose their region).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff"
                      "\U000e0000-\U000e007f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_INDENT = re.compile(r"[ \t]*")
_TAG = re.compile(r"<[a-zA-Z/!][^>]*>")


def clean_text(text: str, unicode: str = "NFC", fix_encoding: bool = True, strip_html: bool = False) -> str:
    if fix_encoding and not text.isascii():  # mojibake needs non-ASCII characters; most text has none
        import ftfy

        # ftfy repairs mojibake ('cafÃ©'); its own normalization and quote folding stay off so that
        # the `unicode` setting alone decides what changes.
        text = ftfy.fix_text(text, normalization=None, uncurl_quotes=False, fix_latin_ligatures=False,
                             fix_character_width=False)
    if strip_html and "<" in text:
        text = _strip_html(text)
    if unicode != "none":
        text = unicodedata.normalize(unicode, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_clean_line(line) for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def _clean_line(line: str) -> str:
    """Runs of spaces as one, none at the end; the indentation a line starts with stays as it is:
    it is the structure of code, nested lists and quoted replies."""
    indent = _INDENT.match(line).group()
    return (indent + _SPACES.sub(" ", line[len(indent):])).rstrip()


def _strip_html(text: str) -> str:
    if not _TAG.search(text):
        return text
    from selectolax.lexbor import LexborHTMLParser

    # Block elements become line breaks so paragraphs and list items stay apart.
    marked = re.sub(r"(?i)<\s*(br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>", "\n", text)
    tree = LexborHTMLParser(marked)
    for node in tree.css("script, style"):
        node.decompose()
    return html.unescape(tree.text(separator=""))


def texts_of(ex: Example) -> list[str]:
    """Every text in a record, in a fixed order that `with_texts` reads back."""
    if ex.kind == "text":
        return [ex.text]
    out = [m["content"] for m in ex.messages]
    for answer in (ex.chosen or []), (ex.rejected or []):
        out.extend(m["content"] for m in answer)
    return out


def with_texts(ex: Example, texts: list[str]) -> Example:
    """The record with its texts replaced, in `texts_of` order."""
    if ex.kind == "text":
        return replace(ex, text=texts[0])
    it = iter(texts)
    messages = [{**m, "content": next(it)} for m in ex.messages]
    chosen = [{**m, "content": next(it)} for m in ex.chosen] if ex.chosen is not None else None
    rejected = [{**m, "content": next(it)} for m in ex.rejected] if ex.rejected is not None else None
    return replace(ex, messages=messages, chosen=chosen, rejected=rejected)


def prompt_of(ex: Example) -> str:
    """What the model is asked: the turns before the first answer (all of a preference prompt).
    Two records with the same prompt must never straddle train and test."""
    if ex.kind == "text":
        return ""
    turns = []
    for m in ex.messages:
        if m["role"] == "assistant":
            break
        turns.append(f"{m['role']}: {m['content']}")
    return "\n".join(turns)


def normalized(text: str) -> str:
    """The form duplicates are compared in: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())
