"""A reader for the block-style YAML subset of lm_eval's task files (standard library only).

``eval prepare`` reads lm_eval's ``tasks/gsm8k/gsm8k-cot.yaml`` for its chain-of-thought
exemplars, stop sequences and answer filters. The package may not depend on PyYAML, and
lm_eval itself is not installed (it pulls in heavy dependencies), so this module parses
what such a file uses:

* block mappings and block sequences (``- item``, ``- key: value`` items, and sequences
  indented at the same column as their parent key);
* plain, single-quoted and double-quoted scalars, each of which may continue on more
  indented lines (folded: one line break becomes a space, each blank line a newline);
* ``# comments``, integers, floats, true/false, null and the empty flow forms ``[]``/``{}``.

Anything else (anchors, tags, block scalars ``|``/``>``, non-empty flow collections)
raises ValueError instead of being misread.
"""

from __future__ import annotations

import re

_INT_RE = re.compile(r"^[-+]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
_DQ_ESCAPES = {"\\": "\\", '"': '"', "/": "/", "n": "\n", "t": "\t", "r": "\r", "0": "\0", " ": " "}


class _Line:
    __slots__ = ("indent", "text", "no")

    def __init__(self, indent: int, text: str, no: int):
        self.indent, self.text, self.no = indent, text, no


def loads(source: str):
    """The document in ``source`` as dicts, lists, str, int, float, bool and None."""
    lines = []
    for no, raw in enumerate(source.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {no}: tab indentation")
        stripped = raw.strip()
        if stripped in ("---", "..."):
            continue
        lines.append(_Line(len(raw) - len(raw.lstrip(" ")), raw.strip(), no))
    parser = _Parser(lines)
    i = parser.next_content(0)
    if i >= len(lines):
        return None
    value, i = parser.block(i, lines[i].indent)
    i = parser.next_content(i)
    if i < len(lines):
        raise ValueError(f"line {lines[i].no}: unexpected indentation")
    return value


def _is_blank_or_comment(line: _Line) -> bool:
    return line.text == "" or line.text.startswith("#")


def _is_seq_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _split_key(text: str, no: int) -> tuple[str, str]:
    """``key: rest`` -> (key, rest); the key is plain or quoted."""
    if text[:1] in ("'", '"'):
        q = text[0]
        end = _closing_quote(text, q, 1)
        if end < 0:
            raise ValueError(f"line {no}: unterminated quoted key")
        key, rest = text[1:end], text[end + 1 :]
        if not (rest == ":" or rest.startswith(": ")):
            raise ValueError(f"line {no}: expected ':' after a quoted key")
        return key, rest[1:].strip()
    m = re.match(r"^([^#'\"][^:]*?):(?:\s+(.*))?$", text)
    if not m:
        raise ValueError(f"line {no}: expected 'key: value', got {text!r}")
    return m.group(1).strip(), (m.group(2) or "").strip()


def _fold(parts: list[str], escapes: bool = False) -> str:
    """Join the lines of a multi-line flow scalar: a break is a space, n blank lines are n
    newlines; with ``escapes`` (double quotes) a line ending in an unescaped backslash
    joins the next line directly."""
    out = ""
    blanks = 0
    first = True
    for p in parts:
        if p == "":
            blanks += 1
            continue
        if not first:
            trailing = len(out) - len(out.rstrip("\\"))
            if escapes and not blanks and trailing % 2 == 1:
                out = out[:-1]
            else:
                out += "\n" * blanks if blanks else " "
        out += p
        blanks = 0
        first = False
    return out


def _strip_comment(text: str) -> str:
    m = re.search(r"\s#", text)
    return text[: m.start()].rstrip() if m else text


def _plain(text: str, no: int):
    if text[:1] in ("&", "*", "!", "|", ">", "%", "@", "`") or (
        text[:1] in ("[", "{") and text not in ("[]", "{}")
    ):
        raise ValueError(f"line {no}: unsupported YAML construct {text[:20]!r}")
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if text in ("null", "Null", "NULL", "~", ""):
        return None
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    return text


def _unquote_single(body: str) -> str:
    return body.replace("''", "'")


def _unquote_double(body: str, no: int) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1 : i + 2]
            if nxt in _DQ_ESCAPES:
                out.append(_DQ_ESCAPES[nxt])
                i += 2
                continue
            if nxt == "x" and re.match(r"[0-9a-fA-F]{2}", body[i + 2 : i + 4]):
                out.append(chr(int(body[i + 2 : i + 4], 16)))
                i += 4
                continue
            if nxt == "u" and re.match(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6]):
                out.append(chr(int(body[i + 2 : i + 6], 16)))
                i += 6
                continue
            raise ValueError(f"line {no}: unsupported escape \\{nxt}")
        out.append(c)
        i += 1
    return "".join(out)


