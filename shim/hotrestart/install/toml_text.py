"""The text of a TOML document, read as far as editing one array in place needs.

tomllib reads values, not where they are written. To change one entry of an administrator's
`imports` and leave every other byte alone, we find that array's text: the top-level
statements before the first table, where the array opens and closes, its items and commas.
Callers check every edit by reading the result back with tomllib.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from typing import Any

from hotrestart.install.errors import InstallError


def key_pattern(name: str) -> re.Pattern[str]:
    """A top-level `name =`, with the key bare or quoted."""
    return re.compile(rf"""(?:{name}|"{name}"|'{name}')\s*=""")


def parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{where}: not valid TOML: {exc}") from None


def decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InstallError(f"{where}: not UTF-8 text") from None


def toml_string(text: str) -> str:
    """`text` as a TOML basic string."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _skip_string(text: str, i: int) -> int:
    """The index just after the string starting at `i`."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        while end != -1 and quote == '"' and _escaped(text, end):
            end = text.find(quote * 3, end + 1)
        if end == -1:
            return len(text)
        end += 3
        while end < len(text) and text[end] == quote:  # up to two quotes may end the content
            end += 1
        return end
    j = i + 1
    while j < len(text) and text[j] != quote and text[j] != "\n":
        j += 2 if quote == '"' and text[j] == "\\" else 1
    return j + 1


def _escaped(text: str, i: int) -> bool:
    backslashes = 0
    while i - backslashes - 1 >= 0 and text[i - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _skip_comment(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end == -1 else end


def _statement_end(text: str, i: int) -> int:
    """The index of the newline that ends the key/value statement starting at `i` (or the end)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c == "#":
            i = _skip_comment(text, i)
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "\n" and depth <= 0:
            return i
        i += 1
    return len(text)


def _top_statements(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each key/value statement before the first table header."""
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "#":
            i = _skip_comment(text, i)
        elif c == "[":
            return
        else:
            end = _statement_end(text, i)
            yield i, end
            i = end


def statement(text: str, name: str) -> tuple[int, int] | None:
    """(start, end) of the top-level statement setting `name`, before any table."""
    key = key_pattern(name)
    for start, end in _top_statements(text):
        if key.match(text, start):
            return start, end
    return None


class Array:
    def __init__(self, open_at: int, close_at: int, items: list[tuple[int, int]], commas: list[int]) -> None:
        self.open_at = open_at
        self.close_at = close_at
        self.items = items
        self.commas = commas


def array_of(text: str, name: str, where: str) -> Array:
    """The top-level array `name`: where it opens and closes, its items (strings) and commas."""
    key = key_pattern(name)
    found = statement(text, name)
    match = key.match(text, found[0]) if found else None
    if found is None or match is None:
        raise InstallError(f"{where}: cannot find its top-level `{name}` line")
    statement_end = found[1]
    i = match.end()
    while i < statement_end and text[i] in " \t":
        i += 1
    if i >= statement_end or text[i] != "[":
        raise InstallError(f"{where}: `{name}` is not written as an array")
    open_at = i
    items: list[tuple[int, int]] = []
    commas: list[int] = []
    i += 1
    while i < len(text):
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "#":
            i = _skip_comment(text, i)
        elif c == "]":
            return Array(open_at, i, items, commas)
        elif c == ",":
            commas.append(i)
            i += 1
        elif c in "\"'":
            end = _skip_string(text, i)
            items.append((i, end))
            i = end
        else:
            raise InstallError(f"{where}: `{name}` holds something other than strings")
    raise InstallError(f"{where}: `{name}` is not closed")


def value(token: str) -> object:
    try:
        return tomllib.loads(f"v = {token}")["v"]
    except tomllib.TOMLDecodeError:
        return None


def append_entry(text: str, array: Array, entry: str) -> str:
    quoted = toml_string(entry)
    items = array.items
    trailing_comma = bool(items) and bool(array.commas) and array.commas[-1] >= items[-1][1]
    line_start = text.rfind("\n", 0, array.close_at) + 1
    if items and line_start > items[-1][1] and not text[line_start : array.close_at].strip():
        # One entry a line with `]` on its own: a new line like the last entry's.
        last_line = text.rfind("\n", 0, items[-1][0]) + 1
        indent = text[last_line : items[-1][0]]
        indent = indent if not indent.strip() else "  "
        # Ours ends with a comma only if theirs did, and with their line ending, so that the
        # removal gives back their bytes.
        eol = "\r\n" if text[line_start - 2 : line_start] == "\r\n" else "\n"
        if trailing_comma:
            return text[:line_start] + f"{indent}{quoted},{eol}" + text[line_start:]
        return insert(text[:line_start] + f"{indent}{quoted}{eol}" + text[line_start:], items[-1][1], ",")
    if not items:
        return insert(text, array.open_at + 1, quoted)
    if trailing_comma:
        return insert(text, array.commas[-1] + 1, f" {quoted}")
    return insert(text, items[-1][1], f", {quoted}")


def entry_cuts(text: str, array: Array, item: tuple[int, int]) -> list[tuple[int, int]]:
    """What to cut to remove `item`, last first: with the comma after it, or else the one
    before it, and with the whole line when nothing else is on it. An item alone on its line
    whose comma is on the line before takes only that comma with it (a comment after the
    comma stays)."""
    start, end = item
    after = [c for c in array.commas if c >= end and all(not (end <= s < c) for s, _ in array.items)]
    before = [c for c in array.commas if c < start and all(not (c < s < start) for s, _ in array.items)]
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end == -1 else line_end
    alone = not text[line_start:start].strip() and line_end < array.close_at
    if not after and before and before[-1] < line_start and alone and not text[end:line_end].strip():
        return [(line_start, line_end + 1), (before[-1], before[-1] + 1)]
    if after:
        end = after[0] + 1
    elif before:
        start = before[-1]
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end == -1 else line_end
    if not text[line_start:start].strip() and not text[end:line_end].strip() and line_end < array.close_at:
        return [(line_start, line_end + 1)]
    while after and end < len(text) and text[end] in " \t":
        end += 1
    return [(start, end)]


def insert(text: str, at: int, what: str) -> str:
    return text[:at] + what + text[at:]


def cut(text: str, start: int, end: int) -> str:
    return text[:start] + text[end:]