def _closing_quote(text: str, q: str, start: int) -> int:
    """Index of the quote closing a scalar opened before ``start``, or -1."""
    i = start
    while i < len(text):
        c = text[i]
        if q == "'" and c == "'":
            if text[i + 1 : i + 2] == "'":
                i += 2
                continue
            return i
        if q == '"':
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i
        i += 1
    return -1


class _Parser:
    def __init__(self, lines: list[_Line]):
        self.lines = lines

    def next_content(self, i: int) -> int:
        while i < len(self.lines) and _is_blank_or_comment(self.lines[i]):
            i += 1
        return i

    def block(self, i: int, indent: int):
        if _is_seq_item(self.lines[i].text):
            return self.sequence(i, indent)
        return self.mapping(i, indent)

    def mapping(self, i: int, indent: int, first_text: str | None = None):
        """A mapping at ``indent``; ``first_text`` is its first line when it sits after a '- '."""
        out: dict = {}
        while True:
            if first_text is None:
                i = self.next_content(i)
                if (
                    i >= len(self.lines)
                    or self.lines[i].indent != indent
                    or _is_seq_item(self.lines[i].text)
                ):
                    if i < len(self.lines) and self.lines[i].indent > indent:
                        raise ValueError(f"line {self.lines[i].no}: unexpected indentation")
                    return out, i
                text, no = self.lines[i].text, self.lines[i].no
            else:
                text, no = first_text, self.lines[i].no
                first_text = None
            key, rest = _split_key(text, no)
            if key in out:
                raise ValueError(f"line {no}: duplicate key {key!r}")
            if rest == "" or rest.startswith("#"):
                j = self.next_content(i + 1)
                if j < len(self.lines) and (
                    self.lines[j].indent > indent
                    or (self.lines[j].indent == indent and _is_seq_item(self.lines[j].text))
                ):
                    out[key], i = self.block(j, self.lines[j].indent)
                else:
                    out[key], i = None, i + 1
            else:
                out[key], i = self.scalar(rest, i, indent)

    def sequence(self, i: int, indent: int):
        out: list = []
        while True:
            i = self.next_content(i)
            if (
                i >= len(self.lines)
                or self.lines[i].indent != indent
                or not _is_seq_item(self.lines[i].text)
            ):
                if i < len(self.lines) and self.lines[i].indent > indent:
                    raise ValueError(f"line {self.lines[i].no}: unexpected indentation")
                return out, i
            line = self.lines[i]
            content = line.text[1:].strip()
            item_indent = indent + (len(line.text) - len(line.text[1:].lstrip(" ")))
            if content == "" or content.startswith("#"):
                j = self.next_content(i + 1)
                if j < len(self.lines) and self.lines[j].indent > indent:
                    value, i = self.block(j, self.lines[j].indent)
                else:
                    value, i = None, i + 1
            elif _is_seq_item(content):
                raise ValueError(f"line {line.no}: nested '- - ' sequences are not supported")
            elif self._looks_like_key(content):
                value, i = self.mapping(i, item_indent, first_text=content)
            else:
                value, i = self.scalar(content, i, indent)
            out.append(value)

    @staticmethod
    def _looks_like_key(text: str) -> bool:
        if text[:1] in ("'", '"'):
            q = text[0]
            end = _closing_quote(text, q, 1)
            return end > 0 and (text[end + 1 :] == ":" or text[end + 1 :].startswith(": "))
        return re.match(r"^[^#'\"\[{][^:]*?:(\s|$)", text) is not None

    def scalar(self, first: str, i: int, parent_indent: int):
        """The scalar starting with ``first`` on line i; its continuation lines are the
        following lines indented deeper than ``parent_indent`` (or blank)."""
        no = self.lines[i].no
        parts = [first]
        i += 1
        q = first[:1] if first[:1] in ("'", '"') else None
        if q:
            end = _closing_quote(first, q, 1)
            while end < 0:
                if i >= len(self.lines):
                    raise ValueError(f"line {no}: unterminated quoted scalar")
                parts.append(self.lines[i].text)
                end = _closing_quote(self.lines[i].text, q, 0)
                i += 1
            tail = parts[-1][end + 1 :].strip()
            if tail and not tail.startswith("#"):
                raise ValueError(f"line {no}: text after a quoted scalar")
            parts[-1] = parts[-1][: end + 1]
            joined = _fold(parts, escapes=q == '"')
            body = joined[1:-1]
            return (_unquote_single(body) if q == "'" else _unquote_double(body, no)), i
        while i < len(self.lines):
            line = self.lines[i]
            if line.text == "":
                parts.append("")
            elif line.indent > parent_indent and not line.text.startswith("#"):
                parts.append(line.text)
            else:
                break
            i += 1
        while parts and parts[-1] == "":
            parts.pop()
        text = _strip_comment(_fold(parts))
        return _plain(text, no), i
